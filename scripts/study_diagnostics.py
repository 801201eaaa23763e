"""Why a final exit lags: per study cell, mean over seeds of the train-time final-exit loss and highway loss
over the last half of the first stage's steps, and GR's statistics (cosine of the two gradient groups, their
norms, the share of steps projected), read from each run's metrics.jsonl. The logged terms are each method's own (PABEE's final term is weighted
by L / sum l, a recipe's highway term by its highway_weight), so compare raw CE within one method only.

  python scripts/study_diagnostics.py runs/study/sst2
"""

import json
import sys
from pathlib import Path

import numpy as np

KEYS = ("loss_final", "loss_highway", "gr_cos", "gr_norm_a", "gr_norm_b", "gr_projected")


def run_stats(metrics: Path) -> dict:
  rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
  train = [r for r in rows if r.get("kind") == "train" and "loss_final" in r]
  # Stage 1 only (DeeBERT's stage 2 trains the highways alone; its final loss is then 0).
  stage1 = [r for r in train if r["loss_final"] > 0 or "gr_cos" in r]
  tail = stage1[len(stage1) // 2:]
  return {k: float(np.mean([r[k] for r in tail])) for k in KEYS if tail and k in tail[0]}


def main(study_dir: str) -> None:
  root = Path(study_dir)
  print("| cell | seeds | " + " | ".join(KEYS) + " |\n|" + "---|" * (len(KEYS) + 2))
  for cell in sorted(p for p in root.iterdir() if p.is_dir()):
    stats = [run_stats(m) for m in sorted(cell.glob("seed*/train/metrics.jsonl"))]
    if not stats:
      continue
    cols = [f"{np.mean([s[k] for s in stats if k in s]):.3f}" if any(k in s for s in stats) else "-" for k in KEYS]
    print(f"| {cell.name} | {len(stats)} | " + " | ".join(cols) + " |")


if __name__ == "__main__":
  main(sys.argv[1] if len(sys.argv) > 1 else "runs/study/sst2")
