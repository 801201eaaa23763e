"""`python infer.py`: early-exit evaluation of a trained multi-exit model on a dataset.

One all-exits pass over the split caches every exit's logits; every requested threshold is then
evaluated offline (per-exit metrics, per-setting metric / average exit layer / layer ratio / FLOPs
ratio, plots). With --measure_speed the throughput path (at --batch_size) and the latency path (at
batch 1) run for real for each setting, against the full model on the same examples. On an
unlabelled split (GLUE test) it writes submission files (`index<TAB>prediction`) per setting.

This module only reads options, loads the model and data and prints: the evaluation is
`evaluation.evaluate_exits`, the files `report.write_evaluation`.
"""

from __future__ import annotations

import itertools
import os
import sys
from pathlib import Path
from typing import Optional

import numpy as np

from rome_flax import cli, report
from rome_flax import progress as progress_lib
from rome_flax.engine import evaluation, sweep
from rome_flax.engine import exit_policy as ep
from rome_flax.errors import RomeFlaxError
from rome_flax.io import files, preemption
from rome_flax.io.runlock import RunLock
from rome_flax.kinds.kind import kind_of
from rome_flax.kinds.sources import DataSources


def add_data_arguments(ap, split_default: str = "dev", split_help: str = "") -> None:
  """The options that name a split's data (`load_examples` reads them): one definition for infer.py and
  `python -m rome_flax calibrate`."""
  ap.add_argument("--task", help="task name (GLUE name, 'synthetic' or 'custom'); default: the export's task")
  ap.add_argument("--data_dir", help="directory with the task's GLUE TSV files (token tasks: CoNLL files)")
  ap.add_argument("--data_file", help="custom or token task: a .csv/.tsv/.jsonl (or CoNLL) file for --split")
  ap.add_argument("--text_a_column", default="text", help="custom task: the column of the (first) text")
  ap.add_argument("--text_b_column", help="custom task: the column of the second text of a pair")
  ap.add_argument("--label_column", default="label", help="custom task: the column of the label")
  ap.add_argument("--tag_column", type=int, default=-1, help="token tasks, CoNLL files: the tag column (-1: last)")
  ap.add_argument("--tokens_column", default="tokens", help="token tasks, JSON Lines: the words' column")
  ap.add_argument("--tags_column", default="tags", help="token tasks, JSON Lines: the tags' column")
  ap.add_argument("--split", default=split_default,
                  help=split_help or "train, dev or test (GLUE MNLI: dev_matched, dev_mismatched)")


