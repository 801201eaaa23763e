#!/bin/bash
# Issue 14's study: SST-2 (7 cells + 2 recipe candidates, 3 seeds) and STS-B (2 cells, 3 seeds) with
# all-MiniLM-L6-v2, one run at a time; then the tables and plots copied into docs/.
#   scripts/study_results.sh MINILM_DIR [RUNS_DIR]      (re-run it to resume a killed study)
set -euo pipefail
MINILM=${1:?usage: scripts/study_results.sh MINILM_DIR [RUNS_DIR]}
RUNS=${2:-runs}
cd "$(dirname "$0")/.."
python -m rome_flax study --config configs/study_sst2.py --model "$MINILM" --data_dir ../shared/glue/SST-2 \
    --output_dir "$RUNS/study/sst2"
python -m rome_flax study --config configs/study_stsb.py --model "$MINILM" --data_dir ../shared/glue/STS-B \
    --output_dir "$RUNS/study/stsb"
cp "$RUNS/study/sst2/tradeoff.png" docs/study_sst2_tradeoff.png
cp "$RUNS/study/stsb/tradeoff.png" docs/study_stsb_tradeoff.png
cp "$RUNS/study/stsb/patience.png" docs/study_stsb_patience.png
echo "tables: $RUNS/study/sst2/tables.md $RUNS/study/stsb/tables.md"
