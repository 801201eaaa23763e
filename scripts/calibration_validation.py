"""Do calibrated thresholds keep their guarantees on held-out data? (rome_flax.engine.calibration)

One all-exits pass over a labelled slice (e.g. SST-2 train rows 20000-29999, past the rows an export trained
on), every candidate setting of a criterion replayed on it once; then, over many random calibration / test
splits of the slice, the setting chosen on the calibration part is scored on the test part:

- consistency (split conformal at --epsilon): the mean test disagreement with the final exit (the guarantee
  is on this mean: <= epsilon), the share of splits above epsilon, the test layer ratio;
- risk (Learn-then-Test at --risk_epsilon, --delta; the accuracy loss: early wrong, final right): the share
  of splits whose test loss exceeds delta (the guarantee: <= risk_epsilon, up to the test part's own noise),
  the test accuracy drop, the layer ratio;
each beside the naive choice (the most aggressive setting meeting the target on the calibration part, no
correction).

usage: python scripts/calibration_validation.py --checkpoint EXPORT [--task sst-2 --data_dir DIR]
         [--split train] [--skip_rows 20000] [--rows 10000] [--criterion entropy] [--epsilon 0.05]
         [--delta 0.02] [--risk_epsilon 0.1] [--p_value hoeffding] [--splits 200] [--cal_fraction 0.5]
         [--grid 200] [--seed 0] [--batch_size 64] [--output report.json]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._common import cpu_model  # noqa: E402
from rome_flax import calibrate_cli, cli, infer_cli  # noqa: E402
from rome_flax.engine import calibration, evaluation  # noqa: E402
from rome_flax.errors import RomeFlaxError  # noqa: E402
from rome_flax.io.files import write_json  # noqa: E402


def build_parser() -> cli.ArgumentParser:
  ap = cli.ArgumentParser(prog="scripts/calibration_validation.py", description=__doc__.splitlines()[0])
  ap.add_argument("--checkpoint", required=True)
  ap.add_argument("--task")
  ap.add_argument("--data_dir")
  ap.add_argument("--data_file")
  ap.add_argument("--text_a_column", default="text")
  ap.add_argument("--text_b_column")
  ap.add_argument("--label_column", default="label")
  ap.add_argument("--tag_column", type=int, default=-1)
  ap.add_argument("--tokens_column", default="tokens")
  ap.add_argument("--tags_column", default="tags")
  ap.add_argument("--split", default="train")
  ap.add_argument("--skip_rows", type=int, default=0)
  ap.add_argument("--rows", type=int)
  ap.add_argument("--criterion", default="entropy", choices=[c for c in calibration.CRITERIA])
  ap.add_argument("--window", type=int, help="TOKEE window")
  ap.add_argument("--pool")
  ap.add_argument("--patience_delta", type=float)
  ap.add_argument("--tolerance", type=float, help="regression: agreement tolerance")
  ap.add_argument("--epsilon", type=float, default=0.05, help="consistency level")
  ap.add_argument("--delta", type=float, default=0.02, help="risk: allowed expected loss")
  ap.add_argument("--risk_epsilon", type=float, default=0.1, help="risk: allowed failure probability")
  ap.add_argument("--p_value", default="hoeffding", choices=calibration.P_VALUES)
  ap.add_argument("--splits", type=int, default=200)
  ap.add_argument("--cal_fraction", type=float, default=0.5)
  ap.add_argument("--grid", type=int, default=calibration.DEFAULT_GRID)
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--batch_size", type=int, default=64)
  ap.add_argument("--max_length", type=int)
  ap.add_argument("--output", help="also write the report as JSON here")
  return ap


def _summary(name: str, values: dict) -> dict:
  return {"method": name, **{k: float(np.mean(v)) for k, v in values.items()},
          **{f"{k}_std": float(np.std(v)) for k, v in values.items()}}


def run(args) -> dict:
  calibration.check_level("epsilon", args.epsilon)
  calibration.check_level("delta", args.delta)
  calibration.check_level("risk_epsilon", args.risk_epsilon)
  if args.splits < 1 or not 0 < args.cal_fraction < 1:
    raise RomeFlaxError("--splits must be >= 1 and --cal_fraction in (0, 1)")
  model = infer_cli.load_model(args.checkpoint)
  task = infer_cli.resolve_task(args, model)
  cfg = model.config
  grid = calibration.make_grid(args.criterion, cfg, size=args.grid, delta=args.patience_delta, pool=args.pool,
                               window=args.window)
  loader = argparse.Namespace(**{**vars(args), "limit": None})
  chunks = calibrate_cli.calibration_slice(infer_cli.load_examples(loader, task), args.skip_rows, args.rows)
  t0 = time.perf_counter()
  cache = evaluation.all_exits(model, task, iter(chunks), batch_size=args.batch_size, max_length=args.max_length)
  pass_s = time.perf_counter() - t0
  if not cache.labelled:
    raise RomeFlaxError("the validation needs a labelled slice (risk control's accuracy loss)")
  loss = "disagreement" if cfg.is_regression else "accuracy"
  table = calibration.decision_table(grid, cache.exit_logits, cfg, task, cache.labels, cache.word_mask,
                                     tolerance=args.tolerance, loss=loss)
  N, L = table.agree.shape[1], cfg.num_layers
  n_cal = int(round(args.cal_fraction * N))
  rng = np.random.default_rng(args.seed)
  cons = {m: {"test_disagreement": [], "above_epsilon": [], "layer_ratio": []} for m in ("conformal", "naive")}
  risk = {m: {"test_loss": [], "above_delta": [], "layer_ratio": []} for m in ("learn-then-test", "naive")}
  uncertified = 0
  for _ in range(args.splits):
    perm = rng.permutation(N)
    c, t = perm[:n_cal], perm[n_cal:]
    agree_c, loss_c = table.agree[:, c], table.loss[:, c]
    j_conf = calibration.conformal_choice(agree_c, args.epsilon)
    if j_conf is None:
      uncertified += 1
      j_conf = 0
    for m, j in (("conformal", j_conf), ("naive", calibration.naive_consistency(agree_c, args.epsilon))):
      d = 1.0 - table.agree[j, t].mean()
      cons[m]["test_disagreement"].append(d)
      cons[m]["above_epsilon"].append(d > args.epsilon)
      cons[m]["layer_ratio"].append(table.layer_ratio(j, t, L))
    j_ltt = calibration.fixed_sequence(calibration.p_values(loss_c, args.delta, args.p_value), args.risk_epsilon)
    for m, j in (("learn-then-test", j_ltt), ("naive", calibration.naive_risk(loss_c, args.delta))):
      lt = float(table.loss[j, t].mean())
      risk[m]["test_loss"].append(lt)
      risk[m]["above_delta"].append(lt > args.delta)
      risk[m]["layer_ratio"].append(table.layer_ratio(j, t, L))
  report = {"cpu": cpu_model(), "checkpoint": str(args.checkpoint), "task": task.name, "split": cache.split,
            "skip_rows": args.skip_rows, "rows": N, "calibration_rows": n_cal, "test_rows": N - n_cal,
            "criterion": args.criterion, "grid": len(grid), "splits": args.splits, "epsilon": args.epsilon,
            "delta": args.delta, "risk_epsilon": args.risk_epsilon, "p_value": args.p_value, "loss": loss,
            "all_exits_pass_s": round(pass_s, 2), "conformal_uncertified_splits": uncertified,
            "final_exit_" + table.metric_name: float(table.metric[0]),
            "consistency": [_summary(m, v) for m, v in cons.items()],
            "risk": [_summary(m, v) for m, v in risk.items()]}
  print(f"cpu: {report['cpu']}")
  print(f"{task.name} {cache.split} rows {args.skip_rows}..{args.skip_rows + N - 1}: {N} rows, all-exits pass "
        f"{pass_s:.1f} s; {args.splits} random splits, {n_cal} calibration / {N - n_cal} test rows; criterion "
        f"{args.criterion}, {len(grid)} settings")
  print(f"consistency, epsilon={args.epsilon:g} (guarantee: mean test disagreement <= epsilon):")
  for r in report["consistency"]:
    print(f"  {r['method']:<16} mean test disagreement {r['test_disagreement']:.4f} (sd {r['test_disagreement_std']:.4f}),"
          f" share of splits above epsilon {r['above_epsilon']:.3f}, test layer ratio {r['layer_ratio']:.3f}")
  if uncertified:
    print(f"  ({uncertified} splits: n={n_cal} cannot certify epsilon={args.epsilon:g}; counted as no early exit)")
  print(f"risk ({loss} loss), delta={args.delta:g}, epsilon={args.risk_epsilon:g} ({args.p_value}; guarantee: share "
        "of splits with test loss > delta <= epsilon, up to the test rows' own noise):")
  for r in report["risk"]:
    print(f"  {r['method']:<16} share of splits with test loss > delta {r['above_delta']:.3f}, mean test loss "
          f"{r['test_loss']:.4f}, test layer ratio {r['layer_ratio']:.3f}")
  if args.output:
    write_json(args.output, report)
  return report


def main(argv=None) -> int:
  return cli.run(run, build_parser(), argv)


if __name__ == "__main__":
  raise SystemExit(main())
