"""`python infer.py`: early-exit evaluation of a trained multi-exit model on a dataset.

One all-exits pass over the split caches every exit's logits; every requested threshold is then
evaluated offline (per-exit metrics, per-setting metric / average exit layer / layer ratio / FLOPs
ratio, plots). With --measure_speed the throughput path (at --batch_size) and the latency path (at
batch 1) run for real for each setting, against the full model on the same examples. On an
unlabelled split (GLUE test) it writes submission files (`index<TAB>prediction`) per setting.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np

from rome_flax import exit_policy as ep
from rome_flax.errors import RomeFlaxError

log = logging.getLogger("rome_flax.infer")

# GLUE leaderboard file names per task and split.
SUBMISSION_NAMES = {"cola": "CoLA", "sst-2": "SST-2", "mrpc": "MRPC", "qqp": "QQP", "sts-b": "STS-B",
                    "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}
MNLI_SUBMISSION = {"test_matched": "MNLI-m", "test_mismatched": "MNLI-mm"}


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(prog="infer.py", description=__doc__.splitlines()[0])
  ap.add_argument("--checkpoint", required=True, help="train.py export (runs/NAME/export) or a Hugging Face "
                  "checkpoint directory")
  ap.add_argument("--task", help="task name (GLUE name, 'synthetic' or 'custom'); default: the export's task")
  ap.add_argument("--data_dir", help="directory with the task's GLUE TSV files")
  ap.add_argument("--data_file", help="custom task: a .csv/.tsv/.jsonl file for --split")
  ap.add_argument("--text_a_column", default="text")
  ap.add_argument("--text_b_column")
  ap.add_argument("--label_column", default="label")
  ap.add_argument("--split", default="dev")
  ap.add_argument("--criterion", default="entropy",
                  help="entropy, maxprob, patience, a comma list of them, or 'all' (default thresholds each)")
  ap.add_argument("--thresholds", help="comma list of settings; one setting may list per-exit values with ':' "
                  "(e.g. 0.05,0.1,0.2 or 0.1:0.2:0.3). Default: the reference sweep of the criterion")
  ap.add_argument("--delta", type=float, help="regression patience: |change| below which predictions agree")
  ap.add_argument("--min_exit_layer", type=int, default=1)
  ap.add_argument("--metric", help="metric to plot (default: the task's primary metric); needs labels")
  ap.add_argument("--batch_size", type=int, default=64)
  ap.add_argument("--max_length", type=int, help="default: the export's max_length, else 128")
  ap.add_argument("--output_dir", required=True)
  ap.add_argument("--overwrite", action="store_true", help="replace results in a non-empty output_dir")
  ap.add_argument("--measure_speed", choices=("best", "all", "none"), default="best",
                  help="run the throughput and latency paths for real and time them against the full model: "
                  "for the fastest setting within 1 point of the final exit (best; labelled splits), every "
                  "setting (all), or none")
  ap.add_argument("--latency_examples", type=int, default=128, help="examples timed at batch size 1")
  ap.add_argument("--speed_repeats", type=int, default=2, help="timed passes per side (the fastest counts)")
  ap.add_argument("--chunk_size", type=int, help="throughput path: examples resident on the device at once "
                  "(default 16 batches); at most one partial layer batch per layer per chunk")
  ap.add_argument("--limit", type=int, help="use only the first N examples of the split (quick checks)")
  ap.add_argument("--no_progress", action="store_true")
  return ap


# ----------------------------------------------------------------------------- inputs


def load_model(path: str, num_labels: Optional[int] = None):
  from rome_flax.pretrained import EXPORT_CONFIG, MultiExitBert
  p = Path(os.path.expanduser(path))
  if p.exists() and not p.is_dir():
    raise RomeFlaxError(f"checkpoint {path} is a file; pass the directory")
  if p.is_dir() and not (p / EXPORT_CONFIG).is_file() and not (p / "config.json").is_file():
    raise RomeFlaxError(f"checkpoint {path} is neither a rome_flax export ({EXPORT_CONFIG}) nor a Hugging Face "
                        "checkpoint (config.json)")
  if not p.exists() and (path.startswith((".", "/", "~")) or path.count("/") != 1):
    raise RomeFlaxError(f"checkpoint directory {path} does not exist")
  return MultiExitBert.from_pretrained(path, num_labels=num_labels)


def _named_task(args):
  """The --task's spec when it fixes the label count (a Hugging Face checkpoint then gets that many)."""
  from rome_flax import tasks
  if args.task is None or args.task.strip().lower() == "custom":
    return None
  return tasks.get_task(args.task)


