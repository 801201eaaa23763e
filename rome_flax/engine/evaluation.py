"""Early-exit evaluation of a model on a dataset, as a library program: figures in, figures out.

`evaluate_exits` runs one all-exits pass, caches every exit's logits, evaluates every policy
offline from that cache (per-exit metrics, per-setting metric / exit statistics / FLOPs ratio,
each example's prediction and exit), then times the throughput and latency paths of the chosen
settings against the full model (`speed.early_exit_speed`). It writes no file and prints nothing:
`report.write_evaluation` writes the results, infer.py prints them.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable, Iterable, Iterator, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from rome_flax.engine import early_exit as ee
from rome_flax.engine import exit_policy as ep
from rome_flax.engine import inference, speed, sweep, token_exit
from rome_flax.errors import RomeFlaxError
from rome_flax.kinds import data
from rome_flax.kinds import metrics, token_data
from rome_flax.kinds.kind import check_matches, kind_of
from rome_flax.kinds.tasks import TaskSpec

MEASURE_SPEED = ("best", "all", "none")
# --measure_speed best times a setting only when it saves at least this much (layer ratio; TOKEE: FLOPs ratio):
# timing a setting where nothing exits measures only the early-exit paths' overhead (issue 25: 0.72x at 1.001x).
MIN_TIMED_RATIO = 1.1
DEFAULT_MAX_LENGTH = 128
# Examples tokenised and run through the all-exits pass at a time: what is kept of a chunk is its
# logits [E, n, C], lengths and ids (~60 bytes an example for 6 exits), not its tokens, so peak
# memory no longer follows the split's tokenised size. The speed measurement runs on the first chunk.
STREAM_EXAMPLES = 8192

# progress("what") -> a wrapper of an iterable (e.g. a tqdm bar); None: no progress shown
Progress = Optional[Callable[[str], Callable[[Iterable], Iterable]]]


@dataclasses.dataclass
class ExitsEvaluation:
  """What `evaluate_exits` found; `summary` is summary.json's content (less the checkpoint's name)."""
  task: TaskSpec
  split: str
  example_ids: np.ndarray            # the split's own example ids (GLUE 'index'), one per example
  metric: Optional[str]              # the metric settings are ranked and plotted by; None: no labels
  num_layers: int
  batch_size: int
  max_length: int
  all_exits_seconds: float           # the all-exits pass (compile included)
  per_exit: list[dict]               # metrics.per_exit_metrics; [] without labels
  static: list[dict]                 # sweep.static_exits: the model cut to k layers, per k (labelled)
  settings: list[dict]               # sweep.evaluate rows, one per policy
  policies: list[ep.ExitPolicy]
  predictions: list[np.ndarray]      # per policy: class ids or values per example
  exits: list[np.ndarray]            # per policy: 0-based exit per example
  best: Optional[dict]               # the fastest setting within 1 point of the final exit (labelled)
  speed: list[dict]                  # measured rows of the timed settings
  latency_examples: int              # examples the latency path was timed on
  words: Optional[list] = None       # token tasks: each sentence's words (prediction files)
  labels: Optional[np.ndarray] = None   # token tasks: gold tag ids [N, W] (-1 past a sentence's words)
  per_type: Optional[dict] = None    # entity tag sets: the final exit's scores per entity type
  token_policies: list = dataclasses.field(default_factory=list)   # TOKEE settings (token tasks)
  token_settings: list = dataclasses.field(default_factory=list)   # TOKEE rows, one per token policy (run for real)
  token_predictions: list = dataclasses.field(default_factory=list)   # per token policy: tag ids [N, W]
  token_exits: list = dataclasses.field(default_factory=list)         # per token policy: word exit layers [N, W]

  @property
  def labelled(self) -> bool:
    return self.metric is not None

  @property
  def num_examples(self) -> int:
    return len(self.example_ids)

  @property
  def final_metric(self) -> Optional[float]:
    return self.per_exit[-1][self.metric] if self.per_exit else None

  @property
  def sweep_columns(self) -> list[str]:
    """The settings table's columns: the ranked metric first, then the task's other metrics."""
    named = [self.metric] + [m for m in self.task.metric_names if m != self.metric] if self.labelled else []
    return ["setting", *named, "avg_exit_layer", "layer_ratio", "flops_ratio", "expected_saving", "exit_shares"]

  @property
  def summary(self) -> dict:
    return {"task": self.task.name, "split": self.split, "examples": self.num_examples,
            "num_layers": self.num_layers, "labelled": self.labelled, "metric": self.metric,
            "batch_size": self.batch_size, "max_length": self.max_length,
            "all_exits_pass_seconds": round(self.all_exits_seconds, 3),
            "final_exit": self.per_exit[-1] if self.per_exit else None, "settings": self.settings,
            "static_exits": self.static,
            "speed": self.speed, **({"final_exit_per_type": self.per_type} if self.per_type else {}),
            **({"tokee": self.token_settings} if self.token_settings else {})}


def _no_progress(desc: str):
  return lambda iterable: iterable


def check_options(*, batch_size: int, measure_speed: str = "best", latency_examples: int = 128,
                  speed_repeats: int = 2, chunk_size: Optional[int] = None, devices: Optional[int] = None) -> None:
  """Raises RomeFlaxError for an option out of range (infer.py checks before loading anything)."""
  mesh = inference.local_mesh(devices)
  if mesh.size > 1 and batch_size % mesh.size:
    raise RomeFlaxError(f"batch_size {batch_size} must be a multiple of the {mesh.size} devices it is split across "
                        "(or pass --devices)")
  counts = {"batch_size": batch_size, "latency_examples": latency_examples, "speed_repeats": speed_repeats,
            "chunk_size": 1 if chunk_size is None else chunk_size}
  for name, value in counts.items():
    if value < 1:
      raise RomeFlaxError(f"{name} must be >= 1, got {value}")
  if measure_speed not in MEASURE_SPEED:
    raise RomeFlaxError(f"measure_speed must be one of {', '.join(MEASURE_SPEED)}, got {measure_speed!r}")


def _chunks(examples, size: int) -> Iterator[data.Split]:
  """A split in chunks of `size` examples, or the chunks an iterable of splits already is (a reader
  that streams its file)."""
  if not isinstance(examples, (data.Split, token_data.TokenSplit)):
    yield from examples
    return
  for start in range(0, len(examples), size):
    yield examples.rows(start, start + size)


@dataclasses.dataclass
class AllExits:
  """One all-exits pass over a split: every exit's logits and what the offline sweep reads with them."""
  exit_logits: np.ndarray            # [E, N, C]; token tasks word-level [E, N, W, C]
  lengths: np.ndarray                # real tokens per example
  example_ids: np.ndarray
  labels: Optional[np.ndarray]       # [N] (token tasks [N, W], -1 past a sentence's words); None: unlabelled
  words: list                        # token tasks: each sentence's words
  word_mask: Optional[np.ndarray]    # token tasks: [N, W] word slots in use
  split: str
  timed_set: data.EncodedSplit       # the first chunk, encoded (what the speed measurement runs on)
  encoded_chunks: list               # token tasks: every chunk, encoded (TOKEE runs for real on them)
  seconds: float                     # the pass, compile included

  @property
  def labelled(self) -> bool:
    return self.labels is not None