def build_parser() -> cli.ArgumentParser:
  ap = cli.ArgumentParser(prog="infer.py", description=__doc__.splitlines()[0])
  ap.add_argument("--checkpoint", required=True, help="train.py export (runs/NAME/export) or a Hugging Face "
                  "checkpoint directory")
  add_data_arguments(ap)
  ap.add_argument("--criterion", default="entropy",
                  help="entropy, maxprob, patience, a comma list of them, or 'all' (default thresholds each)")
  ap.add_argument("--thresholds", help="comma list of settings; one setting may list per-exit values with ':' "
                  "(e.g. 0.05,0.1,0.2 or 0.1:0.2:0.3). Default: the reference sweep of the criterion")
  ap.add_argument("--delta", type=float, help="regression patience: |change| below which predictions agree")
  ap.add_argument("--thresholds_file", help="run exactly the setting a `python -m rome_flax calibrate` thresholds.json "
                  "names (refused for another model); replaces --criterion / --thresholds")
  ap.add_argument("--pool", choices=ep.POOLS, help="token tasks (SENTEE): a sentence's uncertainty is the max "
                  "(default) or the mean over its words")
  ap.add_argument("--min_exit_layer", type=int, default=1, help="no example exits before this layer")
  ap.add_argument("--tokee_windows", help="token tasks: also run token-level early exit (TOKEE) for real with "
                  "these odd window sizes (comma list, e.g. 3,5,15), crossed with --tokee_thresholds")
  ap.add_argument("--tokee_thresholds", default="0.05,0.1,0.15,0.25",
                  help="TOKEE normalised-entropy thresholds tau (comma list; tau in layers 1..L/2, "
                  "--tokee_upper_scale x tau above)")
  ap.add_argument("--tokee_upper_scale", type=float, default=2.0, help="TOKEE threshold scale in the upper half "
                  "of the layers (the reference doubles it)")
  ap.add_argument("--tokee_masked_window", action="store_true", help="TOKEE: leave halted words out of their "
                  "neighbours' windows (the reference keeps them, method-seqlab.md 7.1)")
  ap.add_argument("--copy_wordpiece", choices=("all", "first"), default="all",
                  help="TOKEE: a halted word stops all its pieces (all) or its first piece only")
  ap.add_argument("--metric", help="metric to plot (default: the task's primary metric); needs labels")
  ap.add_argument("--batch_size", type=int, default=64, help="examples per batch of the all-exits pass and the "
                  "batched speed measure")
  ap.add_argument("--max_length", type=int, help="default: the export's max_length, else 128")
  ap.add_argument("--truncate", action="store_true", help="token tasks: a sentence longer than max_length word "
                  "pieces keeps the words that fit (the rest are not predicted; a warning counts them and names the "
                  "first file:line) instead of being an error. Sentence tasks are always cut to max_length, as in "
                  "training")
  ap.add_argument("--output_dir", required=True, help="where the sweep, tables, plots and predictions go")
  ap.add_argument("--overwrite", action="store_true", help="replace the results of an earlier infer.py run in "
                  "output_dir (never other files: a directory holding anything else is refused)")
  ap.add_argument("--target_speedup", default="2,3", help="comma list of layer ratios: the most accurate setting "
                  "reaching each is printed")
  ap.add_argument("--measure_speed", choices=evaluation.MEASURE_SPEED, default="best",
                  help="run the throughput and latency paths for real and time them against the full model: "
                  "for the fastest setting within 1 point of the final exit (best; labelled splits), every "
                  "setting (all), or none")
  ap.add_argument("--latency_examples", type=int, default=128, help="examples timed at batch size 1")
  ap.add_argument("--speed_repeats", type=int, default=2, help="timed passes per side (the fastest counts)")
  ap.add_argument("--chunk_size", type=int, help="throughput path: examples resident on the device at once "
                  "(default 16 batches); at most one partial layer batch per layer per chunk")
  ap.add_argument("--devices", type=int, help="devices of this process that the all-exits pass and the batch-size "
                  "passes use (default: all; the full model splits each batch, the throughput path runs one "
                  "chunk per device; results equal one device's)")
  ap.add_argument("--limit", type=int, help="use only the first N examples of the split (quick checks)")
  ap.add_argument("--no_progress", action="store_true", help="no progress bars")
  return ap


# ----------------------------------------------------------------------------- inputs


def load_model(path: str, num_labels: Optional[int] = None):
  from rome_flax.model.pretrained import EXPORT_CONFIG, MultiExitBert
  p = Path(os.path.expanduser(path))
  if p.exists() and not p.is_dir():
    raise RomeFlaxError(f"checkpoint {path} is a file; pass the directory")
  if p.is_dir() and not (p / EXPORT_CONFIG).is_file() and (files.output_kind(p) == "train" or
                                                            (p / "export" / EXPORT_CONFIG).is_file()):
    raise RomeFlaxError(f"checkpoint {path} is a train.py run directory; pass its export: "
                        f"--checkpoint {Path(path) / 'export'}")
  if p.is_dir() and not (p / EXPORT_CONFIG).is_file() and not (p / "config.json").is_file():
    raise RomeFlaxError(f"checkpoint {path} is neither a rome_flax export ({EXPORT_CONFIG}) nor a Hugging Face "
                        "checkpoint (config.json)")
  if not p.exists() and (path.startswith((".", "/", "~")) or path.count("/") != 1):
    raise RomeFlaxError(f"checkpoint directory {path} does not exist")
  # An export knows its labels and head: resolve_task then says what does not fit the --task.
  return MultiExitBert.from_pretrained(path, num_labels=None if (p / EXPORT_CONFIG).is_file() else num_labels)


def _named_task(args):
  """The --task's spec when the registry fixes its label count (a Hugging Face checkpoint then gets that
  many); None when only the model can say (a token task's tags, a custom task's classes) or no --task."""
  from rome_flax.kinds import tasks
  return None if args.task is None or tasks.labels_from_data(args.task) else tasks.get_task(args.task)