def resolve_task(args, model):
  from rome_flax import tasks
  meta = model.metadata
  name = args.task or meta.get("task")
  if name is None:
    raise RomeFlaxError("the checkpoint does not say its task: pass --task")
  if str(name).lower() == "custom":
    labels = meta.get("label_names") or ()
    return tasks.get_task("custom", label_names=tuple(labels) if labels else None,
                          regression=model.config.is_regression)
  task = tasks.get_task(name)
  if task.num_labels != model.config.num_labels:
    raise RomeFlaxError(f"task {task.name} has {task.num_labels} label(s) but the checkpoint's exits have "
                        f"{model.config.num_labels}")
  return task


def load_examples(args, task):
  from rome_flax import data
  if task.name == "custom" or args.data_file:
    if not args.data_file:
      raise RomeFlaxError("a custom task needs --data_file")
    return data.load_split(task, args.split, files={args.split: args.data_file},
                           text_a_column=args.text_a_column, text_b_column=args.text_b_column,
                           label_column=args.label_column)
  if task.name != "synthetic" and args.data_dir is None:
    log.info("no --data_dir: loading glue/%s from the hub", task.hf_name)
  return data.load_split(task, args.split, data_dir=args.data_dir)


def to_padded(encoded_split):
  """rome_flax.data's ragged EncodedSplit -> early_exit.Encoded (padded to the longest example)."""
  from rome_flax.inference import Encoded
  n = len(encoded_split)
  lengths = encoded_split.lengths
  S = int(lengths.max())
  ids = np.full((n, S), encoded_split.pad_id, np.int32)
  types = np.zeros((n, S), np.int32)
  mask = np.zeros((n, S), np.int32)
  for r, (a, t) in enumerate(zip(encoded_split.input_ids, encoded_split.token_type_ids)):
    ids[r, :len(a)], types[r, :len(t)], mask[r, :len(a)] = a, t, 1
  return Encoded(ids, mask, types), lengths


def build_policies(args, cfg) -> list[ep.ExitPolicy]:
  criteria = list(ep.CRITERIA) if args.criterion.strip() == "all" else [c.strip() for c in args.criterion.split(",")]
  for c in criteria:
    if c not in ep.CRITERIA:
      raise RomeFlaxError(f"unknown criterion {c!r}; choose from {', '.join(ep.CRITERIA)} or 'all'")
  if cfg.is_regression:
    dropped = [c for c in criteria if c != "patience"]
    if dropped and args.criterion.strip() == "all":
      criteria = ["patience"]
    elif dropped:
      raise RomeFlaxError(f"criterion {dropped[0]!r} needs class probabilities; a regression task can only use "
                          "'patience' (with --delta)")
  if args.thresholds is not None and len(criteria) > 1:
    raise RomeFlaxError("--thresholds applies to one criterion; name one with --criterion")
  policies = []
  for c in criteria:
    settings = ep.parse_thresholds(args.thresholds) if args.thresholds is not None else \
        ep.default_thresholds(c, cfg.num_exits)
    for values in settings:
      policies.append(ep.make_policy(c, values if len(values) > 1 else values[0], cfg.num_exits,
                                     num_labels=cfg.num_labels, min_exit_layer=args.min_exit_layer,
                                     delta=args.delta))
  return policies


def check_output_dir(path: str, overwrite: bool) -> Path:
  """Refuses to mix new results into an earlier run's directory unless asked to."""
  out = Path(path)
  if out.exists() and not out.is_dir():
    raise RomeFlaxError(f"--output_dir {path} is a file")
  if out.is_dir() and any(out.iterdir()) and not overwrite:
    raise RomeFlaxError(f"--output_dir {path} already holds results; pass --overwrite or choose another directory")
  return out


def prepare_output_dir(path: str, overwrite: bool) -> Path:
  out = check_output_dir(path, overwrite)
  try:
    out.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise RomeFlaxError(f"cannot create --output_dir {path}: {e.strerror or e}") from None
  return out


def _safe_name(setting: str) -> str:
  return "".join(ch if ch.isalnum() or ch in "._=-" else "_" for ch in setting.replace("<", "_lt_")
                 .replace(">=", "_ge_"))


# ----------------------------------------------------------------------------- the run


