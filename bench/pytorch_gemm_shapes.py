"""PyTorch side of bench/f32_gemm_shapes.rs: the same three products per linear shape, median of
--runs, GFLOP/s per call."""

import argparse
import json
import os
import statistics
import time

import torch

ROWS = 1024
SHAPES = [(256, 256), (256, 1024), (1024, 256)]


def median_ms(runs, f):
    for _ in range(5):
        f()
    times = []
    for _ in range(runs):
        s = time.perf_counter()
        f()
        times.append((time.perf_counter() - s) * 1e3)
    return statistics.median(times)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for inp, out in SHAPES:
        x, w, dy = torch.rand(ROWS, inp), torch.rand(out, inp), torch.rand(ROWS, out)
        flops = 2.0 * ROWS * inp * out
        fwd = median_ms(args.runs, lambda: x @ w.t())
        dx = median_ms(args.runs, lambda: dy @ w)
        dw = median_ms(args.runs, lambda: dy.t() @ x)
        gf = lambda ms: round(flops / ms / 1e6, 1)
        print(json.dumps({"impl": "pytorch", "threads": args.threads, "in": inp, "out": out, "fwd_ms": round(fwd, 3),
                          "dx_ms": round(dx, 3), "dw_ms": round(dw, 3), "fwd_gflops": gf(fwd),
                          "dx_gflops": gf(dx), "dw_gflops": gf(dw)}))


if __name__ == "__main__":
    main()
