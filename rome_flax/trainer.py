"""The training loop: data, model, steps per stage, evaluation of every exit, logs, checkpoints, export.

The host only feeds batches and reads metrics back every `log_every` steps (no sync per step).
Everything a step depends on is a function of (config, step): the batch order of an epoch comes
from (seed, epoch), the dropout key from (seed, step); so `resume` restores a checkpoint and goes
on exactly as the uninterrupted run would have.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path
from typing import Optional

import jax
import numpy as np

from rome_flax import data as data_lib
from rome_flax import metrics as metrics_lib
from rome_flax import model as model_lib
from rome_flax import sharding as sharding_lib
from rome_flax import synthetic
from rome_flax.checkpoint import RunCheckpoints, write_json_atomic
from rome_flax.config import ModelConfig
from rome_flax.errors import RomeFlaxError
from rome_flax.losses import protect_final
from rome_flax.pretrained import MultiExitBert
from rome_flax.tasks import TaskSpec, get_task
from rome_flax.train_config import TrainConfig
from rome_flax import train_step as steps

log = logging.getLogger(__name__)

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
EXPORT_DIR = "export"


@dataclasses.dataclass
class RunData:
  task: TaskSpec
  train: data_lib.EncodedSplit
  evals: dict[str, data_lib.EncodedSplit]


# ----------------------------------------------------------------------------- setup


def resolve_task(cfg: TrainConfig) -> TaskSpec:
  if cfg.task.lower() != "custom":
    return get_task(cfg.task)
  if cfg.train_file is None:
    raise RomeFlaxError("the custom task needs train_file (and dev_file)")
  if cfg.custom_regression:
    return get_task("custom", regression=True)
  labels = cfg.custom_labels or data_lib.custom_label_names(cfg.train_file, cfg.label_column)
  return get_task("custom", label_names=tuple(labels))


def load_model(cfg: TrainConfig, task: TaskSpec) -> MultiExitBert:
  if cfg.model is None:
    mcfg = ModelConfig(vocab_size=len(synthetic.VOCAB), hidden_size=cfg.random_model_hidden,
                       num_hidden_layers=cfg.random_model_layers, num_attention_heads=cfg.random_model_heads,
                       intermediate_size=cfg.random_model_intermediate,
                       max_position_embeddings=max(cfg.max_length, 64), num_labels=task.num_labels,
                       exit_pooling=cfg.exit_pooling, dtype=cfg.dtype)
    return MultiExitBert.from_config(mcfg, seed=cfg.seed, tokenizer=synthetic.build_tokenizer())
  model = MultiExitBert.from_pretrained(cfg.model, num_labels=task.num_labels, exit_pooling=cfg.exit_pooling,
                                        dtype=cfg.dtype, seed=cfg.seed)
  if model.config.num_layers < 2:
    raise RomeFlaxError("a multi-exit model needs at least 2 layers")
  if cfg.max_length > model.config.max_position_embeddings:
    raise RomeFlaxError(f"max_length {cfg.max_length} exceeds the model's {model.config.max_position_embeddings} "
                        "positions")
  return model


def load_data(cfg: TrainConfig, task: TaskSpec, tokenizer) -> RunData:
  custom = {}
  if task.name == "custom":
    custom = {"files": {"train": cfg.train_file, "dev": cfg.dev_file, "test": cfg.test_file},
              "text_a_column": cfg.text_a_column, "text_b_column": cfg.text_b_column,
              "label_column": cfg.label_column}
  elif task.name == "synthetic":
    custom = {"seed": 0}
  train = data_lib.load_split(task, "train", cfg.data_dir, **custom)
  if cfg.train_rows:
    train = dataclasses.replace(train, texts_a=train.texts_a[:cfg.train_rows],
                                texts_b=None if train.texts_b is None else train.texts_b[:cfg.train_rows],
                                labels=None if train.labels is None else train.labels[:cfg.train_rows],
                                ids=train.ids[:cfg.train_rows])
  if train.labels is None:
    raise RomeFlaxError("the training split has no labels")
  eval_splits = ("dev",) if task.name == "custom" else task.eval_splits
  evals = {}
  for split in eval_splits:
    if task.name == "custom" and cfg.dev_file is None:
      break
    s = data_lib.load_split(task, split, cfg.data_dir, **custom)
    if s.labels is None:
      raise RomeFlaxError(f"the {split} split has no labels")
    evals[split] = data_lib.encode_split(tokenizer, s, cfg.max_length, task.is_regression)
  return RunData(task, data_lib.encode_split(tokenizer, train, cfg.max_length, task.is_regression), evals)


def prepare_output_dir(out: Path, cfg: TrainConfig, resume: bool, overwrite: bool) -> None:
  """Refuses to mix two runs in one directory; --resume needs the same config, --overwrite wipes."""
  config_path = out / CONFIG_FILE
  if out.exists() and not out.is_dir():
    raise RomeFlaxError(f"output_dir {out} is a file")
  if out.is_dir() and any(out.iterdir()):
    if overwrite:
      shutil.rmtree(out)
    elif not resume:
      raise RomeFlaxError(f"output_dir {out} already holds a run; pass --resume to continue it or --overwrite")
    elif not config_path.is_file():
      raise RomeFlaxError(f"output_dir {out} is not empty and holds no {CONFIG_FILE}: not a rome_flax run")
    else:
      saved = json.loads(config_path.read_text())
      now = json.loads(json.dumps(cfg.to_dict()))
      differ = sorted(k for k in set(saved) | set(now) if saved.get(k) != now.get(k))
      if differ:
        raise RomeFlaxError(f"cannot resume {out}: config differs in {', '.join(differ)}")
  out.mkdir(parents=True, exist_ok=True)
  write_json_atomic(config_path, cfg.to_dict())


# ----------------------------------------------------------------------------- evaluation


def evaluate(eval_step, params, task: TaskSpec, encoded: data_lib.EncodedSplit, batch_size: int):
  """Every exit's metrics on one split. Returns (list of per-exit metric dicts, logits [E, N, C])."""
  chunks, ids = [], []
  for batch in data_lib.batches(encoded, batch_size, shuffle=False):
    chunks.append(eval_step(params, batch))
    ids.append(batch["example_ids"])
  logits = np.concatenate(jax.device_get(chunks), axis=1)
  ids = np.concatenate(ids)
  keep = ids >= 0
  logits_ExNxC = np.zeros((logits.shape[0], len(encoded), logits.shape[2]), np.float32)
  logits_ExNxC[:, ids[keep]] = logits[:, keep]
  return metrics_lib.per_exit_metrics(task, logits_ExNxC, encoded.labels), logits_ExNxC