def run(args) -> dict:
  from tqdm.auto import tqdm

  from rome_flax import early_exit as ee
  from rome_flax import inference
  from rome_flax import metrics, report, sweep
  from rome_flax.data import encode_split

  if args.batch_size < 1:
    raise RomeFlaxError(f"--batch_size must be >= 1, got {args.batch_size}")
  if args.speed_repeats < 1:
    raise RomeFlaxError(f"--speed_repeats must be >= 1, got {args.speed_repeats}")
  if args.latency_examples < 1:
    raise RomeFlaxError(f"--latency_examples must be >= 1, got {args.latency_examples}")
  if args.thresholds is not None:
    ep.parse_thresholds(args.thresholds)  # fail on a bad list before loading anything
  check_output_dir(args.output_dir, args.overwrite)
  named_task = _named_task(args)
  model = load_model(args.checkpoint, named_task.num_labels if named_task is not None else None)
  cfg = model.config
  task = resolve_task(args, model)
  policies = build_policies(args, cfg)
  examples = load_examples(args, task)
  if args.limit is not None:
    if args.limit < 1:
      raise RomeFlaxError(f"--limit must be >= 1, got {args.limit}")
    examples = dataclasses.replace(
        examples, texts_a=examples.texts_a[:args.limit], ids=examples.ids[:args.limit],
        texts_b=examples.texts_b[:args.limit] if examples.texts_b is not None else None,
        labels=examples.labels[:args.limit] if examples.labels is not None else None)
  labelled = examples.labels is not None
  if args.metric is not None:
    if not labelled:
      raise RomeFlaxError(f"split {args.split!r} has no labels: --metric {args.metric} cannot be computed")
    if args.metric not in task.metric_names:
      raise RomeFlaxError(f"task {task.name} has metrics {', '.join(task.metric_names)}, not {args.metric!r}")
  metric = args.metric or metrics.primary_metric(task)
  out = prepare_output_dir(args.output_dir, args.overwrite)
  max_length = args.max_length or int(model.metadata.get("max_length", 128))
  encoded_split = encode_split(model.tokenizer, examples, max_length, is_regression=task.is_regression)
  encoded, lengths = to_padded(encoded_split)
  progress = lambda desc: (lambda it: tqdm(it, desc=desc, unit="batch", disable=args.no_progress,
                                           dynamic_ncols=True))
  prepared = ee.prepare_params(model.params)

  t0 = time.perf_counter()
  exit_logits = inference.run_all_exits(prepared, cfg, encoded, args.batch_size, progress=progress("all exits"))
  all_exits_seconds = time.perf_counter() - t0
  metric_fn = (lambda p, y: metrics.compute_metrics(task, p, y)) if labelled else None
  per_exit = sweep.per_exit_metrics(exit_logits, examples.labels, metric_fn, cfg.is_regression) if labelled else []
  rows = sweep.evaluate(policies, exit_logits, cfg, lengths, examples.labels, metric_fn)

  written = []
  if per_exit:
    written += report.write_table(out, "per_exit", per_exit)
    written.append(report.plot_per_exit(out / "per_exit.png", per_exit, metric))
  columns = ["setting", *([metric] + [m for m in task.metric_names if m != metric] if labelled else []),
             "avg_exit_layer", "layer_ratio", "flops_ratio", "expected_saving", "exit_shares"]
  written += report.write_table(out, "sweep", rows, columns)

  for policy in policies:
    preds, exits = sweep.decisions(policy, exit_logits, cfg.is_regression)
    name = _safe_name(policy.describe())
    lines = ["index\tprediction\texit_layer"] + [
        f"{i}\t{task.label_names[int(p)] if task.label_names else f'{float(p):.6g}'}\t{e + 1}"
        for i, p, e in zip(examples.ids.tolist(), preds.tolist(), exits.tolist())]
    written.append(report.atomic_write_text(out / "predictions" / f"{name}.tsv", "\n".join(lines) + "\n"))
    if not labelled:
      glue_name = MNLI_SUBMISSION.get(args.split) if task.name == "mnli" else SUBMISSION_NAMES.get(task.name)
      written.append(report.atomic_write_text(
          out / "submission" / name / f"{glue_name or task.name}.tsv",
          report.submission_tsv(examples.ids, preds, task.label_names)))

  best = report.best_tradeoff(rows, metric, per_exit[-1][metric]) if per_exit else None
  timed = {"all": policies, "none": [],
           "best": [policies[rows.index(best)]] if best is not None else []}[args.measure_speed]
  speed_rows = []
  if timed:
    speed_rows = measure_speed(prepared, cfg, timed, encoded, lengths, exit_logits, args.batch_size,
                               args.latency_examples, progress, args.chunk_size, args.speed_repeats)
    written += report.write_table(out, "speed", speed_rows)
  if labelled:
    measured = [(r[metric], s[f"throughput_speedup_b{args.batch_size}"])
                for s in speed_rows for r in rows if r["setting"] == s["setting"]]
    written.append(report.plot_tradeoff(out / "tradeoff.png", rows, metric,
                                        final_metric=per_exit[-1][metric] if per_exit else None,
                                        measured=measured, measured_label=f"measured, throughput b={args.batch_size}"))

  summary = {"checkpoint": str(args.checkpoint), "task": task.name, "split": args.split,
             "examples": int(encoded.num_examples), "num_layers": cfg.num_layers, "labelled": labelled,
             "metric": metric if labelled else None, "batch_size": args.batch_size, "max_length": max_length,
             "all_exits_pass_seconds": round(all_exits_seconds, 3),
             "final_exit": per_exit[-1] if per_exit else None, "settings": rows, "speed": speed_rows}
  written.append(report.write_json(out / "summary.json", summary))

  print(f"{task.name} {args.split}: {encoded.num_examples} examples, {cfg.num_layers} layers, "
        f"all-exits pass {all_exits_seconds:.1f} s (batch {args.batch_size})")
  if per_exit:
    print("\nper exit:\n" + report.to_markdown(per_exit))
  print("thresholds (layer ratio = L / average exit layer; FLOPs ratio counts exit heads that ran):\n"
        + report.to_markdown(rows, columns))
  if best is not None:
    final = per_exit[-1][metric]
    print(f"fastest setting within 1 point of the final exit ({metric} {final:.2f}): {best['setting']} "
          f"({metric} {best[metric]:.2f}, layer ratio {best['layer_ratio']:.2f}, "
          f"FLOPs ratio {best['flops_ratio']:.2f})\n")
  if speed_rows:
    shown = ["setting", "layer_ratio", f"throughput_speedup_b{args.batch_size}", "latency_layer_ratio",
             "latency_speedup_b1", "latency_ms", "full_latency_ms", "warmup_s_throughput", "warmup_s_latency",
             "exits_match_offline"]
    print(f"measured wall clock vs the full model, same examples and batch size (compile and warm-up excluded; "
          f"latency on the first {min(args.latency_examples, encoded.num_examples)} examples at batch 1):\n"
          + report.to_markdown(speed_rows, shown))
  print(f"wrote {len(written)} files to {out}")
  return summary


