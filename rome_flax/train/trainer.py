"""The training loop: steps over a `schedule.Schedule`, with evaluation, best-checkpoint selection,
checkpointing, metric logging and progress as hooks that run after the steps they are due at.

The host only feeds batches and reads metrics back every `log_every` steps (no sync per step).
Everything a step depends on is a function of (config, step): the batch order of an epoch comes
from (seed, data epoch), the dropout key from (seed, step); so `resume` restores a checkpoint and
goes on exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rome_flax import progress as progress_lib
from rome_flax.engine import inference
from rome_flax.errors import RomeFlaxError
from rome_flax.io import files as files_lib
from rome_flax.io import integrity
from rome_flax.io import preemption
from rome_flax.io import primary
from rome_flax.io import sharding as sharding_lib
from rome_flax.io.files import atomic_write_text, write_json
from rome_flax.io.runlock import RunLock
from rome_flax.kinds import data as data_lib
from rome_flax.kinds import metrics as metrics_lib
from rome_flax.kinds import synthetic, tasks
from rome_flax.kinds.kind import kind_of
from rome_flax.kinds.sources import eval_splits
from rome_flax.kinds.tasks import TaskSpec
from rome_flax.model import encoder as model_lib
from rome_flax.model import targets as targets_lib
from rome_flax.model.config import ModelConfig
from rome_flax.model.pretrained import EXPORT_CONFIG, ExportInfo, MultiExitBert
from rome_flax.train import methods
from rome_flax.train import train_step as steps
from rome_flax.train.checkpoint import RunCheckpoints
from rome_flax.train.schedule import Schedule
from rome_flax.train.train_config import DataOptions, TrainConfig

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tb"
EXPORT_DIR = "export"
# What a run writes (glob patterns): all that train.py --overwrite may replace.
RUN_ENTRIES = (CONFIG_FILE, METRICS_FILE, TENSORBOARD_DIR, "checkpoints", EXPORT_DIR, f"{EXPORT_DIR}.old",
               f".{EXPORT_DIR}.tmp-*")


@dataclasses.dataclass
class RunData:
  task: TaskSpec
  train: data_lib.EncodedSplit
  evals: dict[str, data_lib.EncodedSplit]


# ----------------------------------------------------------------------------- setup


def resolve_task(cfg: DataOptions) -> TaskSpec:
  """The run's task (`tasks.resolve_task`): label names its registry entry lacks come from the training
  data: a token task's tag set from the train split, a custom task's classes from custom_labels or the train
  file's label column."""
  if cfg.task.strip().lower() == "custom" and cfg.train_file is None:
    raise RomeFlaxError("the custom task needs train_file (and dev_file)")

  def labels():   # the task's kind from a stand-in (its labels are what is being read)
    named = tasks.stand_in(cfg.task)
    return (kind_of(named).labels_in_data(named, cfg.sources()) or cfg.custom_labels
            or data_lib.custom_label_names(cfg.train_file, cfg.label_column))
  return tasks.resolve_task(cfg.task, labels, cfg.custom_regression)


def load_model(cfg: TrainConfig, task: TaskSpec) -> MultiExitBert:
  net, max_length, seed = cfg.network, cfg.data.max_length, cfg.optim.seed
  if net.model is None:
    if not (math.isfinite(net.random_model_init) and net.random_model_init > 0):
      raise RomeFlaxError(f"random_model_init must be a number > 0, got {net.random_model_init}")
    if net.random_model_layers < 2:
      raise RomeFlaxError(f"a multi-exit model needs at least 2 layers, got random_model_layers "
                          f"{net.random_model_layers}")
    mcfg = ModelConfig(vocab_size=len(synthetic.VOCAB), hidden_size=net.random_model_hidden,
                       num_hidden_layers=net.random_model_layers, num_attention_heads=net.random_model_heads,
                       intermediate_size=net.random_model_intermediate,
                       initializer_range=net.random_model_init,
                       max_position_embeddings=max(max_length, 64), num_labels=task.num_labels,
                       exit_pooling=net.exit_pooling, dtype=net.dtype, head=task.kind,
                       classifier_dropout=net.classifier_dropout)
    return MultiExitBert.from_config(mcfg, seed=seed, tokenizer=synthetic.build_tokenizer())
  model = MultiExitBert.from_pretrained(net.model, num_labels=task.num_labels, exit_pooling=net.exit_pooling,
                                        dtype=net.dtype, seed=seed, head=task.kind, label_names=task.label_names,
                                        classifier_dropout=net.classifier_dropout)
  if model.config.head != task.kind:
    raise RomeFlaxError(f"{net.model} is a model with {model.config.head} exits; task {task.name} needs "
                        f"{task.kind} exits")
  kind_of(task).check_model_labels(task, model.export_info.label_names, net.model)
  if model.config.num_layers < 2:
    raise RomeFlaxError("a multi-exit model needs at least 2 layers")
  if max_length > model.config.max_position_embeddings:
    raise RomeFlaxError(f"max_length {max_length} exceeds the model's {model.config.max_position_embeddings} "
                        "positions")
  return model