def all_exits(model, task: TaskSpec, examples, *, batch_size: int = 64, max_length: Optional[int] = None,
              progress: Progress = None, mesh=None, prepared=None) -> AllExits:
  """Every exit's logits for a split's examples (a `data.Split`, or an iterable of them read as a
  stream), tokenised and run `STREAM_EXAMPLES` at a time: the cache `evaluate_exits` sweeps and
  `calibration` calibrates from."""
  cfg, bar, kind = model.config, progress or _no_progress, kind_of(task)
  max_length = max_length_of(model, max_length)
  prepared = ee.prepare_params(model.params) if prepared is None else prepared
  mesh = inference.local_mesh() if mesh is None else mesh
  t0 = time.perf_counter()
  logits, lengths, ids, labels, words, timed_set, split_name, encoded_chunks = [], [], [], [], [], None, None, []
  for chunk in _chunks(examples, STREAM_EXAMPLES):
    encoded = kind.encode(model.tokenizer, chunk, task, max_length)
    if kind.token_level_exit:   # TOKEE runs for real on every chunk; else only the first chunk is kept (timed)
      encoded_chunks.append(encoded)
    words += kind.chunk_words(chunk)
    labels.append(kind.chunk_labels(chunk, encoded))
    logits.append(inference.run_all_exits(prepared, cfg, encoded, batch_size, progress=bar("all exits"), mesh=mesh))
    lengths.append(encoded.lengths)
    ids.append(chunk.ids)
    timed_set = encoded if timed_set is None else timed_set
    split_name = chunk.split
  if timed_set is None:
    raise RomeFlaxError("no examples to evaluate")
  exit_logits, labels, word_mask = kind.join(logits, labels, words)
  return AllExits(exit_logits=exit_logits, lengths=np.concatenate(lengths),
                  example_ids=np.concatenate(ids), labels=labels,
                  words=words, word_mask=word_mask, split=split_name, timed_set=timed_set,
                  encoded_chunks=encoded_chunks, seconds=time.perf_counter() - t0)