def resolve_task(args, model):
  """--task (else the export's task) as `tasks.resolve_task` completes it from the export (its label names,
  whether it regresses), then checked against the model: the same kind of exits, as many labels."""
  from rome_flax.kinds import tasks
  info = model.export_info
  name = args.task or info.task
  if name is None:
    raise RomeFlaxError("the checkpoint does not say its task: pass --task")
  # First the kind of exits (stand-in labels: the export's may not fit another kind's task), then the labels.
  stand_in = tasks.stand_in(name, model.config.is_regression)
  if stand_in.kind != model.config.head:
    raise RomeFlaxError(f"task {name} needs a model with {kind_of(stand_in).exits}; {args.checkpoint} has "
                        f"{kind_of(model.config).exits}")

  def labels():   # a token task's tag set, a custom task's classes: only an export knows them
    if not info.label_names:
      raise RomeFlaxError(f"{args.checkpoint} does not list its labels: pass a train.py export of task {name}")
    return info.label_names
  task = tasks.resolve_task(name, labels, model.config.is_regression)
  if task.num_labels != model.config.num_labels:
    raise RomeFlaxError(f"task {task.name} has {task.num_labels} label(s) but the checkpoint's exits have "
                        f"{model.config.num_labels}")
  return task


def data_sources(args) -> DataSources:
  """Where --split's examples come from (the options of `add_data_arguments`)."""
  return DataSources.of({args.split: args.data_file}, data_dir=args.data_dir, text_a_column=args.text_a_column,
                        text_b_column=args.text_b_column, label_column=args.label_column,
                        tag_column=args.tag_column, tokens_column=args.tokens_column, tags_column=args.tags_column)


def load_examples(args, task):
  """--split of the task (its first --limit examples); a user's file comes as a stream of chunks, so peak
  memory does not grow with the file (evaluation.STREAM_EXAMPLES)."""
  examples = kind_of(task).read(task, args.split, data_sources(args), stream=True)
  if hasattr(examples, "head"):
    return examples.head(args.limit) if args.limit is not None else examples
  stream = itertools.chain([next(examples)], examples)   # the file's first chunk read now: its errors come first
  return stream if args.limit is None else _first(stream, args.limit)


def _first(chunks, limit: int):
  """The first `limit` examples of a stream of Split chunks."""
  for chunk in chunks:
    if len(chunk) >= limit:
      yield chunk.head(limit)
      return
    limit -= len(chunk)
    yield chunk


def build_policies(args, cfg) -> list[ep.ExitPolicy]:
  """--criterion x --thresholds ('all': the criteria of the model's task kind, each with its default sweep)."""
  every = kind_of(cfg).criteria
  criteria = list(every) if args.criterion.strip() == "all" else [c.strip() for c in args.criterion.split(",")]
  for c in criteria:
    if c not in ep.CRITERIA:
      raise RomeFlaxError(f"unknown criterion {c!r}; choose from {', '.join(ep.CRITERIA)} or 'all'")
  if args.thresholds is not None and len(criteria) > 1:
    raise RomeFlaxError("--thresholds applies to one criterion; name one with --criterion")
  policies = []
  for c in criteria:
    settings = ep.parse_thresholds(args.thresholds) if args.thresholds is not None else ep.defaults_for(cfg, c)
    for values in settings:
      policies.append(ep.policy_for(cfg, c, values if len(values) > 1 else values[0],
                                    min_exit_layer=args.min_exit_layer, delta=args.delta, pool=args.pool))
  return policies


def build_token_policies(args, cfg) -> list:
  """TOKEE settings: --tokee_windows x --tokee_thresholds (none without --tokee_windows)."""
  from rome_flax.engine import token_exit
  if args.tokee_windows is None:
    return []
  if not kind_of(cfg).token_level_exit:
    raise RomeFlaxError("--tokee_windows (token-level early exit) is for token tasks; this model has one prediction "
                        "per sentence")
  windows = token_exit.parse_windows(args.tokee_windows)
  taus = [v[0] if len(v) == 1 else v for v in ep.parse_thresholds(args.tokee_thresholds)]
  saturated = [t for t in taus if np.ndim(t) == 0 and args.tokee_upper_scale * t >= 1.0]
  if len(saturated) > 1:   # a normalised entropy never exceeds 1: these settings differ in layers 1..L/2 only
    print(f"note: TOKEE tau {', '.join(f'{t:g}' for t in saturated)}: the upper-half threshold "
          f"(--tokee_upper_scale {args.tokee_upper_scale:g} x tau) is >= 1, so every word still running halts at "
          f"layer {cfg.num_layers // 2 + 1}; use --tokee_upper_scale 1 for taus up to 1", file=sys.stderr)
  return [token_exit.make_token_policy(tau, w, cfg.num_layers, upper_scale=args.tokee_upper_scale,
                                       masked_window=args.tokee_masked_window, copy_wordpiece=args.copy_wordpiece)
          for w in windows for tau in taus]