def load_data(cfg: DataOptions, task: TaskSpec, tokenizer) -> RunData:
  """The run's training split (its first train_rows) and the dev split(s) its sources hold, encoded."""
  kind, sources = kind_of(task), cfg.sources()
  train = kind.read(task, "train", sources, first_rows=cfg.train_rows)
  if not kind.labelled(train):
    raise RomeFlaxError("the training split has no labels")
  evals = {}
  for split in eval_splits(task, sources):
    examples = kind.read(task, split, sources)
    if not kind.labelled(examples):
      raise RomeFlaxError(f"the {split} split has no labels")
    evals[split] = kind.encode(tokenizer, examples, task, cfg.max_length)
  return RunData(task, kind.encode(tokenizer, train, task, cfg.max_length), evals)


def check_method(cfg: TrainConfig, task: TaskSpec, model: MultiExitBert) -> None:
  """The method's own `validate` hook (methods.Method), if it has one."""
  validate = methods.get_method(cfg.objective.method).hook("validate")
  if validate is not None:
    validate(task, model)


def lock_output_dir(out: Path) -> RunLock:
  """The run's lock on its directory (runlock.py), taken by process 0 for every process: a second
  run on the same directory is refused, whatever its flags, until this one ends."""
  lock = RunLock(out)

  def take():
    if out.exists() and not out.is_dir():
      raise RomeFlaxError(f"output_dir {out} is a file")
    lock.acquire()
    return (1,)

  primary.decide(take, "locking the output directory", size=1)
  return lock


def _run_files(out: Path) -> list[str]:
  """What a directory holds besides rome_flax's bookkeeping (lock, marker, a cut-off write's temporaries)."""
  return files_lib.entries(out)


# Fields added with a default that changed the maths: a run saved before the field existed ran as this value.
# Each matters only where `applies` says (regression_targets: regression tasks); elsewhere it is not compared.
FORMER_DEFAULTS = {"regression_targets": ("raw", lambda cfg: _is_regression_config(cfg)),   # noqa: E731
                   "synthetic_fillers": ((5, 19), lambda cfg: cfg.data.task == "synthetic")}   # noqa: E731


def _is_regression_config(cfg: TrainConfig) -> bool:
  if cfg.data.custom_regression:
    return True
  try:   # no data is read
    return tasks.stand_in(cfg.data.task, cfg.data.custom_regression).is_regression
  except RomeFlaxError:
    return False


# What a resumed run may change: where it is, and how often it logs, evaluates and saves (never the maths).
RUN_OWNED = ("output_dir", "log_every", "eval_every", "eval_batch_size", "save_every", "keep_checkpoints")


def resume_config(out: Path, given: dict) -> Optional[TrainConfig]:
  """`train.py --resume`: the run's own config.json with the fields given on the command line (or by
  --config) on top; None when out holds no readable config.json (prepare_output_dir says why). A given
  field that changes the maths is refused there, naming it; RUN_OWNED fields may change."""
  try:
    saved = json.loads((out / CONFIG_FILE).read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, ValueError):
    return None
  if not isinstance(saved, dict):
    return None
  try:
    cfg = TrainConfig.from_dict(saved)
  except (RomeFlaxError, TypeError) as e:
    raise RomeFlaxError(f"cannot resume {out}: its {CONFIG_FILE} does not fit this version ({e})") from None
  for name, (former, applies) in FORMER_DEFAULTS.items():
    if name not in saved and applies(cfg):
      cfg = cfg.replace(**{name: former})
  return cfg.replace(**given, output_dir=str(out))