def measure_speed(prepared, cfg, policies, encoded, lengths, exit_logits, batch_size, latency_examples,
                  progress, chunk_size=None, repeats: int = 2) -> list[dict]:
  """Throughput path (batch_size) and latency path (batch 1) per setting, each against the full model.

  For every setting the early-exit run and the full model alternate `repeats` times and the fastest
  pass of each counts, so both sides see the same machine load.
  """
  from rome_flax import early_exit as ee
  from rome_flax import inference
  from rome_flax import sweep
  n_lat = min(latency_examples, encoded.num_examples)
  lat_data = inference.Encoded(*(a[:n_lat] for a in encoded))
  rows = []
  for policy in progress("measured speed")(policies):
    want = np.asarray(ep.decide(policy, np.asarray(exit_logits)).exit_index_N)
    full_b, thr = inference.best_of(
        repeats, lambda warmup: inference.run_full_model(prepared, cfg, encoded, batch_size, warmup=warmup),
        lambda warmup: inference.run_throughput(prepared, cfg, policy, encoded, batch_size, chunk_size, warmup=warmup))
    full_1, lat = inference.best_of(
        repeats, lambda warmup: inference.run_full_model(prepared, cfg, lat_data, 1, warmup=warmup),
        lambda warmup: inference.run_latency(prepared, cfg, policy, lat_data, 1, warmup=warmup))
    rows.append({
        "setting": policy.describe(),
        "layer_ratio": cfg.num_layers / float((thr.exit_index_N + 1).mean()),
        "flops_ratio": sweep.flops_ratio(cfg, thr.exit_index_N, lengths),
        f"throughput_speedup_b{batch_size}": full_b.seconds / thr.seconds,
        "throughput_ex_per_s": encoded.num_examples / thr.seconds,
        "full_ex_per_s": encoded.num_examples / full_b.seconds,
        "latency_layer_ratio": cfg.num_layers / float((lat.exit_index_N + 1).mean()),
        "latency_speedup_b1": full_1.seconds / lat.seconds,
        "latency_ms": 1e3 * lat.seconds / n_lat, "full_latency_ms": 1e3 * full_1.seconds / n_lat,
        "warmup_s_throughput": thr.warmup_seconds, "warmup_s_latency": lat.warmup_seconds,
        "warmup_s_full": full_b.warmup_seconds + full_1.warmup_seconds,
        "exits_match_offline": bool(np.array_equal(thr.exit_index_N, want)
                                    and np.array_equal(lat.exit_index_N, want[:n_lat])),
    })
  return rows


def main(argv: Optional[list[str]] = None) -> int:
  logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
  args = build_parser().parse_args(argv)
  try:
    run(args)
  except RomeFlaxError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  return 0