# ----------------------------------------------------------------------------- logging


class RunLog:
  """metrics.jsonl (appended; truncated to the resumed step on resume) + TensorBoard events."""

  def __init__(self, out: Path, start_step: int):
    self.path = out / METRICS_FILE
    if self.path.is_file():
      kept = [line for line in self.path.read_text().splitlines()
              if line.strip() and json.loads(line).get("step", 0) <= start_step]
      tmp = self.path.with_name(f".{self.path.name}.tmp")
      tmp.write_text("".join(line + "\n" for line in kept))
      os.replace(tmp, self.path)
    from tensorboardX import SummaryWriter
    self.tb = SummaryWriter(str(out / "tb"), purge_step=start_step or None)

  def write(self, records: list[dict]) -> None:
    with open(self.path, "a") as f:
      f.write("".join(json.dumps(r, sort_keys=True) + "\n" for r in records))
    for record in records:
      for key, value in record.items():
        if key != "step" and isinstance(value, (int, float)):
          self.tb.add_scalar(f"{record['kind']}/{key}", value, record["step"])

  def write_eval(self, step: int, split: str, per_exit: list[dict]) -> None:
    with open(self.path, "a") as f:
      f.write(json.dumps({"step": step, "kind": "eval", "split": split, "exits": per_exit}, sort_keys=True) + "\n")
    for i, m in enumerate(per_exit):
      for name, value in m.items():
        self.tb.add_scalar(f"{split}/{name}/exit{i + 1}", value, step)
    self.tb.flush()

  def close(self) -> None:
    self.tb.close()