def config_differences(saved: dict, cfg: TrainConfig) -> list[str]:
  """The fields in which a run's saved config.json differs from cfg, RUN_OWNED fields aside. A field
  added since the run started counts as equal while it keeps the value the run had (FORMER_DEFAULTS
  where it applies, else the default)."""
  now = json.loads(json.dumps(cfg.to_dict()))
  defaults = json.loads(json.dumps(TrainConfig().to_dict()))
  for name, (former, applies) in FORMER_DEFAULTS.items():
    if name not in saved:
      if applies(cfg):
        defaults[name] = json.loads(json.dumps(former))
      else:
        now.pop(name, None)
  return sorted(k for k in set(saved) | set(now) if k not in RUN_OWNED and saved.get(k, defaults.get(k)) != now.get(k))


def settle_replaced(out: Path) -> None:
  """An earlier run that --overwrite moved aside: deleted once its replacement has saved a checkpoint,
  else (the replacement failed or was killed before, or the move itself was cut off, so what is in place
  may still be the old run's) put back in place."""
  aside = out / files_lib.REPLACED
  if not aside.is_dir():
    return
  saved = [d for d in (out / "checkpoints" / "last").glob("[0-9]*") if integrity.verify(d).intact]
  if (aside / files_lib.MOVED).exists() and (saved or integrity.verify(out / EXPORT_DIR).intact):
    files_lib.drop_aside(out)
  elif files_lib.restore_aside(out):
    log.warning("put back the run in %s: the --overwrite run that replaced it ended before its first checkpoint", out)


def prepare_output_dir(out: Path, cfg: TrainConfig, resume: bool, overwrite: bool) -> None:
  """Refuses to mix two runs in one directory; --resume needs the same config (wherever the
  directory is now, however its path is spelled); --overwrite replaces only a rome_flax run
  (files.check_replaceable), moving it aside until the new run's first checkpoint (`settle_replaced`).
  The caller holds the lock."""
  config_path = out / CONFIG_FILE
  if out.exists() and not out.is_dir():
    raise RomeFlaxError(f"output_dir {out} is a file")
  if sharding_lib.is_primary():
    settle_replaced(out)   # what an --overwrite cut off by a kill left
  if _run_files(out):
    if overwrite:
      files_lib.check_replaceable(out, "train", RUN_ENTRIES, legacy=CONFIG_FILE)   # moved aside below
    elif not resume:
      raise RomeFlaxError(f"output_dir {out} already holds a run; pass --resume to continue it or --overwrite")
    elif not config_path.is_file():
      raise RomeFlaxError(f"output_dir {out} is not empty and holds no {CONFIG_FILE}: not a rome_flax run")
    else:
      try:
        saved = json.loads(config_path.read_text(encoding="utf-8"))
        if not isinstance(saved, dict):
          raise ValueError("not a JSON object")
      except (OSError, UnicodeDecodeError, ValueError) as e:
        raise RomeFlaxError(f"cannot resume {out}: {config_path} is unreadable ({type(e).__name__}: {e})") from None
      differ = config_differences(saved, cfg)
      if differ:
        raise RomeFlaxError(f"cannot resume {out}: config differs in {', '.join(differ)} (a resumed run keeps its "
                            f"maths; it may change only {', '.join(RUN_OWNED)})")
  sharding_lib.barrier("rome_flax:output_dir_checked")   # every process has looked before one writes
  if sharding_lib.is_primary():
    if overwrite and _run_files(out):
      files_lib.move_aside(out)
    files_lib.mark_output(out, "train")   # first: a directory holding a config.json is always marked
    if overwrite or not config_path.is_file():   # a resumed run keeps the config.json it started with
      write_json(config_path, cfg.to_dict(), sort_keys=True)
  sharding_lib.barrier("rome_flax:output_dir_ready")


