#!/usr/bin/env bash
# Structured pruning comparison (issue 13) on MiniLM / BBC News: one fine-tuned model, then the same
# 40% cut of heads and FFN neurons (min_keep 2, 8 calibration batches, a 1-epoch recovery after each
# step) with one setting changed at a time:
#   importance  l1 | taylor | activation | mask (layer_adaptive, 4 steps)
#   schedule    one-shot (1 step) | iterative (4 steps)   (taylor, layer_adaptive)
#   scope       global | per_layer | layer_adaptive       (taylor, 4 steps)
# The fine-tune runs once (`compressd run`, 2 epochs, seed 7) and every variant starts from its saved
# folder, so all see the same model, data (256 training rows, 240 test rows, 128 tokens) and seed.
# Prints one line per variant from its report.json (accuracy and macro-F1 against the fine-tuned
# model's, parameters, batch-1 and batch-32 speed-up, wall time) for the BENCHMARKS.md table.
#
#   cargo build --release --bin compressd && bench/structured_comparison.sh
#
# Environment: SHARED (default ../shared), OUT (default target/structured-comparison), BIN (default
# $CARGO_TARGET_DIR or target, /release/compressd), VARIANTS (default: all seven below).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
OUT=${OUT:-target/structured-comparison}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/compressd}
VARIANTS=${VARIANTS:-l1 taylor activation mask one-shot global per-layer}
MODEL=$(realpath "$SHARED/models/all-MiniLM-L6-v2")
DATA=$(realpath "$SHARED/data/bbc_news/bbc_news.jsonl")
TASK="{\"type\": \"text_classification\", \"dataset\": \"$DATA\", \"max_length\": 128,
       \"max_train_samples\": 256, \"max_eval_samples\": 240}"
mkdir -p "$OUT"

# importance scope steps of each variant ("taylor" is the iterative, layer-adaptive reference).
settings() {
    case "$1" in
        l1)         echo "l1 layer_adaptive 4" ;;
        taylor)     echo "taylor layer_adaptive 4" ;;
        activation) echo "activation layer_adaptive 4" ;;
        mask)       echo "mask layer_adaptive 4" ;;
        one-shot)   echo "taylor layer_adaptive 1" ;;
        global)     echo "taylor global 4" ;;
        per-layer)  echo "taylor per_layer 4" ;;
        *) echo "unknown variant $1" >&2; exit 2 ;;
    esac
}

echo "# $(lscpu | grep 'Model name' | sed 's/ \+/ /g'), $(nproc) cores, load: $(cut -d' ' -f1-3 /proc/loadavg)"
tuned="$OUT/finetuned"
if [ ! -f "$tuned/run/final/config.json" ]; then
    mkdir -p "$tuned"
    cat > "$tuned/spec.json" <<JSON
{"name": "minilm-bbc-finetune", "model": "$MODEL", "seed": 7, "task": $TASK,
 "pipeline": [{"type": "finetune", "epochs": 2, "learning_rate": 1e-4, "head_learning_rate": 3e-3,
               "batch_size": 16}]}
JSON
    "$BIN" run "$tuned/spec.json" --out "$tuned/run" 2> "$tuned/events.log"
fi
TUNED=$(realpath "$tuned/run/final")
for variant in $VARIANTS; do
    read -r importance scope steps <<< "$(settings "$variant")"
    dir="$OUT/$variant"
    mkdir -p "$dir"
    cat > "$dir/spec.json" <<JSON
{"name": "minilm-bbc-structured-$variant", "model": "$TUNED", "seed": 7, "task": $TASK,
 "pipeline": [
   {"type": "prune", "pattern": "structured", "importance": "$importance", "scope": "$scope",
    "sparsity": 0.4, "min_keep": 2, "steps": $steps, "calibration_batches": 8,
    "recover": {"epochs": 1, "learning_rate": 5e-5}}
 ]}
JSON
    started=$(date +%s)
    "$BIN" run "$dir/spec.json" --out "$dir/run" 2> "$dir/events.log"
    python3 - "$variant" "$dir/run/report.json" "$(( $(date +%s) - started ))" <<'PY'
import json, sys
variant, path, wall = sys.argv[1], sys.argv[2], sys.argv[3]
report = json.load(open(path))
base, pruned = report["baseline"]["metrics"], report["stages"][0]["metrics"]
details = report["stages"][0]["details"]
kept = {s: "/".join(str(len(l["kept"])) for l in details["layers"] if l["structure"] == s)
        for s in ("heads", "neurons")}
drop = 100 * (base["accuracy"] - pruned["accuracy"])
print(f"{variant:10s} {details['importance']:10s} {details['scope']:14s} steps {details['steps']}  "
      f"acc {pruned['accuracy']:.4f} (fine-tuned {base['accuracy']:.4f}, drop {drop:+.2f} pts)  "
      f"F1 {pruned['macro_f1']:.4f}  params {pruned['parameters'] / 1e6:.1f} M  "
      f"batch-1 {base['latency_batch1_ms'] / pruned['latency_batch1_ms']:.2f}x  "
      f"batch-32 {base['latency_batch32_ms'] / pruned['latency_batch32_ms']:.2f}x  "
      f"heads {kept['heads']}  neurons {kept['neurons']}  wall {wall} s")
PY
done
