"""The README's default run over seeds: is its result a property of the config or of the seed? (issue 22, item 4)

Trains configs/default.py (plus any `key=value` overrides) once per seed into a scratch directory and prints each
seed's dev accuracy per exit, then per exit the mean, std and spread (max - min) over seeds, and the training time.

  python scripts/default_seeds.py --seeds 0,1,2,3,4 --out /tmp/default_seeds [learning_rate=2e-3 ...]
"""

from __future__ import annotations

import argparse
import hashlib
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> None:
  from bench._common import cpu_model
  from rome_flax.train import trainer, train_config
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--seeds", default="0,1,2,3,4")
  ap.add_argument("--out", default="/tmp/default_seeds")
  ap.add_argument("--config", default=str(ROOT / "configs" / "default.py"))
  ap.add_argument("overrides", nargs="*", help="key=value TrainConfig overrides")
  args = ap.parse_args()
  cfg = train_config.load_config_file(args.config)
  over = dict(kv.split("=", 1) for kv in args.overrides)
  cfg = cfg.replace(**{k: train_config.parse_value(k, v) for k, v in over.items()})
  tag = ",".join(args.overrides) or "as configured"
  print("cpu:", cpu_model())
  rows, seconds = [], []
  for seed in [int(s) for s in args.seeds.split(",")]:
    out = Path(args.out) / f"{hashlib.sha1(tag.encode()).hexdigest()[:8]}_s{seed}"
    t0 = time.perf_counter()
    res = trainer.train(cfg.replace(seed=seed, output_dir=str(out)), progress=False, overwrite=out.exists())
    seconds.append(time.perf_counter() - t0)
    rows.append([e["accuracy"] for e in res["dev"]])
    print(f"seed {seed}: " + " ".join(f"{a:.1f}" for a in rows[-1]) + f"  ({seconds[-1]:.0f} s)", flush=True)
  a = np.asarray(rows)
  print(f"\n{tag}: {len(a)} seeds, train + eval {np.mean(seconds):.0f} s per run")
  print("| exit | " + " | ".join(str(i + 1) for i in range(a.shape[1])) + " |")
  print("|---|" + "---|" * a.shape[1])
  print("| mean ± std | " + " | ".join(f"{m:.1f} ± {s:.1f}" for m, s in zip(a.mean(0), a.std(0, ddof=1))) + " |")
  print("| spread (max - min) | " + " | ".join(f"{x:.1f}" for x in a.max(0) - a.min(0)) + " |")


if __name__ == "__main__":
  main()