# ----------------------------------------------------------------------------- evaluation


def evaluate(eval_step, params, task: TaskSpec, encoded: data_lib.EncodedSplit, batch_size: int):
  """Every exit's metrics on one split. Returns (list of per-exit metric dicts, logits [E, N, C])."""
  logits_ExNxC = inference.exit_logits_of(lambda batch: eval_step(params, batch), encoded, batch_size)
  return metrics_lib.per_exit_metrics(task, logits_ExNxC, encoded.labels), logits_ExNxC


def exit_values(task: TaskSpec, per_exit: list[dict]) -> list[float]:
  """The primary metric of every exit (a per-exit dict may carry other keys, e.g. its exit number)."""
  key = metrics_lib.primary_metric(task)
  return [float(m[key]) for m in per_exit]


def selection_value(select_by: str, task: TaskSpec, per_exit: list[dict]) -> float:
  values = exit_values(task, per_exit)
  return float(values[-1] if select_by == "final_exit" else np.mean(values))


def format_exits(task: TaskSpec, per_exit: list[dict]) -> str:
  return f"{metrics_lib.primary_metric(task)} per exit: " + " ".join(f"{v:.1f}" for v in exit_values(task, per_exit))


# ----------------------------------------------------------------------------- logging


class MetricsWriter:
  """The one writer of a run's metrics: metrics.jsonl (appended; on resume, cut back to the resumed
  step so nothing is logged twice) and TensorBoard events.

  A record is {"step", "kind", ...}: "train" records hold scalars (TensorBoard tag kind/name);
  "eval" records hold a split and per-exit metric dicts (tag split/name/exitK).
  """

  def __init__(self, out: Path, start_step: int):
    self.path = out / METRICS_FILE
    self.enabled = sharding_lib.is_primary()   # one writer per run, however many processes
    if not self.enabled:
      return
    if self.path.is_file():
      kept = [line for line in self.path.read_text(encoding="utf-8", errors="replace").splitlines()
              if record_step(line) <= start_step]
      atomic_write_text(self.path, "".join(line + "\n" for line in kept))
    self.tb = _summary_writer_class()(str(out / TENSORBOARD_DIR), purge_step=start_step or None)

  def write(self, records: list[dict]) -> None:
    if not self.enabled:
      return
    with open(self.path, "a") as f:
      f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    for record in records:
      for tag, value in _scalars(record):
        self.tb.add_scalar(tag, value, record["step"])
    self.tb.flush()

  def close(self) -> None:
    if self.enabled:
      self.tb.close()


def _summary_writer_class():
  """tensorboardX's SummaryWriter, imported without torch. Its writer module imports torch whenever torch is
  installed, only to accept torch tensors; we log Python floats. That import was 2.7 s of every train.py
  start on a machine with torch (cProfile of the chaos script's 12-step run: 13 s in all, AMD EPYC); a torch
  this process already imported is left alone."""
  import sys
  if "torch" in sys.modules or "tensorboardX" in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules["torch"] = None   # `import torch` raises ImportError inside tensorboardX: its no-torch path
  try:
    from tensorboardX import SummaryWriter
  finally:
    if sys.modules.get("torch", 0) is None:
      del sys.modules["torch"]
  return SummaryWriter


def record_step(line: str) -> float:
  """A metrics line's step; inf (dropped on resume) for a line a kill cut off mid-write."""
  try:
    record = json.loads(line)
    return float(record.get("step", 0)) if isinstance(record, dict) else math.inf
  except (ValueError, TypeError):
    return math.inf


def _scalars(record: dict):
  """(TensorBoard tag, value) of every number in a record."""
  numbers = lambda d: ((k, v) for k, v in d.items() if k not in ("step", "exit") and isinstance(v, (int, float))
                       and not isinstance(v, bool))
  if "exits" in record:
    for i, m in enumerate(record["exits"]):
      yield from ((f"{record['split']}/{k}/exit{i + 1}", v) for k, v in numbers(m))
  else:
    yield from ((f"{record['kind']}/{k}", v) for k, v in numbers(record))


