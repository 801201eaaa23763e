"""The training run's configuration, grouped by concern, from a config file and CLI overrides.

`TrainConfig` holds frozen groups: `network` (which model), `data`, `objective` (the method and its
loss, `methods.Objective`), `optim` (optimisation), `run` (logs, evaluation, checkpoints, export) and
one per method with options of its own (`self_sampling`, `methods.Method.options`). Every
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
from rome_flax.kinds.sources import DataSources
from rome_flax.kinds.tasks import TASK_NAMES
from rome_flax.model.targets import MODES as TARGET_MODES
from rome_flax.train.methods import LossConfig, Method, Objective, SelfSamplingOptions, option


def _check(checks) -> None:
  for ok, msg in checks:
    if not ok:
      raise RomeFlaxError(msg)


@dataclasses.dataclass(frozen=True)
class NetworkOptions:
  """A Hugging Face checkpoint (directory or hub id), a rome_flax export, or None for a small randomly
  initialised BERT (sized by random_model_*) with the synthetic task's tokenizer."""
  model: Optional[str] = option(None, "Hugging Face checkpoint (directory or hub id) or rome_flax export; none: a "
                                "small random BERT sized by random_model_*")
  random_model_layers: int = option(4, "random model: encoder layers (= exits)")
  random_model_hidden: int = option(64, "random model: hidden size")
  random_model_heads: int = option(4, "random model: attention heads")
  random_model_intermediate: int = option(128, "random model: feed-forward size")
  random_model_init: float = option(0.02, "random model: std of its N(0, std) weight init (BERT's "
                                    "initializer_range; > 0)")
  exit_pooling: str = option("cls", "what an exit head reads: cls (the first token, as published) or mean (the "
                             "mean over the sentence's pieces)")
  dtype: str = option("float32", "compute dtype: float32 or bfloat16 (parameters stay float32)")
  classifier_dropout: Optional[float] = option(None, "exit heads' dropout (none: the checkpoint's hidden dropout)")


@dataclasses.dataclass(frozen=True)
class DataOptions:
  task: str = option("synthetic", f"{', '.join(TASK_NAMES)} (custom: your CSV/TSV/JSONL files; "
                     "conll2003, ner, pos: sequence labelling)")
  data_dir: Optional[str] = option(None, "the task's directory (GLUE TSVs, or CoNLL train.txt/dev.txt/test.txt)")
  train_file: Optional[str] = option(None, "the training file (CSV, TSV, JSON Lines, CoNLL); given, "
                                    "the task's files are read instead of data_dir or the hub")
  dev_file: Optional[str] = option(None, "the dev file (evaluated when given with train_file)")
  test_file: Optional[str] = option(None, "the test file")
  text_a_column: str = option("text", "custom task: the column of the (first) text")
  text_b_column: Optional[str] = option(None, "custom task: the column of the second text of a pair")
  label_column: str = option("label", "custom task: the column of the label")
  custom_labels: Optional[tuple] = option(None, "custom task: label names in id order, comma list (default: the "
                                          "sorted train labels)")
  custom_regression: bool = option(False, "custom task: the label is a number (regression, MSE exits)")
  synthetic_fillers: tuple = option((2, 7), "synthetic task: fewest and most filler words of a sentence (5,19: "
                                    "the task before 2026-12-03)")
  regression_targets: str = option("standardize", "regression: standardize (exits learn (y - mean) / std of the "
                                   "train labels), bias_init, or raw (as published)")
  train_rows: int = option(0, "use only the first N training rows (0: all)")
  max_length: int = option(128, "word pieces per example, special tokens included (longer: an error)")
  # Sequence labelling (tasks conll2003 / ner / pos): CoNLL column files (data_dir with train.txt,
  # dev.txt, test.txt, or train_file / dev_file / test_file) or JSON Lines (tokens + tags lists).
  tag_column: int = option(-1, "CoNLL files: the tag column (-1: the last; 1: POS in CoNLL-2003)")
  tokens_column: str = option("tokens", "token task, JSON Lines: the column of a sentence's words")
  tags_column: str = option("tags", "token task, JSON Lines: the column of its tags")

  def __post_init__(self):
    if self.custom_labels is not None and not isinstance(self.custom_labels, tuple):
      object.__setattr__(self, "custom_labels", tuple(self.custom_labels))   # hashable, as JSON lists load
    fillers = self.synthetic_fillers
    try:
      fillers = tuple(int(v) for v in fillers) if not isinstance(fillers, (str, bytes)) else ()
    except (TypeError, ValueError):
      fillers = ()
    _check([(len(fillers) == 2 and 2 <= fillers[0] <= fillers[1],
             f"synthetic_fillers must be two whole numbers 2 <= fewest <= most, got {self.synthetic_fillers!r}")])
    object.__setattr__(self, "synthetic_fillers", fillers)
    _check([(self.train_rows >= 0, "train_rows must be >= 0"),
            (self.regression_targets in TARGET_MODES,
             f"regression_targets must be one of {', '.join(TARGET_MODES)}, got {self.regression_targets!r}")])

  def sources(self) -> DataSources:
    """Where the run's examples come from (kinds/sources.py): the files, the directory and their columns."""
    return DataSources.of({"train": self.train_file, "dev": self.dev_file, "test": self.test_file},
                          data_dir=self.data_dir, text_a_column=self.text_a_column,
                          text_b_column=self.text_b_column, label_column=self.label_column,
                          tag_column=self.tag_column, tokens_column=self.tokens_column,
                          tags_column=self.tags_column, synthetic_fillers=self.synthetic_fillers,
                          file_options="--train_file / --dev_file")