def max_length_of(model, requested: Optional[int] = None) -> int:
  """The length examples are cut to: the one asked for, else the export's training length, else 128."""
  return requested or model.export_info.max_length or DEFAULT_MAX_LENGTH


def with_data_grid(policies: Sequence[ep.ExitPolicy], exit_logits, word_mask=None) -> list[ep.ExitPolicy]:
  """The policies plus, per entropy / maxprob criterion among them, the thresholds of
  `exit_policy.grid_from_scores` (same options as that criterion's first policy), each criterion's
  settings sorted by threshold when every one is a single value; a threshold already there is kept once."""
  out: list = []
  for criterion in dict.fromkeys(p.criterion for p in policies):
    own = [p for p in policies if p.criterion == criterion]
    if criterion in ("entropy", "maxprob"):
      first = own[0]
      known = {np.asarray(p.threshold_E).tobytes() for p in own}
      for t in ep.grid_from_scores(criterion, exit_logits[0], word_mask, first.pool):
        new = first.replace(threshold_E=jnp.full_like(first.threshold_E, t))
        key = np.asarray(new.threshold_E).tobytes()
        if key not in known:
          known.add(key)
          own.append(new)
      if all(np.all(np.asarray(p.threshold_E) == np.asarray(p.threshold_E)[0]) for p in own):
        own.sort(key=lambda p: float(np.asarray(p.threshold_E)[0]))
    out += own
  return out


