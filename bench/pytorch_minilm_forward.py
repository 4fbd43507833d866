"""PyTorch's side of the MiniLM forward-pass benchmark (issue 16): all-MiniLM-L6-v2's encoder
(`AutoModel`, f32, eager, `inference_mode`) on the very inputs `engine/examples/minilm_latency.rs`
times: the first 32 texts of the BBC News file tokenized with the model's tokenizer, truncated at
128 tokens; batch 1 cycles through the 32 articles, batch 32 takes them at once, and the headline
case takes each text's first line (padded to the longest).

    python bench/pytorch_minilm_forward.py MODEL_DIR DATA.jsonl [--threads 2] [--runs 10] [--warmup 2]

Prints one JSON object with the p50 milliseconds of each case. `bench/minilm_forward_compare.sh`
runs it alternately with ours.
"""

import argparse
import json
import statistics
import time

import torch
from transformers import AutoModel, AutoTokenizer


def p50_ms(model, batches, runs, warmup):
    with torch.inference_mode():
        for i in range(warmup):
            model(**batches[i % len(batches)])
        times = []
        for i in range(runs):
            batch = batches[i % len(batches)]
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
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    with open(args.data) as f:
        texts = [json.loads(line)["text"] for _, line in zip(range(32), f)]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModel.from_pretrained(args.model, torch_dtype=torch.float32).eval()

    def tokenize(rows):
        return tokenizer(rows, truncation=True, max_length=128, padding=True, return_tensors="pt")

    cases = {
        "batch1_ms": [tokenize([t]) for t in texts],
        "batch32_ms": [tokenize(texts)],
        "batch32_headlines_ms": [tokenize([t.splitlines()[0] for t in texts])],
    }
    result = {name: p50_ms(model, batches, args.runs, args.warmup) for name, batches in cases.items()}
    result.update(threads=args.threads, torch=torch.__version__)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
