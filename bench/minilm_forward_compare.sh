#!/usr/bin/env bash
# MiniLM forward pass, ours against PyTorch eager, alternating for ROUNDS rounds so both see the same
# machine (issue 16's "MiniLM forward ≤ 1.0x PyTorch" bar). Ours also prints candle-transformers and
# our int8 in the same process.
#
#   cargo build --release -p compressd-engine --example minilm_latency
#   PYTHON=~/.cache/compressd-pyenv/bin/python bench/minilm_forward_compare.sh
#
# Env: SHARED (default ../shared), PYTHON (python3), ROUNDS (3), RUNS (10), BIN (the release example).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
PYTHON=${PYTHON:-python3}
ROUNDS=${ROUNDS:-3}
RUNS=${RUNS:-10}
BIN=${BIN:-target/release/examples/minilm_latency}
echo "machine: $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores;" \
  "isa cap: ${COMPRESSD_CPU_ISA:-none}; $(date -u +%FT%TZ)"
for round in $(seq 1 "$ROUNDS"); do
  echo "## round $round (load $(cut -d' ' -f1 /proc/loadavg))"
  COMPRESSD_SHARED="$SHARED" "$BIN" --runs "$RUNS" --warmup 2 | grep '^| batch'
  "$PYTHON" bench/pytorch_minilm_forward.py "$SHARED/models/all-MiniLM-L6-v2" \
    "$SHARED/data/bbc_news/bbc_news.jsonl" --runs "$RUNS" 2>/dev/null
done