def evaluate_exits(model, task: TaskSpec, examples, policies: Sequence[ep.ExitPolicy], *,
                   batch_size: int = 64, max_length: Optional[int] = None, metric: Optional[str] = None,
                   measure_speed: str = "best", latency_examples: int = 128, speed_repeats: int = 2,
                   chunk_size: Optional[int] = None, progress: Progress = None, devices: Optional[int] = None,
                   token_policies: Sequence[token_exit.TokenPolicy] = (),
                   grid_from_data: bool = False) -> ExitsEvaluation:
  """Early-exit evaluation of a `MultiExitBert` on a split's examples (a `data.Split`, or an iterable
  of them read as a stream) under each policy.

  The examples are tokenised and run `STREAM_EXAMPLES` at a time; the paths are timed on the first
  chunk.
  max_length defaults to the export's training max length (else 128); metric to the task's primary
  metric (labelled splits only). measure_speed: time the fastest setting within 1 point of the final
  exit ('best'; labelled splits), every setting ('all') or none; the latency path is timed on the
  first `latency_examples`, each side's fastest of `speed_repeats` passes counts. devices: how many of
  this process's devices the all-exits pass and the batch-size passes use (default all; results are
  those of one device). token_policies: token-level early exit (TOKEE) settings of a token task, each
  run for real over the split (halted words change later layers: no all-exits pass can stand in),
  timed like the policies. grid_from_data: each entropy / maxprob criterion among the policies also
  gets `exit_policy.grid_from_scores`' thresholds, read off the cached first-exit logits (so the sweep
  spans from little to nearly all early exit on any task); a criterion's rows are sorted by threshold.
  """
  check_options(batch_size=batch_size, measure_speed=measure_speed, latency_examples=latency_examples,
                speed_repeats=speed_repeats, chunk_size=chunk_size, devices=devices)
  cfg = model.config
  if metric is not None and metric not in task.metric_names:
    raise RomeFlaxError(f"task {task.name} has metrics {', '.join(task.metric_names)}, not {metric!r}")
  if not policies:
    raise RomeFlaxError("no exit policy to evaluate")
  for policy in policies:
    if policy.num_exits != cfg.num_exits:
      raise RomeFlaxError(f"policy {policy.describe()} is for {policy.num_exits} exits, the model has "
                          f"{cfg.num_exits}")
  bar = progress or _no_progress
  max_length = max_length_of(model, max_length)
  prepared = ee.prepare_params(model.params)
  mesh = inference.local_mesh(devices)

  check_matches(task, cfg)
  kind = kind_of(task)
  if token_policies and not kind.token_level_exit:
    raise RomeFlaxError("token-level early exit (TOKEE) is for token tasks (sequence labelling); this task has one "
                        "prediction per sentence")
  cache = all_exits(model, task, examples, batch_size=batch_size, max_length=max_length, progress=bar, mesh=mesh,
                    prepared=prepared)
  exit_logits, lengths_N, example_ids, labels_N = cache.exit_logits, cache.lengths, cache.example_ids, cache.labels
  words, word_mask, timed_set, split_name = cache.words, cache.word_mask, cache.timed_set, cache.split
  encoded_chunks, all_exits_seconds, labelled = cache.encoded_chunks, cache.seconds, cache.labelled
  if metric is not None and not labelled:
    raise RomeFlaxError(f"split {split_name!r} has no labels: metric {metric!r} cannot be computed")
  if grid_from_data:
    policies = with_data_grid(policies, exit_logits, word_mask)
  metric = (metric or metrics.primary_metric(task)) if labelled else None
  per_exit = metrics.per_exit_metrics(task, exit_logits, labels_N) if labelled else []
  settings = sweep.evaluate(policies, exit_logits, cfg, lengths_N, labels_N, task, word_mask)
  decided = [sweep.decisions(policy, exit_logits, cfg.is_regression, word_mask) for policy in policies]
  per_type = kind.per_type_scores(task, exit_logits[-1], labels_N) if labelled else None
  best = sweep.best_tradeoff(settings, metric, per_exit[-1][metric]) if labelled else None

  timed = {"all": range(len(policies)), "none": [],
           "best": [settings.index(best)] if best is not None and best["layer_ratio"] >= MIN_TIMED_RATIO
           else []}[measure_speed]
  speed_rows = []
  n_lat = min(latency_examples, len(timed_set))
  for k in bar("measured speed")(timed):
    measured = speed.early_exit_speed(prepared, cfg, policies[k], timed_set, batch_size,
                                      latency_examples=n_lat, repeats=speed_repeats, chunk_size=chunk_size,
                                      mesh=mesh)
    speed_rows.append(speed_row(cfg, policies[k], measured, timed_set.lengths, decided[k][1][:len(timed_set)]))

  token_rows, token_preds, token_exits_, token_runs = [], [], [], []
  for policy in bar("TOKEE settings")(token_policies):
    runs = [token_exit.token_pass(prepared, cfg, policy, enc, batch_size).run() for enc in encoded_chunks]
    width = word_mask.shape[1]
    run = token_exit.TokenRun(np.concatenate([_widen(r.word_logits, width, 0.0) for r in runs]),
                              np.concatenate([_widen(r.word_exits, width, -1) for r in runs]),
                              np.concatenate([r.queries for r in runs]), np.concatenate([r.keys for r in runs]))
    token_runs.append(run)
    token_preds.append(run.word_logits.argmax(-1))
    token_exits_.append(run.word_exits)
    token_rows.append(token_row(cfg, task, policy, run, lengths_N, labels_N))
  if token_policies and measure_speed != "none":
    reference = per_exit[-1][metric] if labelled else None
    ok = [k for k, r in enumerate(token_rows) if (reference is None or r[metric] >= reference - 1.0)
          and (measure_speed == "all" or r["flops_ratio"] >= MIN_TIMED_RATIO)]
    timed_tokee = range(len(token_rows)) if measure_speed == "all" else \
        ([max(ok, key=lambda k: token_rows[k]["flops_ratio"])] if ok and labelled else [])
    for k in bar("TOKEE measured speed")(timed_tokee):
      measured = speed.token_exit_speed(prepared, cfg, token_policies[k], timed_set, batch_size,
                                        latency_examples=n_lat, repeats=speed_repeats)
      speed_rows.append(token_speed_row(cfg, token_policies[k], measured, timed_set.lengths, token_runs[k]))

  return ExitsEvaluation(
      task=task, split=split_name, example_ids=example_ids, metric=metric, num_layers=cfg.num_layers,
      batch_size=batch_size, max_length=max_length, all_exits_seconds=all_exits_seconds, per_exit=per_exit,
      static=sweep.static_exits(cfg, per_exit, lengths_N) if labelled else [],
      settings=settings, policies=list(policies), predictions=[p for p, _ in decided],
      exits=[e for _, e in decided], best=best, speed=speed_rows, latency_examples=n_lat,
      **kind.evaluation_extras(words, labels_N), per_type=per_type, token_policies=list(token_policies), token_settings=token_rows, token_predictions=token_preds, token_exits=token_exits_)


