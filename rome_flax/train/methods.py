"""The method registry: each training method declared once, as a table row (method.md).

A `Method` lists its stages; a `Stage` says which exits the step computes, whether the encoder
trains, and which loss terms it optimises. The train step, the trainer and the export only look a
method up here, so a new method is one entry in `METHODS`:

  MY_METHOD = Method("my_method", (Stage("all", True, my_terms),), supports_gr=True)

Methods see units, not examples: for token exits (sequence labelling) every word is a unit
(`train_step.flat_units`), so each method here is also a token-level method.

Every method's loss comes as two terms, `final` and `highway` (`losses.LossTerms`); RomeBERT's
gradient regularisation acts on exactly these two groups.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Callable, Optional

from rome_flax.errors import RomeFlaxError
from rome_flax.train import losses

GR_MODES = ("projection", "penalty", "none")
KL_REDUCTIONS = ("reference", "batchmean")
PROTECT = ("auto", "final", "highways")
EXIT_SETS = ("all", "final", "highways")

TermsFn = Callable[..., losses.LossTerms]   # (logits_ExBxC, labels_B, weights_B, LossConfig) -> LossTerms


def option(default, help: str):
  """A config field and its one-line help: `train.py --help` prints it with the default, so the field's
  documentation has one definition (the option groups here and in train_config.py use it)."""
  return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass(frozen=True)
class StagePlan:
  """A stage resolved for a model depth: which layers and exits a step runs and what it updates."""
  exits: tuple[int, ...]         # 0-based exits whose logits the loss sees (and whose heads train)
  num_layers: int                # encoder layers to run
  train_encoder: bool            # False: embeddings and layers frozen, exits read stop_gradient(h)


@dataclasses.dataclass(frozen=True)
class Stage:
  """One stage of a method.

  exits: 'all' (every exit), 'final' (the final exit alone) or 'highways' (exits 1..L-1 only; the
  last layer then feeds nothing the loss reads, so it is not run).
  """
  exits: str
  train_encoder: bool
  terms: TermsFn

  def __post_init__(self):
    if self.exits not in EXIT_SETS:
      raise ValueError(f"Stage.exits must be one of {EXIT_SETS}, got {self.exits!r}")

  def plan(self, num_layers: int) -> StagePlan:
    every = tuple(range(num_layers))
    if self.exits == "final":
      return StagePlan((num_layers - 1,), num_layers, self.train_encoder)
    if self.exits == "highways":
      return StagePlan(every[:-1], num_layers - 1, self.train_encoder)
    return StagePlan(every, num_layers, self.train_encoder)


@dataclasses.dataclass(frozen=True)
class Method:
  """A training method. Its optional hooks name a function as 'module:function' (a module of rome_flax,
  imported when the trainer calls it, so a method's own module may import this registry):

  validate(task, model) -> None: refuses what the method cannot train (raise `RomeFlaxError`), before
    any data is read or the output directory is touched;
  prepare(run_piece, train, options, model_cfg, seed, batch_size) -> (batch, step) -> batch: called
    once before the loop with the frozen starting model (`run_piece(batch) -> every exit's logits`,
    dropout off) and the encoded training split; the function it returns adds the method's inputs to
    each training batch (self-sampling: its frozen stage-1 targets, drawn per (seed, step)).

  options: the method's own options, a frozen dataclass with a group of its own in `TrainConfig` (flat
    field names, so `--ss_windows 5,7` and config files set them); the trainer hands the run's instance
    to `prepare` as `options`.
  unit_inputs: batch entries the `prepare` function adds that the stage's loss terms read, as
    (batch key, terms keyword) pairs; an entry is [B, E, S] (token units) or [B, E] per row, and the
    train step hands it over as [E, U] in the loss's unit order (`train_step.flat_units`). Rows first,
    so micro-batching splits them like every other batch entry.

  The trainer runs these and never checks a method's name."""
  name: str
  stages: tuple[Stage, ...]
  supports_gr: bool = False      # GR (projection / penalty) applies to its final vs highway terms
  summary: str = ""
  validate: str = ""             # 'module:function' hook (see above), or "" for none
  prepare: str = ""              # 'module:function' hook (see above), or "" for none
  options: Optional[type] = None                 # the method's options dataclass (see above)
  unit_inputs: tuple[tuple[str, str], ...] = ()  # (batch key, terms keyword) pairs (see above)

  def hook(self, which: str) -> Optional[Callable]:
    """The function a hook names (None when the method has none). A hook is 'module:function' with the module
    relative to rome_flax (e.g. 'train.self_sampling:validate'), imported only when a run uses the method."""
    if which not in ("validate", "prepare"):
      raise ValueError(f"a method has the hooks validate and prepare, not {which!r}")
    target = getattr(self, which)
    if not target:
      return None
    module, sep, function = target.partition(":")
    if not sep or not module or not function:
      raise ValueError(f"method {self.name}: hook {which} = {target!r} is not 'module:function'")
    return getattr(importlib.import_module(f"rome_flax.{module}"), function)

  @property
  def num_stages(self) -> int:
    return len(self.stages)

  def stage(self, stage: int) -> Stage:
    """Stage `stage` (1-based)."""
    if not 1 <= stage <= self.num_stages:
      raise RomeFlaxError(f"method {self.name} has {self.num_stages} stage(s), not a stage {stage}")
    return self.stages[stage - 1]

  def uses_gr(self, gr: str) -> bool:
    return self.supports_gr and gr != "none"