class TrainMetrics:
  """Keeps every step's metrics on device until `flush`, which reads them back in one host sync,
  stops the run on a non-finite loss, and writes one record per step (GR's cos / norms are per
  step); the window's training speed goes on its last record."""

  def __init__(self, writer: MetricsWriter, batch_size: int, last_good: Callable[[], str],
               shown: Callable[[dict], None]):
    self.writer, self.batch_size, self.last_good, self.shown = writer, batch_size, last_good, shown
    self.pending: list[tuple[int, Any]] = []
    self.restart_clock()

  def restart_clock(self) -> None:
    """The speed shown is training's: time spent evaluating or saving is not counted."""
    self.t0 = time.perf_counter()

  def add(self, info: "StepInfo") -> None:
    self.pending.append((info.step, info.metrics))

  def flush(self, _info: Optional["StepInfo"] = None) -> None:
    if not self.pending:
      return
    fetched = jax.device_get([m for _, m in self.pending])
    for (step, _), m in zip(self.pending, fetched):
      if not math.isfinite(float(m["loss"])):
        raise RomeFlaxError(f"non-finite loss at step {step}; stopping ({self.last_good()})")
    speed = len(self.pending) * self.batch_size / max(time.perf_counter() - self.t0, 1e-9)
    records = [{"step": step, "kind": "train", **{k: float(v) for k, v in m.items()}}
               for (step, _), m in zip(self.pending, fetched)]
    records[-1]["examples_per_s"] = speed
    self.writer.write(records)
    self.shown({"loss": f"{np.mean([r['loss'] for r in records]):.4f}", "ex_s": f"{speed:.0f}"})
    self.pending = []
    self.restart_clock()


# ----------------------------------------------------------------------------- hooks


@dataclasses.dataclass(frozen=True)
class StepInfo:
  """What a hook sees after a step: `step` steps have been taken; `metrics` are still on device."""
  step: int
  state: steps.TrainState
  metrics: dict


@dataclasses.dataclass(frozen=True)
class Hook:
  fn: Callable[[StepInfo], None]
  every: int = 0                                  # after every `every`-th step (0: not by count)
  when: Optional[Callable[[int], bool]] = None    # and after the steps for which when(step) holds

  def due(self, step: int) -> bool:
    return bool(self.every and step % self.every == 0) or (self.when is not None and self.when(step))


class Hooks:
  """Actions run after the steps they are due at, in the order they were added."""

  def __init__(self):
    self.hooks: list[Hook] = []

  def add(self, fn: Callable[[StepInfo], None], *, every: int = 0,
          when: Optional[Callable[[int], bool]] = None) -> None:
    self.hooks.append(Hook(fn, every, when))

  def run(self, info: StepInfo) -> None:
    for hook in self.hooks:
      if hook.due(info.step):
        hook.fn(info)


# ----------------------------------------------------------------------------- one stage's program


@dataclasses.dataclass(frozen=True)
class StageProgram:
  """A stage's optimiser (frozen to what the stage trains, so its state differs between stages)
  and its jitted step."""
  optimizer: Any
  step_fn: Callable


def stage_programs(cfg: TrainConfig, mcfg: ModelConfig, params, method: methods.Method, loss_cfg: methods.LossConfig,
                   protect: bool, sched: Schedule, mesh) -> dict[int, StageProgram]:
  optim_cfg = steps.OptimConfig(cfg.optim.learning_rate, int(cfg.optim.warmup_ratio * sched.stage_steps),
                                sched.stage_steps, cfg.optim.weight_decay, cfg.optim.adam_eps, cfg.optim.clip_norm,
                                cfg.optim.encoder_lr_scale)
  lr = steps.learning_rate_schedule(optim_cfg)   # every stage has its own run of the same schedule
  programs = {}
  for stage in range(1, method.num_stages + 1):
    optimizer = steps.stage_optimizer(optim_cfg, params, mcfg, method.name, stage)
    state_like = jax.eval_shape(lambda p: steps.init_train_state(p, optimizer, 0), params)
    programs[stage] = StageProgram(optimizer, steps.make_train_step(
        mcfg, loss_cfg, optimizer, stage=stage, protect_final=protect, schedule=lr,
        stage_offset=(stage - 1) * sched.stage_steps, accum_steps=cfg.optim.grad_accum_steps,
        state_sharding=sharding_lib.state_shardings(state_like, mesh, cfg.run.fsdp)))
  return programs


