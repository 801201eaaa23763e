"""`python -m rome_flax calibrate`: early-exit thresholds with a statistical guarantee, written to thresholds.json.

One all-exits pass over a calibration slice (`evaluation.all_exits`, the sweep's cache), every candidate
setting of one criterion replayed on it (`calibration.decision_table`), one setting chosen for a target
(`calibration.choose`: consistency, risk or speed) and written with the export's identity, which
`infer.py --thresholds_file` checks before running exactly that setting. The model, task and data are
read by infer.py's own functions (`infer_cli.load_model`, `resolve_task`, `load_examples`).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional

from rome_flax import cli, infer_cli
from rome_flax.engine import calibration, evaluation
from rome_flax.engine import exit_policy as ep
from rome_flax.errors import RomeFlaxError
from rome_flax.kinds import data, token_data
from rome_flax.kinds.kind import kind_of


def build_parser() -> cli.ArgumentParser:
  ap = cli.ArgumentParser(prog="python -m rome_flax calibrate",
                          description="Early-exit thresholds with a statistical guarantee -> thresholds.json "
                          "(read by infer.py --thresholds_file).")
  ap.add_argument("--checkpoint", required=True, help="a rome_flax export (train.py's runs/NAME/export)")
  infer_cli.add_data_arguments(ap, "train", "the calibration split: pass --skip_rows past the rows the export "
                               "trained on (train.py --train_rows), so calibration rows are unseen")
  ap.add_argument("--skip_rows", type=int, default=0, help="first row of the calibration slice")
  ap.add_argument("--rows", type=int, help="rows in the calibration slice (default: the rest of the split)")
  ap.add_argument("--criterion", default="entropy", help=f"one of {', '.join(calibration.CRITERIA)}")
  ap.add_argument("--target", required=True, choices=calibration.TARGETS)
  ap.add_argument("--epsilon", type=float, help="consistency: allowed disagreement probability; risk: allowed "
                  "probability that the guarantee fails")
  ap.add_argument("--delta", type=float, help="risk: the allowed expected loss (accuracy drop / disagreement)")
  ap.add_argument("--loss", default="accuracy", choices=calibration.RISK_LOSSES,
                  help="risk: accuracy (early wrong, final right; needs labels) or disagreement")
  ap.add_argument("--p_value", default="hoeffding", choices=calibration.P_VALUES)
  ap.add_argument("--speedup", type=float, help="speed: the layer (or FLOPs) ratio to reach")
  ap.add_argument("--speed_measure", default="layer", choices=calibration.SPEED_MEASURES)
  ap.add_argument("--tolerance", type=float, help="regression: |early - final| <= tolerance counts as agreement")
  ap.add_argument("--patience_delta", type=float, help="regression patience: |change| below which predictions "
                  "agree (infer.py's --delta)")
  ap.add_argument("--pool", choices=ep.POOLS, help="token tasks (SENTEE): pool the words' uncertainties by max / avg")
  ap.add_argument("--window", type=int, help="TOKEE: the odd window size (default 3)")
  ap.add_argument("--upper_scale", type=float, default=2.0, help="TOKEE: threshold scale in the upper half")
  ap.add_argument("--min_exit_layer", type=int, default=1, help="no example exits before this layer")
  ap.add_argument("--grid", type=int, default=calibration.DEFAULT_GRID, help="candidate thresholds (entropy, "
                  "maxprob, tokee)")
  ap.add_argument("--batch_size", type=int, default=64, help="examples per batch of the all-exits pass")
  ap.add_argument("--max_length", type=int, help="default: the export's max_length, else 128")
  ap.add_argument("--output", default="thresholds.json", help="the thresholds file to write")
  ap.add_argument("--overwrite", action="store_true", help="replace an existing --output file")
  ap.add_argument("--no_progress", action="store_true", help="no progress bars (a heartbeat line instead)")
  return ap


def check_options(args) -> Path:
  """Everything that needs no model or data, before anything is loaded; returns the output path."""
  if args.criterion not in calibration.CRITERIA:
    raise RomeFlaxError(f"unknown criterion {args.criterion!r}; choose one of {', '.join(calibration.CRITERIA)}")
  if args.target in ("consistency", "risk"):
    if args.epsilon is None:
      raise RomeFlaxError(f"--target {args.target} needs --epsilon")
    calibration.check_level("epsilon", args.epsilon)
  if args.target == "risk":
    if args.delta is None:
      raise RomeFlaxError("--target risk needs --delta")
    calibration.check_level("delta", args.delta)
  if args.target == "speed" and args.speedup is None:
    raise RomeFlaxError("--target speed needs --speedup")
  if args.skip_rows < 0:
    raise RomeFlaxError(f"--skip_rows must be >= 0, got {args.skip_rows}")
  if args.rows is not None and args.rows < 1:
    raise RomeFlaxError(f"--rows must be >= 1, got {args.rows}")
  evaluation.check_options(batch_size=args.batch_size, measure_speed="none")
  out = Path(os.path.expanduser(args.output)) if args.output else None
  if out is None:
    raise RomeFlaxError("--output is empty")
  if out.is_dir():
    raise RomeFlaxError(f"--output {args.output} is a directory; name a file")
  if out.exists() and not args.overwrite:
    raise RomeFlaxError(f"--output {args.output} exists; pass --overwrite or choose another file")
  return out


def calibration_slice(examples, skip: int, rows: Optional[int]) -> list:
  """Rows skip..skip+rows-1 of a split (or of a stream of chunks) as a list of chunks."""
  stop = None if rows is None else skip + rows
  if isinstance(examples, (data.Split, token_data.TokenSplit)):
    examples = [examples]
  chunks, seen = [], 0
  for chunk in examples:
    n = len(chunk)
    lo, hi = max(skip - seen, 0), n if stop is None else min(stop - seen, n)
    if lo < hi:
      chunks.append(chunk.rows(lo, hi))
    seen += n
    if stop is not None and seen >= stop:
      break
  if not chunks or (stop is not None and seen < stop):
    raise RomeFlaxError(f"--skip_rows {skip} --rows {rows if rows is not None else 'all'}: the split has only "
                        f"{seen} rows")
  return chunks


def run(args) -> dict:
  from tqdm.auto import tqdm

  out = check_options(args)
  model = infer_cli.load_model(args.checkpoint)
  identity = calibration.export_identity(args.checkpoint)
  infer_cli.check_max_length(args.max_length, model)
  task = infer_cli.resolve_task(args, model)
  cfg = model.config
  calibration.check_target(cfg, args.target, loss=args.loss, tolerance=args.tolerance, p_value=args.p_value)
  grid = calibration.make_grid(args.criterion, cfg, size=args.grid, min_exit_layer=args.min_exit_layer,
                               delta=args.patience_delta, pool=args.pool, window=args.window,
                               upper_scale=args.upper_scale)
  loader = argparse.Namespace(**{**vars(args), "limit": None})
  chunks = calibration_slice(infer_cli.load_examples(loader, task), args.skip_rows, args.rows)
  labelled = all(kind_of(task).labelled(c) for c in chunks)
  if args.target == "risk" and args.loss == "accuracy" and not labelled:
    raise RomeFlaxError(f"split {args.split!r} has no labels: risk control with the accuracy loss needs labels "
                        "(pass a labelled --split, or --loss disagreement)")
  if args.split == "train" and args.skip_rows == 0:
    print("note: calibrating on train rows from row 0: if the export trained on them, pass --skip_rows past its "
          "--train_rows (calibration rows must be unseen for the guarantee)")
  progress = lambda desc: (lambda it: tqdm(it, desc=desc, unit="batch", disable=args.no_progress, dynamic_ncols=True))
  cache = evaluation.all_exits(model, task, iter(chunks), batch_size=args.batch_size, max_length=args.max_length,
                               progress=progress)
  table = calibration.decision_table(grid, cache.exit_logits, cfg, task, cache.labels, cache.word_mask,
                                     tolerance=args.tolerance, loss=args.loss)
  record = calibration.choose(table, grid, cfg, cache.lengths, target=args.target, epsilon=args.epsilon,
                              delta=args.delta, speedup=args.speedup, p_value=args.p_value,
                              speed_measure=args.speed_measure, tolerance=args.tolerance, loss=args.loss)
  record["model"] = {"identity": identity, "checkpoint": str(args.checkpoint), "num_layers": cfg.num_layers,
                     "task": task.name}
  record["data"] = {"task": task.name, "split": cache.split, "skip_rows": args.skip_rows, "rows": table.agree.shape[1],
                    "source": args.data_file or args.data_dir or ("generated" if task.name == "synthetic" else "hub"),
                    "sha256": calibration.data_hash(chunks)}
  if args.tolerance is not None:
    record["tolerance"] = args.tolerance
  calibration.write_thresholds(out, record)
  print_record(record)
  print(f"wrote {out}")
  return record


def print_record(r: dict) -> None:
  c = r["calibration"]
  metric = next(k for k in c if k not in ("layer_ratio", "flops_ratio", "agreement") and not k.startswith("final_"))
  print(f"{r['target']}: {r['setting']['describe']} (grid index {r['grid_index']} of {r['grid_size'] - 1}; "
        f"n={r['n']})")
  if not r["early_exit"]:
    print("no early-exit setting met the target on these rows: the file runs the full model (every example takes "
          "the last exit)")
  print(f"guarantee: {r['guarantee']}")
  flops = "" if c["flops_ratio"] is None else f", FLOPs ratio {c['flops_ratio']:.3f}"
  print(f"on the calibration rows: layer ratio {c['layer_ratio']:.3f}{flops}, agreement with the final exit "
        f"{100 * c['agreement']:.2f}%, {metric} {c[metric]:.2f} (final exit {c['final_exit_' + metric]:.2f})")


def main(argv=None) -> int:
  return cli.run(run, build_parser(), argv)
