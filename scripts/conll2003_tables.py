"""docs/results.md's CoNLL-2003 tables from the infer.py outputs of scripts/conll2003_results.sh.

At a target speed-up, a criterion's figure is the best F1 among its settings that reach at least
99% of that speed-up (no interpolation: a setting that was run); the static exit is the model cut to
k layers, k the largest that reaches it.

  python scripts/conll2003_tables.py [RUNS_DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

METHODS = ("final_only", "joint_weighted", "romebert", "self_sampling")


def load(runs: Path, method: str, split: str, name: str):
  """A table of a run's evaluation; sweep and TOKEE rows also from its `_extra` evaluation (more
  settings, no speed measurement), a setting found in both counted once."""
  rows = None
  for suffix in ("", "_extra"):
    path = runs / f"conll_{method}_{split}{suffix}" / f"{name}.json"
    if path.is_file() and (suffix == "" or name in ("sweep", "tokee")):
      got = json.loads(path.read_text())
      if rows is None or not isinstance(got, list):
        rows = got
      else:
        seen = {r["setting"] for r in rows}
        rows = rows + [r for r in got if r["setting"] not in seen]
  return rows


def best_at(rows, speed: str, target: float):
  ok = [r for r in rows or [] if r[speed] >= 0.99 * target]   # 1% slack: static@3 is 1.999x FLOPs
  return max(ok, key=lambda r: r["f1"]) if ok else None


def cell(row, speed: str) -> str:
  return "-" if row is None else f"{row['f1']:.1f} ({row[speed]:.2f}x)"


def main(runs: Path) -> None:
  print("### Per-exit F1 (entity-level, conlleval), dev / test\n")
  print("| method | split | " + " | ".join(f"exit {k}" for k in range(1, 7)) + " |")
  print("|---|---|" + "---|" * 6)
  for method in METHODS:
    for split in ("dev", "test"):
      per_exit = load(runs, method, split, "per_exit")
      if per_exit:
        print(f"| {method} | {split} | " + " | ".join(f"{r['f1']:.1f}" for r in per_exit) + " |")

  print("\n### SENTEE against the static exit at equal layer ratio (best setting reaching the ratio)\n")
  print("| method | split | SENTEE 1.5x | static 1.5x | SENTEE 2x | static 2x |")
  print("|---|---|---|---|---|---|")
  for method in METHODS:
    for split in ("dev", "test"):
      sweep, static = load(runs, method, split, "sweep"), load(runs, method, split, "static")
      if sweep and static:
        cells = []
        for target in (1.5, 2.0):
          cells += [cell(best_at(sweep, "layer_ratio", target), "layer_ratio"),
                    cell(best_at(static, "layer_ratio", target), "layer_ratio")]
        print(f"| {method} | {split} | " + " | ".join(cells) + " |")

  print("\n### At 2x and 3x FLOPs speed-up: SENTEE, TOKEE, TOKEE after self-sampling, static exit\n")
  print("| split | full model | SENTEE 2x | TOKEE 2x | TOKEE+SS 2x | static 2x | SENTEE 3x | TOKEE 3x | "
        "TOKEE+SS 3x | static 3x |")
  print("|---|---|---|---|---|---|---|---|---|---|")
  for split in ("dev", "test"):
    stage1, ss = "joint_weighted", "self_sampling"
    per_exit = load(runs, stage1, split, "per_exit")
    if not per_exit:
      continue
    cells = [f"{per_exit[-1]['f1']:.1f}"]
    for target in (2.0, 3.0):
      cells += [cell(best_at(load(runs, stage1, split, "sweep"), "flops_ratio", target), "flops_ratio"),
                cell(best_at(load(runs, stage1, split, "tokee"), "flops_ratio", target), "flops_ratio"),
                cell(best_at(load(runs, ss, split, "tokee"), "flops_ratio", target), "flops_ratio"),
                cell(best_at(load(runs, stage1, split, "static"), "flops_ratio", target), "flops_ratio")]
    print(f"| {split} | " + " | ".join(cells) + " |")
  ss_exit = load(runs, "self_sampling", "dev", "per_exit")
  if ss_exit:
    print(f"\n(self-sampling's own full model, dev: {ss_exit[-1]['f1']:.1f})")

  print("\n### Measured wall clock (speed.json of each run: its fastest setting within 1 F1 of its final exit)\n")
  cols = ("setting", "flops_ratio", "throughput_speedup_b64", "latency_speedup_b1", "exits_match_offline")
  print("| method | split | " + " | ".join(cols) + " |")
  print("|---|---|" + "---|" * len(cols))
  for method in METHODS:
    for split in ("dev", "test"):
      for r in load(runs, method, split, "speed") or []:
        print(f"| {method} | {split} | " + " | ".join(
            f"{r[c]:.2f}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols) + " |")


def plot(runs: Path, split: str, out: Path) -> None:
  """F1 against FLOPs speed-up: SENTEE and TOKEE of the stage-1 model, TOKEE after self-sampling, the
  static exit; crosses: measured wall-clock speed-ups at batch 64."""
  sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
  from rome_flax import report
  rows, measured = [], []
  for method, kind, label in (("joint_weighted", "sweep", "SENTEE"), ("joint_weighted", "tokee", "TOKEE"),
                              ("self_sampling", "tokee", "TOKEE + self-sampling"),
                              ("joint_weighted", "static", "static exit")):
    got = load(runs, method, split, kind) or []
    rows += [{**r, "criterion": label} for r in got]
    speed = {r["setting"]: r for r in load(runs, method, split, "speed") or []}
    measured += [(r["f1"], speed[r["setting"]]["throughput_speedup_b64"]) for r in got if r["setting"] in speed]
  per_exit = load(runs, "joint_weighted", split, "per_exit")
  if rows and per_exit:
    report.plot_tradeoff(out, rows, "f1", final_metric=per_exit[-1]["f1"], speed="flops_ratio", measured=measured,
                         measured_label="measured speed-up, batch 64")
    print(f"\nwrote {out}")


if __name__ == "__main__":
  runs = Path(sys.argv[1] if len(sys.argv) > 1 else "runs")
  main(runs)
  for split in ("dev", "test"):
    plot(runs, split, runs / f"conll_tradeoff_{split}.png")