@dataclasses.dataclass(frozen=True)
class SelfSamplingOptions:
  """Self-sampling's options (method self_sampling, method-seqlab.md section 4): per sentence a TOKEE
  window and threshold drawn from these lists; the sandwich rules (the first `small` sentences of a batch
  get the smallest window or the largest threshold, the last `full` never halt); the cap on the doubled
  upper-half threshold."""
  ss_windows: tuple = option((5, 7, 9, 11, 13, 15), "self-sampling: TOKEE windows drawn per sentence (odd)")
  ss_thresholds: tuple = option((0.01, 0.03, 0.05, 0.1, 0.15, 0.2, 0.25),
                                "self-sampling: TOKEE thresholds drawn per sentence")
  ss_sandwich_small: int = option(2, "self-sampling: sentences per batch given the smallest window / largest "
                                  "threshold")
  ss_sandwich_full: int = option(4, "self-sampling: sentences per batch that never halt")
  ss_upper_cap: float = option(0.5, "self-sampling: the cap on the doubled upper-half threshold")

  def __post_init__(self):
    try:   # config.json lists, CLI strings
      windows = tuple(float(v) for v in self.ss_windows)
      object.__setattr__(self, "ss_thresholds", tuple(float(v) for v in self.ss_thresholds))
    except (TypeError, ValueError):
      raise RomeFlaxError(f"ss_windows and ss_thresholds must be lists of numbers, got {self.ss_windows!r} and "
                          f"{self.ss_thresholds!r}") from None
    if not windows or any(not w.is_integer() or w < 1 or w % 2 == 0 for w in windows):
      shown = ",".join(f"{w:g}" for w in windows) or "none"
      raise RomeFlaxError(f"ss_windows must be odd whole numbers >= 1, got {shown}")
    object.__setattr__(self, "ss_windows", tuple(int(w) for w in windows))
    if not self.ss_thresholds or any(not 0 <= t < float("inf") for t in self.ss_thresholds):
      raise RomeFlaxError(f"ss_thresholds must be a non-empty list of numbers >= 0, got {list(self.ss_thresholds)}")
    if self.ss_sandwich_small < 0 or self.ss_sandwich_full < 0:
      raise RomeFlaxError("ss_sandwich_small and ss_sandwich_full must be >= 0")


METHODS: dict[str, Method] = {m.name: m for m in (
    Method("romebert", (Stage("all", True, losses.romebert_terms),), supports_gr=True,
           summary="one stage: CE on the final exit, (1-g) CE + g T^2 KL(final || exit) on every highway, GR"),
    Method("deebert", (Stage("final", True, losses.final_terms), Stage("highways", False, losses.highway_terms)),
           summary="two stages: the final exit with the encoder, then the highways on a frozen encoder"),
    Method("pabee", (Stage("all", True, losses.pabee_terms),),
           summary="one stage: every exit's CE weighted by its layer number"),
    Method("joint_weighted", (Stage("all", True, losses.pabee_terms),),
           summary="one stage: sum_l l * CE_l / sum_l l (the sequence-labelling reference's stage 1; PABEE's loss)"),
    Method("joint", (Stage("all", True, losses.joint_terms),),
           summary="one stage: every exit's CE, unweighted"),
    Method("self_sampling", (Stage("all", False, losses.flooding_terms), Stage("all", True, losses.flooding_terms)),
           summary="TOKEE's stage 2 on a finished stage-1 token model: halting sampled per sentence from the "
                   "frozen stage-1 predictions, the mixed forward, flooding against stage 1's losses; the "
                   "encoder frozen in the first stage",
           validate="train.self_sampling:validate", prepare="train.self_sampling:prepare",
           options=SelfSamplingOptions, unit_inputs=(("flood_bias_BxLxS", "flood_bias_ExB"),)),
    Method("final_only", (Stage("final", True, losses.final_terms),),
           summary="ordinary fine-tuning: the final exit alone"),
)}
METHOD_NAMES = tuple(METHODS)


