"""The training run's configuration, grouped by concern, from a config file and CLI overrides.

`TrainConfig` holds five frozen groups: `network` (which model), `data`, `objective` (the method
and its loss), `optim` (optimisation) and `run` (logs, evaluation, checkpoints, export). Every
field name is unique across the groups, so a flat `{"learning_rate": 5e-5}` names one field: that
is what config files (`configs/*.py`, `get_config()` returning a dict) return, what the command
line sets (`--learning_rate 5e-5`; `--optim.learning_rate` also works) and what a run's
config.json stores. Unknown keys are errors, so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import typing
from pathlib import Path
from typing import Any, Optional

from rome_flax.errors import RomeFlaxError
from rome_flax.methods import LossConfig
from rome_flax.targets import MODES as TARGET_MODES


def _check(checks) -> None:
  for ok, msg in checks:
    if not ok:
      raise RomeFlaxError(msg)


@dataclasses.dataclass(frozen=True)
class NetworkOptions:
  """A Hugging Face checkpoint (directory or hub id), a rome_flax export, or None for a small randomly
  initialised BERT (sized by random_model_*) with the synthetic task's tokenizer."""
  model: Optional[str] = None
  random_model_layers: int = 4
  random_model_hidden: int = 64
  random_model_heads: int = 4
  random_model_intermediate: int = 128
  exit_pooling: str = "cls"
  dtype: str = "float32"
  classifier_dropout: Optional[float] = None   # exit heads' dropout (None: the checkpoint's hidden dropout)


@dataclasses.dataclass(frozen=True)
class DataOptions:
  task: str = "synthetic"
  data_dir: Optional[str] = None
  train_file: Optional[str] = None      # custom task: CSV / TSV / JSON Lines files
  dev_file: Optional[str] = None
  test_file: Optional[str] = None
  text_a_column: str = "text"
  text_b_column: Optional[str] = None
  label_column: str = "label"
  custom_labels: Optional[tuple] = None   # custom label names in id order (default: sorted train labels)
  custom_regression: bool = False
  regression_targets: str = "standardize"   # regression exits learn (y - mean) / std of the train labels (targets.py); 'raw': as published
  train_rows: int = 0                   # use only the first N training rows (0: all)
  max_length: int = 128
  # Sequence labelling (tasks conll2003 / ner / pos): CoNLL column files (data_dir with train.txt,
  # dev.txt, test.txt, or train_file / dev_file / test_file) or JSON Lines (tokens + tags lists).
  tag_column: int = -1                  # CoNLL files: the tag column (-1: last; e.g. 1 for POS in CoNLL-2003's 4 columns)
  tokens_column: str = "tokens"         # JSON Lines: the column of a sentence's words
  tags_column: str = "tags"             # JSON Lines: the column of its tags

  def __post_init__(self):
    if self.custom_labels is not None and not isinstance(self.custom_labels, tuple):
      object.__setattr__(self, "custom_labels", tuple(self.custom_labels))   # hashable, as JSON lists load
    _check([(self.train_rows >= 0, "train_rows must be >= 0"),
            (self.regression_targets in TARGET_MODES,
             f"regression_targets must be one of {', '.join(TARGET_MODES)}, got {self.regression_targets!r}")])


