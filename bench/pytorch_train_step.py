"""PyTorch eager reference for `bench/train_step.rs`: one BERT training step, timed by phase.

The model is written out in plain torch.nn (no transformers dependency) with exactly the layout of
Hugging Face's BertForSequenceClassification: embeddings (word, position, token type, LayerNorm),
post-norm encoder layers (self-attention with an additive padding mask, GELU feed-forward), a tanh
pooler on [CLS] and a linear classifier. Config and batch match the Rust bench: hidden 256, 4 layers,
4 heads, intermediate 1024, vocab 30522, batch 8 x 128, f32, AdamW (lr 2e-5, wd 0.01) with global
norm clipping at 1.0, CPU.

Prints one JSON line: median milliseconds of forward (incl. loss), backward, optimizer (clip + step)
and the whole step over the timed steps.

    python3 bench/pytorch_train_step.py [--steps 10] [--warmup 3] [--dropout 0.0] [--threads N] \
        [--seq 128] [--checkpointing] [--size small|base] [--batch 8] [--device cpu|cuda] \
        [--autocast bf16|f16]

`--size base --batch 32 --device cuda` is the GPU reference for engine/examples/cuda_check.rs
(BERT-base, f32, batch 32 x 128); `--autocast bf16` adds torch.autocast's bf16 mixed precision; `--autocast f16` autocast to float16
with `torch.amp.GradScaler` (scale, unscale before clipping, skip on overflow), as ours does.

With --checkpointing every encoder layer runs under torch.utils.checkpoint (non-reentrant, RNG state
preserved), as transformers' gradient_checkpointing_enable() does.
"""

import argparse
import json
import math
import os
import resource
import statistics
import time

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint


class Layer(nn.Module):
    def __init__(self, hidden, heads, inter, p):
        super().__init__()
        self.heads = heads
        self.qkv = nn.ModuleList([nn.Linear(hidden, hidden) for _ in range(3)])
        self.out = nn.Linear(hidden, hidden)
        self.ln1 = nn.LayerNorm(hidden, eps=1e-12)
        self.up = nn.Linear(hidden, inter)
        self.down = nn.Linear(inter, hidden)
        self.ln2 = nn.LayerNorm(hidden, eps=1e-12)
        self.drop = nn.Dropout(p)

    def forward(self, x, mask_bias):
        b, s, h = x.shape
        d = h // self.heads
        q, k, v = (lin(x).view(b, s, self.heads, d).transpose(1, 2) for lin in self.qkv)
        scores = q @ k.transpose(-1, -2) / math.sqrt(d) + mask_bias
        ctx = (self.drop(scores.softmax(-1)) @ v).transpose(1, 2).reshape(b, s, h)
        x = self.ln1(x + self.drop(self.out(ctx)))
        return self.ln2(x + self.drop(self.down(nn.functional.gelu(self.up(x)))))


class Bert(nn.Module):
    def __init__(self, vocab, hidden, layers, heads, inter, max_pos, labels, p):
        super().__init__()
        self.word = nn.Embedding(vocab, hidden)
        self.pos = nn.Embedding(max_pos, hidden)
        self.tok = nn.Embedding(2, hidden)
        self.ln = nn.LayerNorm(hidden, eps=1e-12)
        self.drop = nn.Dropout(p)
        self.layers = nn.ModuleList([Layer(hidden, heads, inter, p) for _ in range(layers)])
        self.pooler = nn.Linear(hidden, hidden)
        self.classifier = nn.Linear(hidden, labels)
        self.checkpointing = False

    def forward(self, ids, mask, types):
        s = ids.shape[1]
        pos = torch.arange(s, device=ids.device).unsqueeze(0)
        x = self.drop(self.ln(self.word(ids) + self.pos(pos) + self.tok(types)))
        mask_bias = (1.0 - mask[:, None, None, :].float()) * -10000.0
        for layer in self.layers:
            if self.checkpointing:
                x = checkpoint(layer, x, mask_bias, use_reentrant=False)
            else:
                x = layer(x, mask_bias)
        return self.classifier(self.drop(torch.tanh(self.pooler(x[:, 0]))))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dropout", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--checkpointing", action="store_true")
    ap.add_argument("--size", choices=["small", "base"], default="small")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--autocast", choices=["bf16", "f16"], default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch, seq, dev = args.batch, args.seq, torch.device(args.device)
    hidden, layers, heads, inter = (256, 4, 4, 1024) if args.size == "small" else (768, 12, 12, 3072)
    model = Bert(30522, hidden, layers, heads, inter, 512, 2, args.dropout).to(dev)
    model.checkpointing = args.checkpointing
    model.train()
    ids = torch.randint(0, 30522, (batch, seq), device=dev)
    mask = torch.ones(batch, seq, dtype=torch.long, device=dev)
    types = torch.zeros(batch, seq, dtype=torch.long, device=dev)
    labels = torch.randint(0, 2, (batch,), device=dev)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    low = {"bf16": torch.bfloat16, "f16": torch.float16}.get(args.autocast, torch.float32)
    autocast = lambda: torch.autocast(dev.type, dtype=low, enabled=args.autocast is not None)
    # f16 needs loss scaling; a disabled scaler passes everything through.
    scaler = torch.amp.GradScaler(dev.type, enabled=args.autocast == "f16")
    decay = [p for n, p in model.named_parameters() if not ("ln" in n or n.endswith("bias"))]
    no_decay = [p for n, p in model.named_parameters() if "ln" in n or n.endswith("bias")]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}], lr=2e-5
    )
    times = {"forward": [], "backward": [], "optimizer": [], "step": []}
    for i in range(args.warmup + args.steps):
        t0 = time.perf_counter()
        with autocast():
            loss = nn.functional.cross_entropy(model(ids, mask, types), labels)
        sync()
        t1 = time.perf_counter()
        scaler.scale(loss).backward()
        sync()
        t2 = time.perf_counter()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        sync()
        t3 = time.perf_counter()
        if i >= args.warmup:
            for key, dt in (("forward", t1 - t0), ("backward", t2 - t1), ("optimizer", t3 - t2), ("step", t3 - t0)):
                times[key].append(dt * 1e3)
    params = sum(p.numel() for p in model.parameters())
    report = {k + "_ms": round(statistics.median(v), 2) for k, v in times.items()}
    report.update(
        impl="pytorch-eager",
        torch=torch.__version__,
        threads=torch.get_num_threads(),
        params=params,
        dropout=args.dropout,
        seq=seq,
        batch=batch,
        size=args.size,
        device=args.device,
        autocast=args.autocast,
        checkpointing=args.checkpointing,
        steps=args.steps,
        # ru_maxrss is in KiB on Linux: the process's peak, as our VmHWM.
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024,
    )
    print(json.dumps(report))


if __name__ == "__main__":
    main()
