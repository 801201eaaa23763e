#!/usr/bin/env bash
# Reproduces docs/results.md's CoNLL-2003 tables (sequence labelling, issue: SENTEE / TOKEE).
# Usage: scripts/conll2003_results.sh MINILM_DIR [RUNS_DIR]   (2 CPU cores: ~1.5 h; one job at a time)
set -euo pipefail
cd "$(dirname "$0")/.."
MODEL=${1:?usage: scripts/conll2003_results.sh MINILM_DIR [RUNS_DIR]}
RUNS=${2:-runs}
DATA=../shared/conll2003
train() {  # method, extra options
  local m=$1; shift
  [ -d "$RUNS/conll_$m/export" ] || python train.py --config configs/conll2003_minilm.py --model "$MODEL" \
      --data_dir "$DATA" --method "$m" --output_dir "$RUNS/conll_$m" --no_progress "$@"
}
evaluate() {  # method, split, extra options
  local m=$1 split=$2; shift 2
  [ -f "$RUNS/conll_${m}_$split/summary.json" ] || python infer.py --checkpoint "$RUNS/conll_$m/export" \
      --data_dir "$DATA" --split "$split" --output_dir "$RUNS/conll_${m}_$split" --overwrite --no_progress "$@"
}
train romebert
train joint_weighted
train final_only
# TOKEE's stage 2 on the finished joint_weighted run: heads at 1e-4, encoder at 1e-5, one epoch with
# the encoder frozen, then one with it trained (the reference: 2 + 28).
[ -d "$RUNS/conll_self_sampling/export" ] || python train.py --config configs/conll2003_minilm.py \
    --model "$RUNS/conll_joint_weighted/export" --data_dir "$DATA" --method self_sampling --learning_rate 1e-4 \
    --encoder_lr_scale 0.1 --epochs 1 --output_dir "$RUNS/conll_self_sampling" --no_progress
TOKEE=(--tokee_windows 1,3,5 --tokee_thresholds 0.02,0.05,0.1,0.2,0.3,0.5)
for split in dev test; do
  evaluate romebert "$split"
  evaluate final_only "$split"
  evaluate joint_weighted "$split" "${TOKEE[@]}"
  evaluate self_sampling "$split" "${TOKEE[@]}"
done
python scripts/conll2003_tables.py "$RUNS"
