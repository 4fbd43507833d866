#!/usr/bin/env bash
# Activation recomputation (`gradient_checkpointing`) against the plain step, ours and PyTorch's
# (torch.utils.checkpoint per layer), on the bench/train_step config at a long sequence: step time
# by phase and the process's peak RSS, ROUNDS interleaved rounds. Build the Rust side first:
#   cargo build --release -p compressd-engine --example train_step
# Needs python3 with torch for the reference side (PYTHON=...).
set -euo pipefail
cd "$(dirname "$0")/.."
ROUNDS=${ROUNDS:-3}
STEPS=${STEPS:-3}
SEQ=${SEQ:-512}
DROPOUT=${DROPOUT:-0.1}
BIN=${BIN:-target/release/examples/train_step}
PY=${PYTHON:-python3}
echo "# $(lscpu | grep 'Model name' | sed 's/ \+/ /g'), $(nproc) cores, load: $(cut -d' ' -f1-3 /proc/loadavg)"
for _ in $(seq "$ROUNDS"); do
  "$BIN" --steps "$STEPS" --warmup 1 --seq "$SEQ" --dropout "$DROPOUT"
  "$BIN" --steps "$STEPS" --warmup 1 --seq "$SEQ" --dropout "$DROPOUT" --checkpointing true
  "$PY" bench/pytorch_train_step.py --steps "$STEPS" --warmup 1 --seq "$SEQ" --dropout "$DROPOUT"
  "$PY" bench/pytorch_train_step.py --steps "$STEPS" --warmup 1 --seq "$SEQ" --dropout "$DROPOUT" --checkpointing
done
echo "# load after: $(cut -d' ' -f1-3 /proc/loadavg)"