def get_method(name: str) -> Method:
  if name not in METHODS:
    raise RomeFlaxError(f"method must be one of {', '.join(METHOD_NAMES)}, got {name!r}")
  return METHODS[name]


@dataclasses.dataclass(frozen=True)
class Objective:
  """The method and its loss as a run configures them (`TrainConfig.objective`; method.md).

  kl_reduction: 'reference' divides the KL by batch x labels, as the published code's PyTorch
  KLDivLoss('mean') does; it is the default because the published gamma / T were tuned with it.
  'batchmean' divides by the batch only (the textbook KL, C times larger).
  protect: which gradient group GR keeps intact; 'auto' = method.md's rule (final exit for MNLI and
  QQP, the highways for every other task).
  highway_weight: the highway term's weight against the final exit's (1.0: the published sum over L-1
  highways, which outweighs the single final term L-1 to 1; 1/(L-1) weighs the two groups equally). GR
  sees the weighted term: projection is unchanged by it (a direction), the penalty's highway gradient
  scales with it.
  """
  method: str = option("romebert", f"{', '.join(METHOD_NAMES)} (docs/method.md)")
  gamma: float = option(0.9, "RomeBERT: the weight of the label loss against self-distillation (1: no "
                        "distillation)")
  temperature: float = option(3.0, "self-distillation temperature")
  kl_reduction: str = option("reference", f"KL scaling: {' or '.join(KL_REDUCTIONS)} (reference: the published "
                             "code's, divided by the labels)")
  gr: str = option("projection", f"gradient regularisation: {', '.join(GR_MODES)} (projection: as published)")
  gr_lambda: float = option(0.01, "gr penalty: its weight")
  protect: str = option("auto", f"GR keeps this gradient group intact: {', '.join(PROTECT)} (auto: the final exit "
                        "for MNLI and QQP, the highways otherwise)")
  highway_weight: float = option(1.0, "the highway (exits 1..L-1) term's weight against the final exit's")

  def __post_init__(self):
    get_method(self.method)
    for field, allowed in (("gr", GR_MODES), ("kl_reduction", KL_REDUCTIONS), ("protect", PROTECT)):
      if getattr(self, field) not in allowed:
        raise RomeFlaxError(f"{field} must be one of {', '.join(allowed)}, got {getattr(self, field)!r}")
    if not 0.0 <= self.gamma <= 1.0:
      raise RomeFlaxError(f"gamma must be in [0, 1], got {self.gamma}")
    if self.temperature <= 0:
      raise RomeFlaxError(f"temperature must be positive, got {self.temperature}")
    if not 0.0 < self.highway_weight < float("inf"):
      raise RomeFlaxError(f"highway_weight must be a positive number, got {self.highway_weight}")

  def loss_config(self, regression: bool, regression_scale: float = 1.0) -> "LossConfig":
    """What the train step optimises for a task: this objective and the task's target kind."""
    fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(Objective)}
    return LossConfig(**fields, regression=regression, regression_scale=regression_scale)


@dataclasses.dataclass(frozen=True)
class LossConfig(Objective):
  """What a train step optimises (hashable: the step closes over it): the run's `Objective` and the
  task's targets. regression_scale: regression losses are measured in units of this (the train labels'
  std when the run standardises its targets, data.regression_targets; 1.0: the labels' own units, as
  published)."""
  regression: bool = False
  regression_scale: float = 1.0

  def __post_init__(self):
    super().__post_init__()
    if not 0.0 < self.regression_scale < float("inf"):
      raise RomeFlaxError(f"regression_scale must be a positive number, got {self.regression_scale}")

  @property
  def method_spec(self) -> Method:
    return METHODS[self.method]

  @property
  def uses_gr(self) -> bool:
    return self.method_spec.uses_gr(self.gr)


def loss_terms(logits_ExBxC, labels_B, weights_B, cfg: LossConfig, stage: int = 1, **aux) -> losses.LossTerms:
  """The method's loss in `stage` on the exits that stage computes (its `StagePlan.exits`, in order).
  aux: per-unit inputs a method's terms read besides the labels (`Method.unit_inputs`).
  The highway term is scaled by `cfg.highway_weight` (1.0, the default, leaves every method as published)."""
  terms = cfg.method_spec.stage(stage).terms(logits_ExBxC, labels_B, weights_B, cfg, **aux)
  return terms if cfg.highway_weight == 1.0 else terms._replace(highway=cfg.highway_weight * terms.highway)


def protect_final(cfg: LossConfig, task_protects_final: bool) -> bool:
  """True when GR keeps the final exit's gradient intact and projects the highways' (group A = final)."""
  return task_protects_final if cfg.protect == "auto" else cfg.protect == "final"
