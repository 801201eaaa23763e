"""The training run's configuration: one flat frozen dataclass, a config file, and CLI overrides.

A config file (`configs/*.py`) defines `get_config()` returning a dict of field overrides; the
command line overrides single fields (`--learning_rate 5e-5`). Unknown keys are errors, so a typo
never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import typing
from pathlib import Path
from typing import Any, Optional

from rome_flax.errors import RomeFlaxError
from rome_flax.losses import GR_MODES, KL_REDUCTIONS, METHODS, PROTECT, LossConfig


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  # Model: a Hugging Face checkpoint (directory or hub id), a rome_flax export, or None for a small
  # randomly initialised BERT (sized by random_model_*) with the synthetic task's tokenizer.
  model: Optional[str] = None
  random_model_layers: int = 4
  random_model_hidden: int = 64
  random_model_heads: int = 4
  random_model_intermediate: int = 128
  exit_pooling: str = "cls"
  dtype: str = "float32"
  # Data.
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
  train_rows: int = 0                   # use only the first N training rows (0: all)
  max_length: int = 128
  # Method (method.md).
  method: str = "romebert"
  gamma: float = 0.9
  temperature: float = 3.0
  kl_reduction: str = "reference"
  gr: str = "projection"
  gr_lambda: float = 0.01
  protect: str = "auto"
  # Optimisation.
  learning_rate: float = 2e-5
  epochs: int = 3                       # per stage (DeeBERT trains two stages of this many epochs)
  batch_size: int = 8
  eval_batch_size: int = 64
  warmup_ratio: float = 0.0
  weight_decay: float = 0.0
  adam_eps: float = 1e-8
  clip_norm: float = 1.0
  seed: int = 42
  # Bookkeeping.
  output_dir: str = "runs/default"
  log_every: int = 50
  eval_every: int = 0                   # steps between dev evaluations; 0 = at the end of every epoch
  save_every: int = 500                 # steps between checkpoints (also at every evaluation and the end)
  keep_checkpoints: int = 2
  select_by: str = "mean_exits"         # best checkpoint by the mean over exits, or 'final_exit'
  export: bool = True

  def __post_init__(self):
    checks = [(self.method in METHODS, f"method must be one of {', '.join(METHODS)}, got {self.method!r}"),
              (self.gr in GR_MODES, f"gr must be one of {', '.join(GR_MODES)}, got {self.gr!r}"),
              (self.kl_reduction in KL_REDUCTIONS, f"kl_reduction must be one of {KL_REDUCTIONS}"),
              (self.protect in PROTECT, f"protect must be one of {', '.join(PROTECT)}"),
              (self.select_by in ("mean_exits", "final_exit"), "select_by must be mean_exits or final_exit"),
              (self.epochs >= 1, "epochs must be at least 1"),
              (self.batch_size >= 1, "batch_size must be at least 1"),
              (self.eval_batch_size >= 1, "eval_batch_size must be at least 1"),
              (self.learning_rate > 0, "learning_rate must be positive"),
              (0.0 <= self.warmup_ratio < 1.0, "warmup_ratio must be in [0, 1)"),
              (self.log_every >= 1, "log_every must be at least 1"),
              (self.save_every >= 1, "save_every must be at least 1"),
              (self.train_rows >= 0, "train_rows must be >= 0")]
    for ok, msg in checks:
      if not ok:
        raise RomeFlaxError(msg)

  def loss_config(self, regression: bool) -> LossConfig:
    """The LossConfig fields this flat config mirrors (same names), so the two cannot drift apart."""
    shared = {f.name: getattr(self, f.name) for f in dataclasses.fields(LossConfig) if f.name != "regression"}
    return LossConfig(**shared, regression=regression)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  def replace(self, **kw) -> "TrainConfig":
    unknown = set(kw) - {f.name for f in dataclasses.fields(self)}
    if unknown:
      raise RomeFlaxError(f"unknown config key(s): {', '.join(sorted(unknown))}")
    if "custom_labels" in kw and kw["custom_labels"] is not None:
      kw["custom_labels"] = tuple(kw["custom_labels"])
    return dataclasses.replace(self, **kw)


def field_types() -> dict[str, type]:
  """Field name -> the plain type its command-line value parses to."""
  hints = typing.get_type_hints(TrainConfig)
  out = {}
  for f in dataclasses.fields(TrainConfig):
    hint = hints[f.name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    out[f.name] = args[0] if args else hint
  return out


def parse_value(name: str, raw: str) -> Any:
  """A command-line string as the field's type ('none' clears an optional field)."""
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


_OPTIONAL = {f.name for f in dataclasses.fields(TrainConfig)
             if type(None) in typing.get_args(typing.get_type_hints(TrainConfig)[f.name])}


def load_config_file(path: str | Path) -> TrainConfig:
  """TrainConfig with the overrides of a config file's `get_config()` (a dict)."""
  path = Path(path)
  if not path.is_file():
    raise RomeFlaxError(f"config file {path} does not exist")
  spec = importlib.util.spec_from_file_location(f"rome_flax_config_{path.stem}", path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:
    raise RomeFlaxError(f"config file {path} failed to load: {type(e).__name__}: {e}") from None
  if not hasattr(module, "get_config"):
    raise RomeFlaxError(f"config file {path} defines no get_config()")
  overrides = module.get_config()
  if not isinstance(overrides, dict):
    raise RomeFlaxError(f"{path}: get_config() must return a dict of TrainConfig fields")
  try:
    return TrainConfig().replace(**overrides)
  except RomeFlaxError as e:
    raise RomeFlaxError(f"{path}: {e}") from None


def config_from_json(text: str) -> TrainConfig:
  return TrainConfig().replace(**json.loads(text))