@dataclasses.dataclass(frozen=True)
class ObjectiveOptions:
  """The method and its loss (method.md): `methods.LossConfig` without the task's `regression`;
  the defaults and the checks are LossConfig's."""
  method: str = LossConfig.method
  gamma: float = LossConfig.gamma
  temperature: float = LossConfig.temperature
  kl_reduction: str = LossConfig.kl_reduction
  gr: str = LossConfig.gr
  gr_lambda: float = LossConfig.gr_lambda
  protect: str = LossConfig.protect
  highway_weight: float = LossConfig.highway_weight
  # Self-sampling (method self_sampling, method-seqlab.md section 4): per sentence a TOKEE window and
  # threshold drawn from these lists; sandwich rules; the upper-half threshold cap.
  ss_windows: tuple = LossConfig.ss_windows
  ss_thresholds: tuple = LossConfig.ss_thresholds
  ss_sandwich_small: int = LossConfig.ss_sandwich_small
  ss_sandwich_full: int = LossConfig.ss_sandwich_full
  ss_upper_cap: float = LossConfig.ss_upper_cap

  def __post_init__(self):
    for name, kind in (("ss_windows", int), ("ss_thresholds", float)):
      try:
        object.__setattr__(self, name, tuple(kind(float(v)) if kind is int else kind(v) for v in getattr(self, name)))
      except (TypeError, ValueError):
        raise RomeFlaxError(f"{name} must be a list of numbers, got {getattr(self, name)!r}") from None
    self.loss_config(regression=False)

  def loss_config(self, regression: bool, regression_scale: float = 1.0) -> LossConfig:
    return LossConfig(**dataclasses.asdict(self), regression=regression, regression_scale=regression_scale)


@dataclasses.dataclass(frozen=True)
class OptimOptions:
  learning_rate: float = 2e-5
  epochs: int = 3                       # per stage (DeeBERT trains two stages of this many epochs)
  batch_size: int = 8
  warmup_ratio: float = 0.0
  weight_decay: float = 0.0
  adam_eps: float = 1e-8
  clip_norm: float = 1.0
  seed: int = 42                        # parameter init of new heads, batch order, dropout
  grad_accum_steps: int = 1             # micro-batches per step, inside the one jitted step (same update)
  encoder_lr_scale: float = 1.0         # the encoder's learning rate / the exit heads' (self-sampling: 0.1)

  def __post_init__(self):
    _check([(self.epochs >= 1, "epochs must be at least 1"),
            (self.encoder_lr_scale > 0, "encoder_lr_scale must be positive"),
            (self.batch_size >= 1, "batch_size must be at least 1"),
            (self.grad_accum_steps >= 1, "grad_accum_steps must be at least 1"),
            (self.grad_accum_steps >= 1 and self.batch_size % self.grad_accum_steps == 0,
             f"batch_size {self.batch_size} does not split into grad_accum_steps {self.grad_accum_steps} "
             "micro-batches"),
            (self.learning_rate > 0, "learning_rate must be positive"),
            (0.0 <= self.warmup_ratio < 1.0, "warmup_ratio must be in [0, 1)")])


@dataclasses.dataclass(frozen=True)
class RunOptions:
  output_dir: str = "runs/default"
  log_every: int = 50
  eval_every: int = 0                   # steps between dev evaluations; 0 = at the end of every epoch
  eval_batch_size: int = 64
  save_every: int = 500                 # steps between checkpoints (also at every evaluation and the end)
  keep_checkpoints: int = 2
  select_by: str = "mean_exits"         # best checkpoint by the mean over exits, or 'final_exit'
  export: bool = True
  fsdp: bool = False                    # shard parameters and optimiser state over the devices (FSDP-style)

  def __post_init__(self):
    _check([(self.select_by in ("mean_exits", "final_exit"), "select_by must be mean_exits or final_exit"),
            (self.eval_batch_size >= 1, "eval_batch_size must be at least 1"),
            (self.log_every >= 1, "log_every must be at least 1"),
            (self.save_every >= 1, "save_every must be at least 1"),
            (self.keep_checkpoints >= 1, "keep_checkpoints must be at least 1")])


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  network: NetworkOptions = NetworkOptions()
  data: DataOptions = DataOptions()
  objective: ObjectiveOptions = ObjectiveOptions()
  optim: OptimOptions = OptimOptions()
  run: RunOptions = RunOptions()

  def loss_config(self, regression: bool, regression_scale: float = 1.0) -> LossConfig:
    return self.objective.loss_config(regression, regression_scale)

  def to_dict(self) -> dict[str, Any]:
    """The flat form: field name -> value (config.json, the --resume check)."""
    return {k: v for group in GROUPS for k, v in dataclasses.asdict(getattr(self, group)).items()}

  def replace(self, **flat) -> "TrainConfig":
    """A copy with fields replaced by flat name (`learning_rate=...`) or dotted (`optim.learning_rate`)."""
    by_group: dict[str, dict] = {}
    unknown = []
    for key, value in flat.items():
      group = _locate(key)
      if group is None:
        unknown.append(key)
      else:
        by_group.setdefault(group, {})[key.rsplit(".", 1)[-1]] = value
    if unknown:
      raise RomeFlaxError(f"unknown config key(s): {', '.join(sorted(unknown))}")
    return dataclasses.replace(self, **{g: dataclasses.replace(getattr(self, g), **kw) for g, kw in by_group.items()})

  @classmethod
  def from_dict(cls, flat: dict[str, Any]) -> "TrainConfig":
    return cls().replace(**flat)