# ----------------------------------------------------------------------------- the run


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
          max_steps: Optional[int] = None) -> dict:
  """Runs (or resumes) a training run into cfg.run.output_dir; returns the final dev metrics per exit.

  max_steps stops early after that many total steps (quick checks), with a checkpoint and an export.
  SIGTERM / SIGINT stop it after the step in flight with a checkpoint saved: `preemption.Preempted`.
  The run holds output_dir's lock (runlock.py) throughout.
  """
  if max_steps is not None and max_steps < 1:
    raise RomeFlaxError(f"--max_steps must be >= 1, got {max_steps}")
  if resume and overwrite:
    raise RomeFlaxError("--resume continues the run in output_dir and --overwrite replaces it: pass one of them")
  files_lib.check_output_value(cfg.run.output_dir)
  sharding_lib.maybe_initialize_distributed()
  mesh = sharding_lib.data_mesh()  # data parallel over every device; one device: a no-op
  sharding_lib.check_batch_size(cfg.optim.batch_size, mesh, cfg.optim.grad_accum_steps)
  out = Path(cfg.run.output_dir).absolute()
  task = resolve_task(cfg.data)
  model = load_model(cfg, task)
  check_method(cfg, task, model)
  run_data = load_data(cfg.data, task, model.tokenizer)
  model = targets_lib.prepare(model, run_data.train.labels, cfg.data.regression_targets)
  lock = lock_output_dir(out)
  try:
    try:
      prepare_output_dir(out, cfg, resume, overwrite)   # inside: a failure after the move puts the old run back
      return _train_in(out, cfg, task, model, run_data, mesh, resume=resume, progress=progress, max_steps=max_steps)
    finally:
      if sharding_lib.is_primary():
        settle_replaced(out)
  finally:
    lock.release()


