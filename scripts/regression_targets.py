"""The seeded comparison behind `--regression_targets` (docs/results.md, "Regression targets").

RomeBERT SD+GR (mean pooling) on the first 800 STS-B train rows (100 steps, batch 8, lr 5e-5), each target
mode x seed, then the dev Pearson of every exit as mean +- std over seeds. One run at a time (2 cores).

  python scripts/regression_targets.py --model MINILM_DIR --data_dir ../shared/glue/STS-B --out runs/targets
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--model", required=True)
  ap.add_argument("--data_dir", required=True)
  ap.add_argument("--out", default="runs/regression_targets")
  ap.add_argument("--modes", default="standardize,bias_init,raw")
  ap.add_argument("--seeds", default="0,1,2")
  ap.add_argument("--train_rows", type=int, default=800)
  args = ap.parse_args()
  table = {}
  for mode in args.modes.split(","):
    for seed in args.seeds.split(","):
      run = Path(args.out) / f"{mode}_s{seed}"
      if not (run / "export").is_dir():
        subprocess.run([sys.executable, str(ROOT / "train.py"), "--model", args.model, "--task", "sts-b",
                        "--data_dir", args.data_dir, "--train_rows", str(args.train_rows), "--max_length", "128",
                        "--batch_size", "8", "--epochs", "1", "--learning_rate", "5e-5", "--exit_pooling", "mean",
                        "--method", "romebert", "--gr", "projection", "--regression_targets", mode, "--seed", seed,
                        "--save_every", "1000", "--log_every", "50", "--output_dir", str(run), "--no_progress",
                        *(["--overwrite"] if run.exists() else [])],   # a run that failed before its export
                       check=True)
      meta = json.loads((run / "export" / "rome_flax_config.json").read_text())["metadata"]
      table.setdefault(mode, []).append([e["pearson"] for e in meta["dev_metrics"]["dev"]])
  print("| regression_targets | seeds | " + " | ".join(f"exit {i + 1}" for i in range(len(next(iter(table.values()))[0])))
        + " |")
  print("|---|---|" + "---|" * len(next(iter(table.values()))[0]))
  for mode, rows in table.items():
    a = np.asarray(rows)
    cells = " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in zip(a.mean(0), a.std(0, ddof=1) if len(a) > 1 else 0 * a[0]))
    print(f"| {mode} | {len(a)} | {cells} |")


if __name__ == "__main__":
  main()