def selection_value(cfg: TrainConfig, task: TaskSpec, per_exit: list[dict]) -> float:
  key = metrics_lib.primary_metric(task)
  values = [m[key] for m in per_exit]
  return float(values[-1] if cfg.select_by == "final_exit" else np.mean(values))


def format_exits(task: TaskSpec, per_exit: list[dict]) -> str:
  key = metrics_lib.primary_metric(task)
  return f"{key} per exit: " + " ".join(f"{m[key]:.1f}" for m in per_exit)


# ----------------------------------------------------------------------------- the run


def train(cfg: TrainConfig, *, resume: bool = False, overwrite: bool = False, progress: bool = True,
          max_steps: Optional[int] = None) -> dict:
  """Runs (or resumes) a training run into cfg.output_dir; returns the final dev metrics per exit.

  max_steps stops early after that many total steps (as if killed; for tests and quick checks).
  """
  sharding_lib.maybe_initialize_distributed()
  mesh = sharding_lib.data_mesh()  # data parallel over every device; one device: a no-op
  sharding_lib.check_batch_size(cfg.batch_size, mesh)
  out = Path(cfg.output_dir).absolute()
  task = resolve_task(cfg)
  model = load_model(cfg, task)
  run_data = load_data(cfg, task, model.tokenizer)
  prepare_output_dir(out, cfg, resume, overwrite)
  mcfg = model.config

  steps_per_epoch = data_lib.num_batches(run_data.train, cfg.batch_size)
  stage_steps = steps_per_epoch * cfg.epochs
  num_stages = 2 if cfg.method == "deebert" else 1
  total_steps = stage_steps * num_stages
  optim_cfg = steps.OptimConfig(cfg.learning_rate, int(cfg.warmup_ratio * stage_steps), stage_steps,
                                cfg.weight_decay, cfg.adam_eps, cfg.clip_norm)
  optimizer = steps.make_optimizer(optim_cfg, model.params)
  schedule = steps.learning_rate_schedule(optim_cfg)
  loss_cfg = cfg.loss_config(task.is_regression)
  protect = protect_final(loss_cfg, task.protect_final)
  step_fns = {stage: steps.make_train_step(mcfg, loss_cfg, optimizer, model.params, stage=stage,
                                           protect_final=protect, schedule=schedule,
                                           stage_offset=(stage - 1) * stage_steps)
              for stage in range(1, num_stages + 1)}
  eval_step = steps.make_eval_step(mcfg)
  eval_every = cfg.eval_every or steps_per_epoch

  ckpts = RunCheckpoints(out / "checkpoints", cfg.keep_checkpoints)
  state = steps.init_train_state(model.params, optimizer, cfg.seed)
  model.params = None  # the state owns the parameters now (its buffers are donated every step)
  if resume and ckpts.latest_step() is not None:
    state = ckpts.restore(state)
    log.info("resumed from step %d", int(state.step))
  state = sharding_lib.replicate(state, mesh)
  start = int(state.step)
  best = ckpts.best_value()
  run_log = RunLog(out, start)
  print(f"task {task.name}: {len(run_data.train)} train examples, {steps_per_epoch} steps/epoch, "
        f"{total_steps} steps ({num_stages} stage{'s' if num_stages > 1 else ''}), method {cfg.method}"
        + (f", GR {cfg.gr} protecting the {'final exit' if protect else 'highways'}" if loss_cfg.uses_gr else ""),
        flush=True)

  pending: list[tuple[int, dict]] = []
  last_good = ckpts.latest_step()
  results: dict = {}
  bar = _progress(total_steps, start, progress)
  t_log = time.perf_counter()

  def flush_metrics() -> None:
    """Reads back the pending steps' metrics (one host sync), checks them, logs one record per step
    (GR's cos / norms are per step); the window's speed goes on its last record."""
    nonlocal t_log, pending
    if not pending:
      return
    fetched = jax.device_get([m for _, m in pending])
    for (s, _), m in zip(pending, fetched):
      if not math.isfinite(float(m["loss"])):
        where = f"the last good checkpoint is step {last_good} in {ckpts.last.directory}" if last_good is not None \
            else "no checkpoint was saved"
        raise RomeFlaxError(f"non-finite loss at step {s + 1}; stopping ({where})")
    speed = len(pending) * cfg.batch_size / max(time.perf_counter() - t_log, 1e-9)
    records = [{"step": s + 1, "kind": "train", **{k: float(v) for k, v in m.items()}}
               for (s, _), m in zip(pending, fetched)]
    records[-1]["examples_per_s"] = speed
    run_log.write(records)
    bar.set_postfix(loss=f"{np.mean([float(m['loss']) for m in fetched]):.4f}", ex_s=f"{speed:.0f}")
    pending, t_log = [], time.perf_counter()

  def save(state_now) -> None:
    nonlocal last_good
    flush_metrics()
    last_good = ckpts.save(state_now)

  try:
    step = start
    end = total_steps if max_steps is None else min(total_steps, max_steps)
    while step < end:
      stage = step // stage_steps + 1
      if stage > 1 and step % stage_steps == 0:
        # DeeBERT stage 2 starts with a fresh optimizer (and its own schedule).
        state = state._replace(opt_state=optimizer.init(state.params))
      in_stage = step - (stage - 1) * stage_steps
      epoch = in_stage // steps_per_epoch
      data_epoch = (stage - 1) * cfg.epochs + epoch
      for batch in data_lib.batches(run_data.train, cfg.batch_size, shuffle=True, seed=cfg.seed,
                                    epoch=data_epoch, start=in_stage % steps_per_epoch):
        state, m = step_fns[stage](state, sharding_lib.shard_batch(batch, mesh))
        pending.append((step, m))
        step += 1
        bar.update(1)
        if step % cfg.log_every == 0:
          flush_metrics()
        evaluate_now = run_data.evals and (step % eval_every == 0 or step == total_steps)
        if evaluate_now:
          flush_metrics()
          for split, encoded in run_data.evals.items():
            per_exit, _ = evaluate(eval_step, state.params, task, encoded, cfg.eval_batch_size)
            run_log.write_eval(step, split, per_exit)
            results[split] = per_exit
            bar.write(f"step {step} {split} {format_exits(task, per_exit)}")
          first = results[next(iter(run_data.evals))]
          value = selection_value(cfg, task, first)
          if best is None or value > best:
            best = value
            ckpts.save_best(state, value, {"select_by": cfg.select_by, "exits": first})
        if step % cfg.save_every == 0 or evaluate_now or step == end:
          save(state)
          t_log = time.perf_counter()  # the speed shown is training's, not evaluation's or saving's
        if step >= end:
          break
    flush_metrics()
    if step >= total_steps and cfg.export:
      path = export_model(out / EXPORT_DIR, mcfg, state.params, model.tokenizer, task, cfg, results)
      print(f"exported the trained model to {path} (logs: {out / METRICS_FILE}, {out / 'tb'})", flush=True)
  finally:
    bar.close()
    run_log.close()
    ckpts.close()
  return results


def export_model(path: Path, mcfg: ModelConfig, params, tokenizer, task: TaskSpec, cfg: TrainConfig,
                 results: dict) -> Path:
  """The trained model for infer.py: params + config + tokenizer files in one directory (atomic)."""
  meta = {"task": task.name, "label_names": list(task.label_names), "is_regression": task.is_regression,
          "method": cfg.method, "gr": cfg.gr if cfg.method == "romebert" else "none",
          "max_length": cfg.max_length, "dev_metrics": results, "primary_metric": task.primary_metric}
  params = model_lib.stack_layers(jax.device_get(params))   # the train state's layout -> the model's
  return MultiExitBert(mcfg, params, tokenizer).save_pretrained(path, metadata=meta)


def _progress(total: int, initial: int, enabled: bool):
  from tqdm.auto import tqdm
  return tqdm(total=total, initial=initial, disable=not enabled, unit="step", dynamic_ncols=True)
