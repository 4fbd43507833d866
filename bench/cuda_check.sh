#!/usr/bin/env bash
# CUDA check (issue 5): builds engine/examples/cuda_check.rs with `--features cuda` and/or runs it.
# The program compares a small random BERT's logits, gradients and AdamW steps, and the quantized
# layers of every scheme, on CUDA against the CPU (fails outside tolerance) and times one BERT-base training step on the GPU in f32 and in bf16
# and f16 mixed precision, then PyTorch eager's (f32, bf16 and f16 autocast) where torch is installed; see BENCHMARKS.md.
#
#   bench/cuda_check.sh build   # on a machine with a CUDA toolkit (nvcc) or PyPI access; no GPU needed
#   bench/cuda_check.sh run     # on the GPU machine; only needs the built binary and CUDA 13 libraries
#   bench/cuda_check.sh         # both, on a GPU machine that can also build
#
# Environment (all optional):
#   CUDA_HOME          toolkit root (bin/nvcc, include/, lib64/). Unset and no nvcc on PATH: `build` makes
#                      one from PyPI wheels with ../shared/tools/cuda-toolkit-from-pypi.sh in CUDA_TOOLKIT_DIR
#                      (default ../cuda-toolkit; ~6 min and ~3 GB) and uses its libcuda link stub.
#   CUDA_COMPUTE_CAP   GPU architecture to compile kernels for, default 90 (H100/H200); 80 for A100.
#   CARGO_TARGET_DIR   default ../target-cuda: a separate target dir, so the CPU build's stays warm.
#   CUDA_CHECK_BIN     where `build` copies the stripped binary and `run` takes it from
#                      (default target/cuda-check/cuda_check: in the repo, ignored by git, so a remote
#                      runner can carry it).
#   CUDA_LIB_DIR       folder holding libcublas.so.13 etc. on the GPU machine; found with `find` if unset.
#   CUDA_CHECK_ARGS    extra arguments for the program, e.g. "--batch 16 --steps 20 --dropout 0.1".
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
MODE=${1:-all}
BIN=${CUDA_CHECK_BIN:-$ROOT/target/cuda-check/cuda_check}

build() {
    if [ -z "${CUDA_HOME:-}" ] && ! command -v nvcc >/dev/null 2>&1; then
        local dir=${CUDA_TOOLKIT_DIR:-$ROOT/../cuda-toolkit}
        echo "cuda_check: no CUDA toolkit found; building one from PyPI wheels in $dir" >&2
        eval "$("$ROOT/../shared/tools/cuda-toolkit-from-pypi.sh" "$dir")"
    fi
    export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
    export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/../target-cuda}
    local started=$SECONDS
    # nice: a from-scratch build of candle's CUDA kernels takes long and should not starve other work.
    # The engine alone: the service only forwards its `cuda` feature, and skipping its dependencies
    # (sqlx, axum, the AWS SDK) halves a from-scratch build.
    nice -n 10 cargo build --release -p compressd-engine --features cuda --example cuda_check
    echo "cuda_check: build took $((SECONDS - started)) s" >&2
    mkdir -p "$(dirname "$BIN")"
    cp "$CARGO_TARGET_DIR/release/examples/cuda_check" "$BIN"
    # Line tables only matter for backtraces; stripping keeps the binary small enough to carry.
    strip "$BIN" 2>/dev/null || true
    ls -l "$BIN" >&2
}

run() {
    [ -x "$BIN" ] || { echo "cuda_check: $BIN missing; run '$0 build' first" >&2; exit 1; }
    if [ -z "${CUDA_LIB_DIR:-}" ]; then
        local cublas
        cublas=$(find / -name 'libcublas.so.13*' -not -path '*/proc/*' 2>/dev/null | head -1 || true)
        CUDA_LIB_DIR=${cublas:+$(dirname "$cublas")}
    fi
    if [ -n "${CUDA_LIB_DIR:-}" ]; then
        export LD_LIBRARY_PATH=$CUDA_LIB_DIR${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    else
        echo "cuda_check: no libcublas.so.13 found; relying on the default library path" >&2
    fi
    nvidia-smi --query-gpu=name,driver_version,memory.used,memory.total --format=csv || true
    # shellcheck disable=SC2086 # CUDA_CHECK_ARGS is a list of flags
    "$BIN" ${CUDA_CHECK_ARGS:-}
    # The PyTorch eager reference in the same run (f32, then bf16 and f16 autocast), BERT-base batch 32 x 128,
    # where the GPU machine has torch with CUDA; it cannot be carried there (too large).
    local py=${PYTHON:-python3}
    if "$py" -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
        "$py" bench/pytorch_train_step.py --size base --batch 32 --seq 128 --device cuda --steps 10 --warmup 3
        "$py" bench/pytorch_train_step.py --size base --batch 32 --seq 128 --device cuda --steps 10 --warmup 3 --autocast bf16
        "$py" bench/pytorch_train_step.py --size base --batch 32 --seq 128 --device cuda --steps 10 --warmup 3 --autocast f16
    else
        echo "cuda_check: no python with CUDA torch here; the PyTorch reference is not measured" >&2
    fi
}

case $MODE in
    build) build ;;
    run) run ;;
    all) build && run ;;
    *) echo "usage: $0 [build|run|all]" >&2; exit 2 ;;
esac