def _widen(x: np.ndarray, width: int, fill) -> np.ndarray:
  """A chunk's word-slot array [n, W, ...] padded to the split's widest W."""
  return np.pad(x, [(0, 0), (0, width - x.shape[1])] + [(0, 0)] * (x.ndim - 2), constant_values=fill)


def token_row(cfg, task: TaskSpec, policy: token_exit.TokenPolicy, run: token_exit.TokenRun, lengths_N,
              labels_NxW) -> dict:
  """One TOKEE setting: the task's metrics, executed layers per word and the FLOPs ratio."""
  words = run.word_exits >= 0
  avg = float((run.word_exits[words] + 1).mean())
  row = {"criterion": "tokee", "setting": policy.describe(), "window": policy.window,
         "thresholds": [float(f"{v:.6g}") for v in np.asarray(policy.threshold_L)]}
  if labels_NxW is not None:
    row.update(metrics.compute_metrics(task, run.word_logits, labels_NxW))
  L = cfg.num_layers
  row.update({"avg_exit_layer": avg, "layer_ratio": L / avg, "expected_saving": avg / L,
              "flops_ratio": token_exit.flops_ratio(cfg, run.queries, run.keys, lengths_N),
              "exit_shares": (np.bincount(run.word_exits[words], minlength=L) / words.sum()).round(4).tolist()})
  return row


def token_speed_row(cfg, policy: token_exit.TokenPolicy, measured: speed.EarlyExitSpeed, lengths_N,
                    offline: token_exit.TokenRun) -> dict:
  """One timed TOKEE setting, in the columns of `speed_row` (layer ratio = per word)."""
  thr, lat = measured.throughput.run, measured.latency.run
  per_word = lambda exits: cfg.num_layers / float((exits[exits >= 0] + 1).mean())
  same = lambda run: np.array_equal(run.word_exits, offline.word_exits[:len(run.word_exits), :run.word_exits.shape[1]])
  return _timed_row(policy.describe(), measured, per_word(thr.word_exits),
                    token_exit.flops_ratio(cfg, thr.queries, thr.keys, lengths_N[:len(thr.word_exits)]),
                    per_word(lat.word_exits), same(thr) and same(lat))


def speed_row(cfg, policy: ep.ExitPolicy, measured: speed.EarlyExitSpeed, lengths_N, offline_exit_N) -> dict:
  """One timed setting: measured speed-ups and rates beside the exit statistics of the runs, and
  whether both paths took exactly the offline decisions."""
  thr, lat, n_lat = measured.throughput.run, measured.latency.run, measured.latency_examples
  stats = sweep.exit_statistics(cfg, thr.exit_index_N, lengths_N)
  return _timed_row(policy.describe(), measured, stats["layer_ratio"], stats["flops_ratio"],
                    sweep.exit_statistics(cfg, lat.exit_index_N, lengths_N[:n_lat])["layer_ratio"],
                    np.array_equal(thr.exit_index_N, offline_exit_N)
                    and np.array_equal(lat.exit_index_N, offline_exit_N[:n_lat]))


def _timed_row(setting: str, measured: speed.EarlyExitSpeed, layer_ratio: float, flops_ratio: float,
               latency_layer_ratio: float, exits_match_offline: bool) -> dict:
  """The columns of speed.{json,csv,md}, whichever criterion was timed."""
  n, n_lat = measured.examples, measured.latency_examples
  thr, lat = measured.throughput, measured.latency
  return {
      "setting": setting,
      "layer_ratio": layer_ratio,
      "flops_ratio": flops_ratio,
      f"throughput_speedup_b{measured.batch_size}": measured.throughput_speedup,
      "throughput_ex_per_s": n / thr.seconds,
      "full_ex_per_s": n / measured.full_throughput.seconds,
      "latency_layer_ratio": latency_layer_ratio,
      "latency_speedup_b1": measured.latency_speedup,
      "latency_ms": 1e3 * lat.seconds / n_lat, "full_latency_ms": 1e3 * measured.full_latency.seconds / n_lat,
      "warmup_s_throughput": thr.warmup_seconds, "warmup_s_latency": lat.warmup_seconds,
      "warmup_s_full": measured.full_throughput.warmup_seconds + measured.full_latency.warmup_seconds,
      "exits_match_offline": bool(exits_match_offline),
  }