def _train_in(out: Path, cfg: TrainConfig, task: TaskSpec, model: MultiExitBert, run_data: RunData, mesh, *,
              resume: bool, progress: bool, max_steps: Optional[int]) -> dict:
  """The run itself, in a prepared and locked output directory."""
  mcfg = model.config
  method = methods.get_method(cfg.objective.method)
  sched = Schedule(data_lib.num_batches(run_data.train, cfg.optim.batch_size), cfg.optim.epochs, method.num_stages)
  loss_cfg = cfg.loss_config(task.is_regression, mcfg.regression_std)
  protect = methods.protect_final(loss_cfg, task.protect_final)
  programs = stage_programs(cfg, mcfg, model.params, method, loss_cfg, protect, sched, mesh)
  eval_step = steps.make_eval_step(mcfg, out_sharding=sharding_lib.replicated(mesh))
  prepare = method.hook("prepare")   # the method's inputs per batch (methods.Method), from the starting model
  batch_extras = None if prepare is None else prepare(lambda b: eval_step(model.params, b), run_data.train,
                                                      cfg.method_options(method), mcfg, cfg.optim.seed,
                                                      cfg.run.eval_batch_size)

  # A checkpoint holds the optimiser state of the stage of its last step: build that stage's state to restore into.
  ckpts = RunCheckpoints(out / "checkpoints", cfg.run.keep_checkpoints)
  point = ckpts.resume_point() if resume else None   # the newest intact checkpoint (damaged ones set aside)
  stage = sched.stage_after(point.step if point else 0)
  state = steps.init_train_state(model.params, programs[stage].optimizer, cfg.optim.seed)
  model.params = None  # the state owns the parameters now (its buffers are donated every step)
  # On the mesh first, then restore into those shardings: Orbax reads each device's part directly,
  # whatever process count or sharding wrote the checkpoint.
  state = sharding_lib.place_state(state, mesh, cfg.run.fsdp)
  if point is not None:
    state = ckpts.restore(state, step=point.step, which=point.which)
    log.info("resumed from step %d", int(state.step))
  start = int(state.step)
  end = sched.total_steps if max_steps is None else min(sched.total_steps, max_steps)
  say = print if sharding_lib.is_primary() else (lambda *a, **k: None)
  say(f"task {task.name}: {len(run_data.train)} train examples, {sched.steps_per_epoch} steps/epoch, "
        f"{sched.total_steps} steps ({method.num_stages} stage{'s' if method.num_stages > 1 else ''}), "
        f"method {method.name}"
        + (f", GR {loss_cfg.gr} protecting the {'final exit' if protect else 'highways'}" if loss_cfg.uses_gr else ""),
        flush=True)
  if mcfg.maps_regression_output:
    say(f"regression targets standardised: exits learn (y - {mcfg.regression_mean:.4g}) / {mcfg.regression_std:.4g} "
        "(train labels' mean / std; predictions are in the labels' units)", flush=True)

  writer = MetricsWriter(out, start)
  bar = progress_lib.bar(sched.total_steps, start, "train", "step", show=progress, silent=not sharding_lib.is_primary())
  last_good = point.step if point is not None and point.verified else None   # only ever a verified one
  best = ckpts.best_value()
  results: dict = {}

  def where_last_good() -> str:
    return (f"the last good checkpoint is step {last_good} in {ckpts.last.directory}"
            if last_good is not None else "no verified checkpoint was saved")

  train_metrics = TrainMetrics(writer, cfg.optim.batch_size, where_last_good, lambda shown: bar.set_postfix(**shown))

  def evaluate_all(info: StepInfo) -> None:
    """Every exit on every eval split; the first split's selection value picks the best checkpoint."""
    nonlocal best
    train_metrics.flush()
    for split, encoded in run_data.evals.items():
      per_exit, _ = evaluate(eval_step, info.state.params, task, encoded, cfg.run.eval_batch_size)
      writer.write([{"step": info.step, "kind": "eval", "split": split, "exits": per_exit}])
      results[split] = per_exit
      if sharding_lib.is_primary():
        bar.write(f"step {info.step} {split} {format_exits(task, per_exit)}")
    first = results[next(iter(run_data.evals))]
    value = selection_value(cfg.run.select_by, task, first)
    if best is None or value > best:
      best = value
      ckpts.save_best(info.state, value, {"select_by": cfg.run.select_by, "exits": first})

  def save(info: StepInfo) -> None:
    nonlocal last_good
    train_metrics.flush()
    if not np.asarray(sharding_lib.gather_to_host(_all_finite(info.state))).all():
      raise RomeFlaxError(f"non-finite parameters or optimiser state after step {info.step}; stopping "
                          f"({where_last_good()})")
    last_good = ckpts.save(info.state)
    if sharding_lib.is_primary():
      files_lib.drop_aside(out)   # the new run holds: an overwritten one is gone for good
    train_metrics.restart_clock()

  eval_every = cfg.run.eval_every or sched.steps_per_epoch
  evaluates = lambda step: bool(run_data.evals) and (step % eval_every == 0 or step == sched.total_steps)
  hooks = Hooks()
  hooks.add(train_metrics.add, every=1)
  hooks.add(lambda info: bar.update(1), every=1)
  hooks.add(train_metrics.flush, every=cfg.run.log_every)
  hooks.add(evaluate_all, when=evaluates)
  hooks.add(save, every=cfg.run.save_every, when=lambda step: evaluates(step) or step == end)

  began = time.perf_counter()

  def trained(step: int) -> str:
    """The training time of this process's steps (a resumed run: since the resume), also logged."""
    if step == start:
      return "no step left to train"
    seconds = time.perf_counter() - began
    writer.write([{"step": step, "kind": "time", "steps": step - start, "seconds": round(seconds, 3)}])
    return f"steps {start + 1}-{step} trained in {progress_lib.duration(seconds)}"

  with preemption.StopSignals(sync_every=cfg.run.log_every) as signals:
    try:
      step, stopped = start, False
      while step < end and not stopped:
        pos = sched.at(step)
        if pos.stage != stage:
          # A new stage starts with a fresh optimiser (its own frozen set and schedule).
          stage = pos.stage
          state = state._replace(opt_state=programs[stage].optimizer.init(state.params))
        for batch in data_lib.batches(run_data.train, cfg.optim.batch_size, shuffle=True, seed=cfg.optim.seed,
                                      epoch=pos.data_epoch, start=pos.batch):
          if batch_extras is not None:
            batch = batch_extras(batch, step)
          state, m = programs[stage].step_fn(state, sharding_lib.shard_batch(batch, mesh))
          step += 1
          hooks.run(StepInfo(step, state, m))
          stopped = step < end and signals.requested(step)
          if step >= end or stopped:
            break
      train_metrics.flush()
      if stopped:
        save(StepInfo(step, state, {}))
        raise preemption.Preempted(f"{signals.signal_name} after step {step} of {sched.total_steps}; checkpoint "
                                   f"saved in {ckpts.last.directory}; continue with --resume")
      time_line = trained(step)
      if step < sched.total_steps:
        say(f"stopped by max_steps after step {step} of {sched.total_steps} ({time_line}); checkpoint saved in "
            f"{ckpts.last.directory}; continue with --resume", flush=True)
      if cfg.run.export:
        path = out / EXPORT_DIR
        kept = finished_export(path) if step == start else None
        if kept is not None:   # --resume of a finished run: its intact export stays as it is
          results.update(kept)
          say(f"the run in {out} had already {'finished' if step >= sched.total_steps else f'reached step {step}'}; "
              f"its export {path} is unchanged", flush=True)
        else:
          if not results:   # resumed after the last step, the export missing or damaged: the final figures
            results.update({split: evaluate(eval_step, state.params, task, encoded, cfg.run.eval_batch_size)[0]
                            for split, encoded in run_data.evals.items()})
          export_model(path, mcfg, state.params, model.tokenizer, export_info(cfg, task, method, results))
          say(f"exported the trained model to {path} ({time_line}; logs: {out / METRICS_FILE}, "
              f"{out / TENSORBOARD_DIR})", flush=True)
      elif step >= sched.total_steps:
        say(f"training finished ({time_line}; logs: {out / METRICS_FILE})", flush=True)
    finally:
      bar.close()
      writer.close()
      ckpts.close()
  return results