def calibrated_policies(args, cfg) -> tuple[list, list]:
  """--thresholds_file: the one setting `python -m rome_flax calibrate` chose for this export (a TOKEE
  setting runs beside the full model's, entropy<0, which every sweep needs)."""
  from rome_flax.engine import calibration
  if args.thresholds is not None or args.tokee_windows is not None:
    raise RomeFlaxError("--thresholds_file names the setting to run: drop --thresholds / --tokee_windows")
  record = calibration.read_thresholds(args.thresholds_file, calibration.export_identity(args.checkpoint))
  kind, policy = calibration.policy_from_setting(record["setting"], cfg)
  print(f"thresholds from {args.thresholds_file}: {policy.describe()} ({record.get('target')}; "
        f"{record.get('guarantee', 'no guarantee recorded')})")
  if kind == "token":
    return [ep.policy_for(cfg, "entropy", 0.0)], [policy]
  return [policy], []


def check_max_length(max_length: Optional[int], model) -> int:
  """The length examples are cut to (returned) must fit the model's position table (beyond it the
  position lookup reads past the table: NaN logits, no error), as train.py demands."""
  if max_length is not None and max_length < 8:
    raise RomeFlaxError(f"--max_length must be at least 8, got {max_length}")
  length = evaluation.max_length_of(model, max_length)
  positions = model.config.max_position_embeddings
  if length > positions:
    raise RomeFlaxError(f"max_length {length} exceeds the model's {positions} positions"
                        + ("" if max_length else "; pass a smaller --max_length"))
  return length


def check_output_dir(path: str, overwrite: bool) -> Path:
  """Refuses to mix new results into an earlier run's directory unless asked to, and --overwrite
  replaces only an earlier infer.py run's results (files.check_replaceable)."""
  out = files.check_output_value(path)
  if out.exists() and not out.is_dir():
    raise RomeFlaxError(f"--output_dir {path} is a file")
  if files.entries(out) and not overwrite:
    raise RomeFlaxError(f"--output_dir {path} already holds results; pass --overwrite or choose another directory")
  if overwrite:
    files.check_replaceable(out, "infer", report.RESULT_ENTRIES, legacy="summary.json")
  return out


# ----------------------------------------------------------------------------- the run


def run(args):

  evaluation.check_options(batch_size=args.batch_size, measure_speed=args.measure_speed,
                           latency_examples=args.latency_examples, speed_repeats=args.speed_repeats,
                           chunk_size=args.chunk_size, devices=args.devices)
  if args.limit is not None and args.limit < 1:
    raise RomeFlaxError(f"--limit must be >= 1, got {args.limit}")
  targets = parse_targets(args.target_speedup)
  if args.thresholds is not None:
    ep.parse_thresholds(args.thresholds)  # fail on a bad list before loading anything
  out = check_output_dir(args.output_dir, args.overwrite)
  named_task = _named_task(args)
  model = load_model(args.checkpoint, named_task.num_labels if named_task is not None else None)
  length = check_max_length(args.max_length, model)
  task = resolve_task(args, model)
  if args.thresholds_file is not None:
    policies, token_policies = calibrated_policies(args, model.config)
  else:
    policies = build_policies(args, model.config)
    token_policies = build_token_policies(args, model.config)
  examples = load_examples(args, task)
  if args.truncate:
    examples, warning = kind_of(task).fit_to_length(examples, model.tokenizer, length)
    if warning:
      print(f"warning: {warning}", file=sys.stderr)
  progress = lambda desc: (lambda it: _checked(progress_lib.iterate(it, desc, show=not args.no_progress)))
  # One writer per directory (train.py's lock); the results are staged and swapped in whole, and a
  # signal, an error or a full disk leaves the directory as it was.
  with RunLock(out):
    files.settle_output(out)
    check_output_dir(args.output_dir, args.overwrite)   # again, now that no other run can write there
    with files.staged_output(out, "infer", commit_if=preemption.check_interrupted) as stage:
      result = evaluation.evaluate_exits(
          model, task, examples, policies, batch_size=args.batch_size, max_length=args.max_length,
          metric=args.metric, measure_speed=args.measure_speed, latency_examples=args.latency_examples,
          speed_repeats=args.speed_repeats, chunk_size=args.chunk_size, progress=progress, devices=args.devices,
          token_policies=token_policies, grid_from_data=args.thresholds is None and args.thresholds_file is None)
      written = report.write_evaluation(stage, result, checkpoint=str(args.checkpoint))
  print_evaluation(result, targets)
  print(f"wrote {len(written)} files to {out}")
  return result