ObjectiveOptions = Objective   # the method and its loss: defined, checked and documented in train/methods.py


@dataclasses.dataclass(frozen=True)
class OptimOptions:
  learning_rate: float = option(2e-5, "peak learning rate (AdamW, linear decay)")
  epochs: int = option(3, "epochs per stage (DeeBERT trains two stages of this many)")
  batch_size: int = option(8, "examples per step (over all devices)")
  warmup_ratio: float = option(0.0, "share of the steps with a linear warm-up")
  weight_decay: float = option(0.0, "AdamW weight decay")
  adam_eps: float = option(1e-8, "AdamW epsilon")
  clip_norm: float = option(1.0, "global gradient-norm clip")
  seed: int = option(42, "seed of the new heads' initialisation, the batch order and dropout")
  grad_accum_steps: int = option(1, "micro-batches per step, inside the one jitted step (same update)")
  encoder_lr_scale: float = option(1.0, "the encoder's learning rate / the exit heads' (self-sampling: 0.1)")

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
  output_dir: str = option("runs/default", "the run's directory (config, metrics, checkpoints, export)")
  log_every: int = option(50, "steps between training-loss lines")
  eval_every: int = option(0, "steps between dev evaluations (0: at the end of every epoch)")
  eval_batch_size: int = option(64, "examples per evaluation batch")
  save_every: int = option(500, "steps between checkpoints (also at every evaluation and the end)")
  keep_checkpoints: int = option(2, "latest checkpoints kept (the best one is kept apart)")
  select_by: str = option("mean_exits", "the best checkpoint by mean_exits (the mean over exits) or final_exit")
  export: bool = option(True, "write export/ (the model infer.py and convert read) at the end")
  fsdp: bool = option(False, "shard parameters and optimiser state over the devices (FSDP-style)")

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
  self_sampling: SelfSamplingOptions = SelfSamplingOptions()   # a method's options (`Method.options`)

  def loss_config(self, regression: bool, regression_scale: float = 1.0) -> LossConfig:
    return self.objective.loss_config(regression, regression_scale)

  def method_options(self, method: Method):
    """The run's instance of the method's options dataclass (`Method.options`), or None when it has none."""
    if method.options is None:
      return None
    group = next((g for g in GROUPS if type(getattr(self, g)) is method.options), None)
    if group is None:
      raise RomeFlaxError(f"method {method.name}: its options ({method.options.__name__}) have no TrainConfig group")
    return getattr(self, group)

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


def field_help(name: str, also: str = "") -> str:
  """A field's one-line help with its default (`train.py --help`); `also` is added inside the brackets."""
  field = {f.name: f for f in dataclasses.fields(getattr(TrainConfig, _GROUP_OF[name]))}[name]
  default = field.default
  shown = ",".join(str(v) for v in default) if isinstance(default, tuple) else \
      ("none" if default is None else str(default).lower() if isinstance(default, bool) else str(default))
  return f"{field.metadata.get('help', '')} (default: {shown}{also})"


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

