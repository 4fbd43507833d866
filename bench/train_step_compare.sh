#!/usr/bin/env bash
# Runs the candle and PyTorch training-step benchmarks alternately, ROUNDS times each, so that both
# see the same machine load; prints one JSON line per run. Build the Rust side first (see the doc
# comment of bench/train_step.rs). Needs python3 with torch for the reference side.
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
STEPS=${STEPS:-5}
BIN=${BIN:-target/debug/examples/train_step}
echo "# $(lscpu | grep 'Model name' | sed 's/ \+/ /g'), $(nproc) cores, load: $(cut -d' ' -f1-3 /proc/loadavg)"
for _ in $(seq "$ROUNDS"); do
  "$BIN" --steps "$STEPS" --warmup 2
  "${PYTHON:-python3}" bench/pytorch_train_step.py --steps "$STEPS" --warmup 2
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
