"""PyTorch's dynamic int8 (`torch.ao.quantization.quantize_dynamic` on every nn.Linear) against its
f32 model: latency of a sequence-classification model at batch 1 and 32, 128 tokens.

Issue 15's comparison for our `quantize` with `method: "dynamic"`: the acceptance test
(`tests/acceptance/minilm_dynamic.rs`) runs it right after the job, on the same MiniLM with a
classification head of `--labels` classes (latency does not depend on the trained values), and
compares its numbers with the job's measured latencies.

    python bench/pytorch_dynamic_int8.py MODEL_DIR DATA.jsonl [--threads 2] [--runs 10] [--labels 5]

Prints one JSON object: {"f32_batch1_ms", "f32_batch32_ms", "int8_batch1_ms", "int8_batch32_ms",
"threads", "torch"} (medians over --runs after one warm-up; batch 32 uses --runs // 3 + 1 runs).
"""

import argparse
import json
import statistics
import time

import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer


def median_ms(model, batch, runs):
    with torch.inference_mode():
        model(**batch)
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            model(**batch)
            times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--runs", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--labels", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    with open(args.data) as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(32), f)]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    encode = lambda rows: tokenizer(
        rows, padding="max_length", truncation=True, max_length=args.tokens, return_tensors="pt"
    )
    batch1, batch32 = encode(texts[:1]), encode(texts)
    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=args.labels
    ).eval()
    dynamic = torch.ao.quantization.quantize_dynamic(
        model, {torch.nn.Linear}, dtype=torch.qint8
    )
    runs32 = args.runs // 3 + 1
    print(
        json.dumps(
            {
                "f32_batch1_ms": median_ms(model, batch1, args.runs),
                "f32_batch32_ms": median_ms(model, batch32, runs32),
                "int8_batch1_ms": median_ms(dynamic, batch1, args.runs),
                "int8_batch32_ms": median_ms(dynamic, batch32, runs32),
                "threads": args.threads,
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
