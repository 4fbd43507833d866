#!/usr/bin/env bash
# Distillation ablation (issue 12) on MiniLM / BBC News: the same 3-layer student of the same
# fine-tuned teacher, the same data and seed, trained on
#   task      the task loss alone (no teacher knowledge),
#   response  + response knowledge,
#   feature   + feature knowledge (hidden states, MSE, uniform layer map),
#   relation  + relation knowledge (batch similarity matrices, MSE),
#   all       all three,
# each with `compressd run`, one folder per variant under OUT. Prints one line per variant (student
# accuracy, teacher accuracy, share kept, batch-32 speed-up) from its report.json, for the
# BENCHMARKS.md table. Data capped as in the acceptance tests (256 training rows, 240 test rows,
# 128 tokens, seed 7). Each variant fine-tunes its own teacher (same seed, so the same teacher).
#
#   cargo build --release --bin compressd && bench/distill_ablation.sh
#
# Environment: SHARED (default ../shared), OUT (default target/distill-ablation), BIN (default
# $CARGO_TARGET_DIR or target, /release/compressd), VARIANTS (default "task response feature
# relation all"), EPOCHS (distillation epochs, default 3).
set -euo pipefail
cd "$(dirname "$0")/.."
SHARED=${SHARED:-../shared}
OUT=${OUT:-target/distill-ablation}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/compressd}
VARIANTS=${VARIANTS:-task response feature relation all}
EPOCHS=${EPOCHS:-3}
MODEL=$(realpath "$SHARED/models/all-MiniLM-L6-v2")
DATA=$(realpath "$SHARED/data/bbc_news/bbc_news.jsonl")
mkdir -p "$OUT"

weights() {
    case "$1" in
        task)     echo '{"task": 1.0}' ;;
        response) echo '{"task": 0.5, "response": 0.5}' ;;
        feature)  echo '{"task": 0.5, "response": 0.5, "feature": 0.1}' ;;
        relation) echo '{"task": 0.5, "response": 0.5, "relation": 0.5}' ;;
        all)      echo '{"task": 0.5, "response": 0.5, "feature": 0.1, "relation": 0.5}' ;;
        *) echo "unknown variant $1" >&2; exit 2 ;;
    esac
}

echo "# $(lscpu | grep 'Model name' | sed 's/ \+/ /g'), $(nproc) cores, load: $(cut -d' ' -f1-3 /proc/loadavg)"
for variant in $VARIANTS; do
    dir="$OUT/$variant"
    mkdir -p "$dir"
    cat > "$dir/spec.json" <<JSON
{"name": "minilm-bbc-distill-$variant", "model": "$MODEL", "seed": 7,
 "task": {"type": "text_classification", "dataset": "$DATA", "max_length": 128,
          "max_train_samples": 256, "max_eval_samples": 240},
 "pipeline": [
   {"type": "finetune", "epochs": 2, "learning_rate": 1e-4, "head_learning_rate": 3e-3, "batch_size": 16},
   {"type": "distill", "student_layers": 3, "layer_init": "every_other", "epochs": $EPOCHS,
    "learning_rate": 1e-4, "temperature": 2.0, "weights": $(weights "$variant")}
 ],
 "acceptance": {"metric": "accuracy", "max_relative_drop": 0.02}}
JSON
    started=$(date +%s)
    "$BIN" run "$dir/spec.json" --out "$dir/run" 2> "$dir/events.log"
    python3 - "$variant" "$dir/run/report.json" "$(( $(date +%s) - started ))" <<'PY'
import json, sys
variant, path, wall = sys.argv[1], sys.argv[2], sys.argv[3]
c = json.load(open(path))["stages"][1]["details"]["teacher_and_student"]
print(f"{variant:9s} student {c['student']['metric']:.4f}  teacher {c['teacher']['metric']:.4f}  "
      f"kept {100 * c['metric_kept']:.1f}%  batch-32 {c['speedup_batch32']:.2f}x  wall {wall} s")
PY
done