@jax.jit
def _all_finite(state) -> jax.Array:
  """[True] when every float of a train state is finite (a checkpoint worth calling good)."""
  leaves = [jnp.isfinite(x).all() for x in jax.tree.leaves(state) if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jnp.stack(leaves or [jnp.bool_(True)]).all(keepdims=True)


def finished_export(path: Path) -> Optional[dict]:
  """The dev metrics of an intact export (None when it is missing or damaged); the same answer on
  every process, since the export that follows is collective."""
  (intact,) = primary.decide(lambda: (int(integrity.verify(path).intact),), "checking the export", size=1)
  if not intact:
    return None
  saved = json.loads((path / EXPORT_CONFIG).read_text(encoding="utf-8"))
  return ExportInfo.from_dict(saved.get("metadata")).dev_metrics or {}


def export_info(cfg: TrainConfig, task: TaskSpec, method: methods.Method, results: dict) -> ExportInfo:
  """What infer.py needs to know about a trained model."""
  gr = cfg.objective.gr
  return ExportInfo(task=task.name, label_names=task.label_names, is_regression=task.is_regression,
                    method=method.name, gr=gr if method.uses_gr(gr) else "none", max_length=cfg.data.max_length,
                    dev_metrics=results, primary_metric=task.primary_metric)


def export_model(path: Path, mcfg: ModelConfig, params, tokenizer, info: ExportInfo) -> Path:
  """The trained model for infer.py: params + config + tokenizer files in one directory (atomic).

  Every process takes part in gathering the (possibly sharded) parameters; process 0 writes."""
  params = model_lib.stack_layers(sharding_lib.gather_to_host(params))   # the train layout -> the model's
  if sharding_lib.is_primary():
    MultiExitBert(mcfg, params, tokenizer, export_info=info).save_pretrained(path)
  sharding_lib.barrier("rome_flax:exported")
  return path


