"""PyTorch's side of the MiniLM-on-BBC fine-tune benchmark (issue 16): the same run as
`bench/finetune_bbc.rs`, with transformers' `Trainer` on the CPU.

Same data and split (a row is test when the first byte of sha256(text) modulo 5 is 0, the shared
data sets' rule our engine applies), same model (all-MiniLM-L6-v2 with a fresh 5-class head, pooler
from the checkpoint), same settings: AdamW with body lr 5e-5 and `classifier.*` lr 1e-3, weight
decay 0.01 (not on biases and LayerNorm weights), 10% linear warmup then linear decay, clipping at
norm 1.0, batch 16, 128 tokens, 3 epochs, seed 0, dropout as in the checkpoint's config. Then
accuracy and macro-F1 on the test split.

    python bench/pytorch_finetune_bbc.py MODEL_DIR DATA.jsonl [--threads 2] [--epochs 3]

Prints one JSON line with the same fields as ours (train_seconds, eval_seconds, wall_seconds,
test_accuracy, test_macro_f1, peak_rss_mib).
"""

import argparse
import hashlib
import math
import json
import resource
import tempfile
import time

import torch
from sklearn.metrics import accuracy_score, f1_score
from transformers import (
    AutoModelForSequenceClassification,
    AutoTokenizer,
    DataCollatorWithPadding,
    Trainer,
    TrainingArguments,
)


def main():
    started = time.perf_counter()
    parser = argparse.ArgumentParser()
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--epochs", type=float, default=3)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    rows = [json.loads(line) for line in open(args.data)]
    labels = sorted({r["label"] for r in rows})
    label_id = {name: i for i, name in enumerate(labels)}
    is_test = lambda r: hashlib.sha256(r["text"].encode()).digest()[0] % 5 == 0
    tokenizer = AutoTokenizer.from_pretrained(args.model)

    def encode(part):
        enc = tokenizer([r["text"] for r in part], truncation=True, max_length=args.max_length)
        return [
            {"input_ids": ids, "token_type_ids": tt, "attention_mask": am, "labels": label_id[r["label"]]}
            for ids, tt, am, r in zip(enc["input_ids"], enc["token_type_ids"], enc["attention_mask"], part)
        ]

    train = encode([r for r in rows if not is_test(r)])
    test = encode([r for r in rows if is_test(r)])

    model = AutoModelForSequenceClassification.from_pretrained(
        args.model, num_labels=len(labels), dtype=torch.float32
    )
    # transformers 5 takes the warmup as a step count: 10% of the steps, as ours.
    steps = math.ceil(len(train) / args.batch_size) * math.ceil(args.epochs)
    warmup_steps = round(0.1 * steps)
    no_decay = lambda n: n.endswith("bias") or "LayerNorm" in n
    body = [(n, p) for n, p in model.named_parameters() if not n.startswith("classifier.")]
    head = [p for n, p in model.named_parameters() if n.startswith("classifier.")]
    optimizer = torch.optim.AdamW(
        [
            {"params": [p for n, p in body if not no_decay(n)], "lr": 5e-5, "weight_decay": 0.01},
            {"params": [p for n, p in body if no_decay(n)], "lr": 5e-5, "weight_decay": 0.0},
            {"params": head, "lr": 1e-3, "weight_decay": 0.01},
        ]
    )
    with tempfile.TemporaryDirectory() as out:
        training = TrainingArguments(
            output_dir=out,
            num_train_epochs=args.epochs,
            per_device_train_batch_size=args.batch_size,
            per_device_eval_batch_size=32,
            learning_rate=5e-5,
            weight_decay=0.01,
            warmup_steps=warmup_steps,
            lr_scheduler_type="linear",
            max_grad_norm=1.0,
            seed=0,
            save_strategy="no",
            eval_strategy="no",
            report_to=[],
            logging_steps=1000,
            use_cpu=True,
            dataloader_num_workers=0,
        )
        trainer = Trainer(
            model=model,
            args=training,
            train_dataset=train,
            data_collator=DataCollatorWithPadding(tokenizer),
            optimizers=(optimizer, None),
        )
        train_started = time.perf_counter()
        result = trainer.train()
        train_seconds = time.perf_counter() - train_started
        eval_started = time.perf_counter()
        predictions = trainer.predict(test)
        eval_seconds = time.perf_counter() - eval_started
    predicted = predictions.predictions.argmax(-1)
    gold = [r["labels"] for r in test]
    print(
        json.dumps(
            {
                "impl": "pytorch-trainer",
                "torch": torch.__version__,
                "threads": args.threads,
                "train_rows": len(train),
                "test_rows": len(test),
                "steps": result.global_step,
                "final_loss": result.training_loss,
                "train_seconds": round(train_seconds, 2),
                "eval_seconds": round(eval_seconds, 2),
                "wall_seconds": round(time.perf_counter() - started, 2),
                "test_accuracy": round(accuracy_score(gold, predicted), 4),
                "test_macro_f1": round(f1_score(gold, predicted, average="macro"), 4),
                "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
            }
        )
    )


if __name__ == "__main__":
    main()