def _checked(batches):
  """Batches, with a check between them for a signal whose exception a library swallowed."""
  for batch in batches:
    preemption.check_interrupted()
    yield batch


def parse_targets(text: str) -> tuple:
  """--target_speedup '2,3' -> (2.0, 3.0); each must be a number >= 1."""
  try:
    values = tuple(float(v) for v in str(text).split(",") if v.strip())
  except ValueError:
    raise RomeFlaxError(f"--target_speedup takes a comma list of layer ratios, e.g. 2,3; got {text!r}") from None
  if any(not v >= 1.0 or v == float("inf") for v in values):
    raise RomeFlaxError(f"--target_speedup ratios must be finite numbers >= 1, got {text!r}")
  return values


def print_evaluation(ev: evaluation.ExitsEvaluation, targets: tuple = ()) -> None:
  print(f"{ev.task.name} {ev.split}: {ev.num_examples} examples, {ev.num_layers} layers, "
        f"all-exits pass {ev.all_exits_seconds:.1f} s (batch {ev.batch_size})")
  if ev.per_exit:
    print("\nper exit:\n" + report.to_markdown(ev.per_exit))
  shown, repeats = sweep.distinct(ev.settings)
  print("thresholds (layer ratio = L / average exit layer; FLOPs ratio counts exit heads that ran):\n"
        + report.to_markdown(shown, ev.sweep_columns))
  for note in repeats:
    print(f"  {note}")
  if ev.token_settings:
    print("token-level early exit (TOKEE, run for real; layer ratio = L / average layers per word; FLOPs ratio "
          "charges K/V of halted pieces and every exit head that ran):\n"
          + report.to_markdown(ev.token_settings, [c for c in ev.sweep_columns if c != "exit_shares"]))
  if ev.static:
    print("static exit (the model cut to k layers, exit k for every example: the baseline at equal cost):\n"
          + report.to_markdown(ev.static, [c for c in ev.sweep_columns if c != "exit_shares"]))
  for ratio in targets if ev.metric else ():
    rows = ev.settings + ev.token_settings
    got = sweep.best_at(rows, ev.metric, ratio)
    print(f"at >= {ratio:g}x layers: " + (f"{got['setting']} ({ev.metric} {got[ev.metric]:.2f}, layer ratio "
                                         f"{got['layer_ratio']:.2f}, FLOPs ratio {got['flops_ratio']:.2f})" if got
                                         else f"no setting reaches it (the fastest: {max(r['layer_ratio'] for r in rows):.2f}x)"))
  if ev.best is not None:
    best, metric = ev.best, ev.metric
    print(f"fastest setting within 1 point of the final exit ({metric} {ev.final_metric:.2f}): {best['setting']} "
          f"({metric} {best[metric]:.2f}, layer ratio {best['layer_ratio']:.2f}, "
          f"FLOPs ratio {best['flops_ratio']:.2f})\n")
  if not ev.speed and ev.best is not None:
    print(f"nothing timed: no setting within 1 point of the final exit saves {evaluation.MIN_TIMED_RATIO:g}x or more "
          "(--measure_speed all times every setting)")
  if ev.speed:
    shown = ["setting", "layer_ratio", f"throughput_speedup_b{ev.batch_size}", "latency_layer_ratio",
             "latency_speedup_b1", "latency_ms", "full_latency_ms", "warmup_s_throughput", "warmup_s_latency",
             "exits_match_offline"]
    print(f"measured wall clock vs the full model, same examples and batch size (compile and warm-up excluded; "
          f"latency on the first {ev.latency_examples} examples at batch 1):\n"
          + report.to_markdown(ev.speed, shown))


def main(argv: Optional[list[str]] = None) -> int:
  return cli.run(run, build_parser(), argv)