GROUPS = tuple(f.name for f in dataclasses.fields(TrainConfig))
_GROUP_OF = {f.name: group for group in GROUPS for f in dataclasses.fields(getattr(TrainConfig, group))}
_HINTS = {name: typing.get_type_hints(type(getattr(TrainConfig, _GROUP_OF[name])))[name] for name in _GROUP_OF}
_OPTIONAL = {name for name, hint in _HINTS.items() if type(None) in typing.get_args(hint)}


def _locate(key: str) -> Optional[str]:
  """The group of a flat or dotted field name (None when there is no such field)."""
  group, _, name = key.rpartition(".")
  owner = _GROUP_OF.get(name)
  return owner if owner is not None and group in ("", owner) else None


def field_name(key: str) -> Optional[str]:
  """The flat field name of a flat or dotted key (`learning_rate`, `optim.learning_rate`); None when no field."""
  return key.rpartition(".")[2] if _locate(key) is not None else None


def field_names() -> tuple[str, ...]:
  """Every field's flat name, group by group."""
  return tuple(_GROUP_OF)


def dotted_name(name: str) -> str:
  return f"{_GROUP_OF[name]}.{name}"


def field_types() -> dict[str, type]:
  """Field name -> the plain type its command-line value parses to."""
  out = {}
  for name, hint in _HINTS.items():
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    out[name] = args[0] if args else hint
  return out


def parse_value(name: str, raw: str) -> Any:
  """A command-line string as the field's type ('none' clears an optional field)."""
  name = name.rsplit(".", 1)[-1]
  kind = field_types()[name]
  if raw.lower() in ("none", "null") and name in _OPTIONAL:
    return None
  try:
    if kind is bool:
      if raw.lower() in ("1", "true", "yes", "on"):
        return True
      if raw.lower() in ("0", "false", "no", "off"):
        return False
      raise ValueError(raw)
    if kind is tuple:
      return tuple(x.strip() for x in raw.split(",") if x.strip())
    return kind(raw)
  except ValueError:
    raise RomeFlaxError(f"--{name}: cannot read {raw!r} as {kind.__name__}") from None


def read_config_dict(path: str | Path, what: str = "TrainConfig fields") -> dict:
  """The dict a Python config file's `get_config()` returns (train and study configs alike)."""
  path = Path(path)
  if path.is_dir():
    raise RomeFlaxError(f"config file {path} is a directory; pass a Python file defining get_config()")
  if not path.is_file():
    raise RomeFlaxError(f"config file {path} does not exist")
  spec = importlib.util.spec_from_file_location(f"rome_flax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
      raise RomeFlaxError(f"config file {path} defines no get_config()")
    raw = module.get_config()
  except RomeFlaxError:
    raise
  except Exception as e:
    raise RomeFlaxError(f"config file {path} failed to load: {type(e).__name__}: {e}") from None
  if not isinstance(raw, dict):
    raise RomeFlaxError(f"{path}: get_config() must return a dict of {what}")
  return raw


def load_config_file(path: str | Path) -> TrainConfig:
  """TrainConfig with the overrides of a config file's `get_config()` (a flat dict)."""
  overrides = read_config_dict(path)
  try:
    return TrainConfig.from_dict(overrides)
  except RomeFlaxError as e:
    raise RomeFlaxError(f"{path}: {e}") from None

