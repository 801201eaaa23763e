"""Early-exit thresholds with statistical guarantees, chosen from one all-exits pass over a calibration split.

A criterion's candidate settings form a grid ordered from the safest (index 0: no early exit) to the
most aggressive (`grid`). Each setting's per-example decisions come from the criterion itself, replayed
on the cached logits: `sweep.decisions` (`exit_policy.decide`, the one criterion step) for entropy,
max-prob, patience and SENTEE, `token_exit.simulate` for TOKEE. `decision_table` turns them into
per-example arrays [J, N] (agreement with the final exit, a bounded loss, layers used), and the rest of
this module is NumPy over those arrays:

- **consistency** (CATs, Schuster et al. 2021; split conformal): an example's nonconformity score is
  the first grid index at which its early-exit prediction disagrees with the final exit's (J if none):
  every setting below it agrees. With k = floor((n+1) epsilon) (equivalently the ceil((n+1)(1-eps))-th
  order statistic of the negated scores), the setting just below the k-th smallest score disagrees on
  a new exchangeable example with probability <= k/(n+1) <= epsilon. k = 0 (n + 1 < 1/epsilon): nothing
  is certifiable (`n_too_small`). No monotonicity of decisions in the threshold is needed.
- **risk** (Learn-then-Test, Angelopoulos et al.; as CALM): loss = 1 when the early exit is wrong and the
  final exit right (accuracy; its mean bounds the accuracy drop) or when they disagree (disagreement),
  in [0, 1]. Null H_j: risk_j > delta; p-values by Hoeffding (exp(-2n (delta - mean)^2)) or the exact
  binomial tail; fixed-sequence testing from the safest setting on, stopping at the first p > epsilon.
  With probability >= 1 - epsilon over the calibration draw, the chosen setting's risk is <= delta.
- **speed**: the most accurate setting on the calibration rows whose layer ratio (or FLOPs ratio)
  reaches a target; no guarantee.

TOKEE is calibrated on its replay (`token_exit.simulate` over the all-exits logits): in a real TOKEE run
a halted word changes later layers, so the guarantee holds for the replay, approximately for the run.

`thresholds.json` records the chosen setting, the target, the guarantee in words, n, the bound, the
calibration data's hash and the export's identity (`export_identity`); `read_thresholds` refuses a file
for another model, and infer.py --thresholds_file runs exactly its setting.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
from pathlib import Path
from typing import Optional

import numpy as np

from rome_flax.engine import exit_policy as ep
from rome_flax.engine import sweep
from rome_flax.errors import RomeFlaxError
from rome_flax.io import integrity
from rome_flax.io.files import write_json
from rome_flax.kinds import metrics
from rome_flax.kinds.kind import TaskKind, kind_of

TARGETS = ("consistency", "risk", "speed")
CRITERIA = ("entropy", "maxprob", "patience", "tokee")
P_VALUES = ("hoeffding", "binomial")
RISK_LOSSES = ("accuracy", "disagreement")
SPEED_MEASURES = ("layer", "flops")
FORMAT = "rome_flax_thresholds/1"
DEFAULT_GRID = 200
REGRESSION_RISK = ("risk control on a regression task has no 0/1 accuracy loss: use --loss disagreement with "
                   "--tolerance (|early - final| > tolerance counts as a loss)")
REGRESSION_TOLERANCE = ("a regression task's early and final predictions agree within a tolerance: pass --tolerance "
                        "(in the labels' units)")
EXPORT_CONFIG = "rome_flax_config.json"   # pretrained.EXPORT_CONFIG (not imported: pretrained loads Orbax)


# ----------------------------------------------------------------------------- the maths (NumPy)


def check_level(name: str, value: float) -> float:
  if value is None or not (isinstance(value, (int, float)) and math.isfinite(value) and 0 < value < 1):
    raise RomeFlaxError(f"--{name} must be in (0, 1), got {value}")
  return float(value)


def conformal_k(n: int, epsilon: float) -> int:
  """floor((n+1) epsilon): the order statistic (1-based, smallest first) of the first-failure scores
  the certified setting must stay below; 0 when nothing is certifiable."""
  return int(math.floor((n + 1) * epsilon))


def first_failure(wrong_JxN) -> np.ndarray:
  """Per example, the first grid index at which it is wrong (disagrees), J where it never is."""
  wrong = np.asarray(wrong_JxN, bool)
  J = wrong.shape[0]
  return np.where(wrong.any(0), wrong.argmax(0), J)


def conformal_choice(agree_JxN, epsilon: float) -> Optional[int]:
  """The most aggressive grid index certified for consistency at level epsilon, or None when n is
  too small (k = 0). Index 0 (no early exit) must agree everywhere."""
  agree = np.asarray(agree_JxN, bool)
  if not agree[0].all():
    raise ValueError("grid index 0 must be the no-early-exit setting (agreeing everywhere)")
  n = agree.shape[1]
  k = conformal_k(n, epsilon)
  if k < 1:
    return None
  s = np.sort(first_failure(~agree))
  return int(min(s[k - 1], agree.shape[0]) - 1)


def naive_consistency(agree_JxN, epsilon: float) -> int:
  """The uncorrected choice: the most aggressive index whose calibration disagreement is <= epsilon."""
  rate = 1.0 - np.asarray(agree_JxN, np.float64).mean(1)
  return int(np.flatnonzero(rate <= epsilon).max())


def hoeffding_p(mean_loss, n: int, delta: float):
  """P-value of H: risk > delta for a mean of n losses in [0, 1] (Hoeffding)."""
  m = np.asarray(mean_loss, np.float64)
  return np.where(m < delta, np.exp(-2.0 * n * np.square(delta - m)), 1.0)


def binomial_p(loss_sum, n: int, delta: float):
  """Exact p-value of H: risk > delta for a sum of n 0/1 losses: P(Binomial(n, delta) <= sum)."""
  from scipy.stats import binom
  return binom.cdf(np.asarray(loss_sum), n, delta)


def p_values(loss_JxN, delta: float, method: str = "hoeffding") -> np.ndarray:
  loss = np.asarray(loss_JxN, np.float64)
  n = loss.shape[1]
  if method == "binomial":
    if not np.all((loss == 0) | (loss == 1)):
      raise RomeFlaxError("the exact binomial p-value needs 0/1 losses; use --p_value hoeffding")
    return binomial_p(np.rint(loss.sum(1)), n, delta)
  return hoeffding_p(loss.mean(1), n, delta)


def fixed_sequence(p_J, epsilon: float) -> int:
  """Fixed-sequence testing from index 1 on (index 0, no early exit, has zero loss): the last index of
  the leading run of p-values <= epsilon; 0 when the first is not rejected."""
  p = np.asarray(p_J, np.float64)
  chosen = 0
  for j in range(1, len(p)):
    if p[j] > epsilon:
      break
    chosen = j
  return chosen


def naive_risk(loss_JxN, delta: float) -> int:
  """The uncorrected choice: the most aggressive index whose calibration mean loss is <= delta."""
  mean = np.asarray(loss_JxN, np.float64).mean(1)
  return int(np.flatnonzero(mean <= delta).max())


def min_risk_epsilon(n: int, delta: float, method: str = "hoeffding") -> float:
  """The smallest epsilon n losses can certify at delta (a zero empirical loss)."""
  return float(math.exp(-2.0 * n * delta * delta)) if method == "hoeffding" else float((1.0 - delta) ** n)


def hoeffding_bound(mean_loss: float, n: int, epsilon: float) -> float:
  """Upper (1 - epsilon) confidence bound on a risk from the mean of n losses in [0, 1]."""
  return float(mean_loss + math.sqrt(math.log(1.0 / epsilon) / (2.0 * n)))


def speed_choice(score_J, ratio_J, target: float) -> Optional[int]:
  """The index with the best score among those whose speed ratio reaches target (ties: the faster)."""
  score, ratio = np.asarray(score_J, np.float64), np.asarray(ratio_J, np.float64)
  ok = np.flatnonzero(ratio >= target - 1e-12)
  if ok.size == 0:
    return None
  return int(max(ok, key=lambda j: (score[j], ratio[j])))


# ----------------------------------------------------------------------------- candidate settings


@dataclasses.dataclass
class Grid:
  """Candidate settings of one criterion, safest first; index 0 runs no early exit."""
  criterion: str
  values: list           # the threshold of each setting (index 0: the safest value)
  num_exits: int
  num_labels: int
  kind: TaskKind                       # the model's task kind (what the criterion reads)
  min_exit_layer: int = 1
  delta: Optional[float] = None        # regression patience tolerance
  pool: Optional[str] = None           # SENTEE pooling
  window: Optional[int] = None         # TOKEE
  upper_scale: float = 2.0             # TOKEE

  def __len__(self) -> int:
    return len(self.values)

  def policy(self, j: int):
    if self.criterion == "tokee":
      from rome_flax.engine import token_exit
      return token_exit.make_token_policy(float(self.values[j]), self.window, self.num_exits,
                                          upper_scale=self.upper_scale)
    return ep.make_policy(self.criterion, float(self.values[j]), self.num_exits, num_labels=self.num_labels,
                          min_exit_layer=self.num_exits if j == 0 else self.min_exit_layer, delta=self.delta,
                          kind=self.kind, pool=self.pool)

  def setting(self, j: int) -> dict:
    """What thresholds.json stores to rebuild setting j (`policy_from_setting`)."""
    out = {"criterion": self.criterion, "threshold": float(self.values[j]),
           "min_exit_layer": self.num_exits if j == 0 else self.min_exit_layer}
    if self.criterion == "tokee":
      out = {"criterion": "tokee", "threshold": float(self.values[j]), "window": self.window,
             "upper_scale": self.upper_scale}
    elif self.delta is not None:
      out["delta"] = self.delta
    if self.pool is not None:
      out["pool"] = self.pool
    out["describe"] = self.policy(j).describe()
    return out


def make_grid(criterion: str, cfg, *, size: int = DEFAULT_GRID, min_exit_layer: int = 1,
              delta: Optional[float] = None, pool: Optional[str] = None, window: Optional[int] = None,
              upper_scale: float = 2.0) -> Grid:
  """The candidate grid of a criterion for a model config (validated by building its policies).
  entropy: 0 then `size` values geometric up to the largest entropy (log C; SENTEE and TOKEE: 1, their
  entropies are normalised); maxprob: 1 - geometric down to 1/C; patience: k = E-1 (no early exit) down to 1."""
  if criterion not in CRITERIA:
    raise RomeFlaxError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
  if size < 2:
    raise RomeFlaxError(f"--grid must be >= 2, got {size}")
  kind = kind_of(cfg)
  if criterion == "tokee" and not kind.token_level_exit:
    raise RomeFlaxError("criterion 'tokee' (token-level early exit) is for token tasks (sequence labelling); this "
                        "model has one prediction per sentence")
  if criterion == "tokee" and window is None:
    window = 3
  if criterion != "tokee" and window is not None:
    raise RomeFlaxError("--window is TOKEE's (criterion tokee)")
  E, C = cfg.num_exits, cfg.num_labels
  if criterion in ("entropy", "tokee"):
    top = kind.entropy_top(C)
    values = [0.0] + np.geomspace(top * 1e-6, top, size).tolist()
  elif criterion == "maxprob":
    values = [1.0] + (1.0 - np.geomspace(1e-6, 1.0 - 1.0 / max(C, 2), size)).tolist()
  else:
    values = [float(k) for k in range(max(E - 1, 1), 0, -1)]
  grid = Grid(criterion, values, E, C, kind, min_exit_layer, delta, pool, window, upper_scale)
  grid.policy(len(values) - 1)   # validates the options (criterion for the task, delta, pool, window)
  return grid


@dataclasses.dataclass
class DecisionTable:
  """Per setting j and example i (from the criterion's replay on cached logits)."""
  agree: np.ndarray        # bool [J, N]: the early-exit prediction equals the final exit's (within tolerance)
  loss: Optional[np.ndarray]   # float [J, N] in [0, 1] (None: no labels for an accuracy loss)
  layers: np.ndarray       # float [J, N]: layers run (TOKEE: summed over the sentence's words)
  units: np.ndarray        # float [N]: what `layers` counts over (1 per sentence; TOKEE: its words)
  exits: Optional[np.ndarray]  # int [J, N] 0-based exit per sentence (None for TOKEE)
  metric: np.ndarray       # [J]: the task metric on all rows (agreement % without labels)
  metric_name: str

  def layer_ratio(self, j: int, rows=slice(None), num_layers: int = 1) -> float:
    return float(num_layers * self.units[rows].sum() / self.layers[j, rows].sum())


def decision_table(grid: Grid, exit_logits, cfg, task, labels=None, word_mask=None, *,
                   tolerance: Optional[float] = None, loss: str = "accuracy") -> DecisionTable:
  """Every grid setting's per-example decisions from the cached logits [E, N, C] (token tasks
  word-level [E, N, W, C] with word_mask [N, W])."""
  import jax.numpy as jnp
  logits = np.asarray(exit_logits, np.float32)
  kind, reg = kind_of(cfg), cfg.is_regression
  final = kind.predictions(logits[-1])
  labelled = labels is not None
  tolerance = 0.0 if tolerance is None else tolerance   # regression: agreement within it (0: exact)
  labelled_loss = labelled and not reg   # scores have no 0/1 correctness: only the disagreement loss
  u = valid = None
  if grid.criterion == "tokee":
    from rome_flax.engine import token_exit
    u = token_exit.word_uncertainty(jnp.asarray(logits))
    valid = jnp.asarray(word_mask, bool)
  J, N = len(grid), logits.shape[1]
  agree, losses, layers = np.zeros((J, N), bool), np.zeros((J, N), np.float32), np.zeros((J, N), np.float32)
  exits = None if grid.criterion == "tokee" else np.zeros((J, N), np.int32)
  score = np.zeros(J)
  wmask = None if word_mask is None else np.asarray(word_mask, bool)
  units = np.ones(N) if grid.criterion != "tokee" else wmask.sum(1).astype(np.float64)
  metric_name = metrics.primary_metric(task) if labelled else "agreement_percent"
  for j in range(J):
    policy = grid.policy(j)
    if grid.criterion == "tokee":
      from rome_flax.engine import token_exit
      exit_NxW = np.asarray(token_exit.simulate(policy, u, valid))
      pred = np.take_along_axis(logits, exit_NxW[None, :, :, None], axis=0)[0].argmax(-1)
      layers[j] = np.where(wmask, exit_NxW + 1, 0).sum(1)
    else:
      pred, exit_N = sweep.decisions(policy, logits, reg, word_mask)
      exits[j] = exit_N
      layers[j] = exit_N + 1
    if reg:
      same = np.abs(pred - final) <= tolerance
    else:
      same = pred == final
    agree[j] = kind.example_agrees(same, wmask)   # token tasks: a sentence agrees when every word does
    if loss == "disagreement" or not labelled_loss:
      losses[j] = kind.example_share(~same, wmask)
    else:
      gold = np.asarray(labels)
      losses[j] = kind.example_share((pred != gold) & (final == gold), wmask)
    score[j] = (metrics.compute_metrics(task, pred, labels)[metric_name] if labelled else 100.0 * agree[j].mean())
  use_loss = loss == "disagreement" or labelled_loss
  return DecisionTable(agree, losses if use_loss else None, layers, units, exits, score, metric_name)


# ----------------------------------------------------------------------------- one calibration


def check_target(cfg, target: str, *, loss: str = "accuracy", tolerance: Optional[float] = None,
                 p_value: str = "hoeffding") -> None:
  """Refuses what a model's task cannot be calibrated for, before any pass runs."""
  if target not in TARGETS:
    raise RomeFlaxError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
  if loss not in RISK_LOSSES:
    raise RomeFlaxError(f"--loss must be one of {', '.join(RISK_LOSSES)}, got {loss!r}")
  if p_value not in P_VALUES:
    raise RomeFlaxError(f"--p_value must be one of {', '.join(P_VALUES)}, got {p_value!r}")
  if tolerance is not None and not (math.isfinite(tolerance) and tolerance >= 0):
    raise RomeFlaxError(f"--tolerance must be a number >= 0, got {tolerance}")
  if tolerance is not None and not cfg.is_regression:
    raise RomeFlaxError("--tolerance is for regression tasks (classes agree when they are equal)")
  if cfg.is_regression and target == "risk" and loss == "accuracy":
    raise RomeFlaxError(REGRESSION_RISK)
  if cfg.is_regression and tolerance is None and target in ("consistency", "risk"):
    raise RomeFlaxError(REGRESSION_TOLERANCE)
  if kind_of(cfg).unit != "example" and target == "risk" and p_value == "binomial":
    raise RomeFlaxError("a token task's loss is a share of a sentence's words, not 0/1: use --p_value hoeffding")


def n_too_small(n: int, what: str) -> RomeFlaxError:
  return RomeFlaxError(f"n={n} can certify {what}; use a larger calibration slice")


def choose(table: DecisionTable, grid: Grid, cfg, lengths, *, target: str, epsilon: Optional[float] = None,
           delta: Optional[float] = None, speedup: Optional[float] = None, p_value: str = "hoeffding",
           speed_measure: str = "layer", tolerance: Optional[float] = None, loss: str = "accuracy") -> dict:
  """The chosen setting and what certifies it (a dict: thresholds.json's body, less the identities)."""
  check_target(cfg, target, loss=loss, tolerance=tolerance, p_value=p_value)
  n = table.agree.shape[1]
  L = cfg.num_layers
  tokee = grid.criterion == "tokee"
  kind = kind_of(cfg)
  agreement = kind.agreement(tolerance)
  replay = (" (for TOKEE's replay on the all-exits pass: a real TOKEE run's later layers change after a halt, so "
            "there the guarantee is approximate)") if tokee else ""
  out = {"target": target, "n": n}
  if target == "consistency":
    epsilon = check_level("epsilon", epsilon)
    k = conformal_k(n, epsilon)
    if k < 1:
      raise n_too_small(n, f"epsilon >= {1.0 / (n + 1):.4g} (1/(n+1)) for consistency, not {epsilon:g} "
                           f"(which needs n >= {math.ceil(1.0 / epsilon - 1.0)})")
    j = conformal_choice(table.agree, epsilon)
    out.update(epsilon=epsilon, order_statistic=int(math.ceil((n + 1) * (1 - epsilon))), k=k,
               bound=k / (n + 1),
               guarantee=f"for a new example exchangeable with the {n} calibration rows, P({agreement}) >= "
                         f"1 - {epsilon:g} (marginal over the example and the calibration draw; split conformal, "
                         f"bound k/(n+1) = {k / (n + 1):.4g}){replay}")
  elif target == "risk":
    epsilon, delta = check_level("epsilon", epsilon), check_level("delta", delta)
    if table.loss is None:
      raise RomeFlaxError("risk control with the accuracy loss needs a labelled split (this one has no labels); "
                          "pass a labelled --split or --loss disagreement")
    floor = min_risk_epsilon(n, delta, p_value)
    if floor > epsilon:
      raise n_too_small(n, f"epsilon >= {floor:.3g} at delta={delta:g} ({p_value}), not {epsilon:g}")
    p = p_values(table.loss, delta, p_value)
    j = fixed_sequence(p, epsilon)
    mean = float(table.loss[j].mean())
    units = kind.loss_units()
    what = {"accuracy": f"the share of {units} the early exit gets wrong and the final exit right (so the accuracy "
                        "drop vs the full model)", "disagreement": f"the share of {units} whose early-exit "
                        "prediction differs from the final exit's"}[loss]
    out.update(epsilon=epsilon, delta=delta, loss=loss, p_value_method=p_value,
               p_value=float(p[j]) if j > 0 else None, calibration_loss=mean,
               bound=hoeffding_bound(mean, n, epsilon) if p_value == "hoeffding" else None,
               guarantee=f"with probability >= 1 - {epsilon:g} over the draw of the {n} calibration rows, the "
                         f"expected {what} is <= {delta:g} (Learn-then-Test, fixed-sequence, {p_value} p-values)"
                         f"{replay}")
  elif target == "speed":
    if speedup is None or not (math.isfinite(speedup) and speedup >= 1):
      raise RomeFlaxError(f"--speedup must be a number >= 1, got {speedup}")
    if speed_measure not in SPEED_MEASURES:
      raise RomeFlaxError(f"--speed_measure must be one of {', '.join(SPEED_MEASURES)}, got {speed_measure!r}")
    if speed_measure == "flops" and tokee:
      raise RomeFlaxError("--speed_measure flops is not available for TOKEE: its replay has no piece counts; use "
                          "layer")
    ratios = np.array([_ratio(table, cfg, lengths, jj, speed_measure) for jj in range(len(grid))])
    j = speed_choice(table.metric, ratios, speedup)
    if j is None:
      raise RomeFlaxError(f"no {grid.criterion} setting reaches a {speed_measure} ratio of {speedup:g} on these rows "
                          f"(the fastest reaches {ratios.max():.3g})")
    out.update(speedup=speedup, speed_measure=speed_measure,
               guarantee=f"none: the most accurate setting ({table.metric_name}) on the {n} calibration rows whose "
                         f"{speed_measure} ratio is >= {speedup:g}")
  else:
    raise RomeFlaxError(f"--target must be one of {', '.join(TARGETS)}, got {target!r}")
  out["early_exit"] = j > 0
  out["setting"] = grid.setting(j)
  out["grid_index"] = j
  out["grid_size"] = len(grid)
  out["calibration"] = {"layer_ratio": table.layer_ratio(j, num_layers=L),
                        "flops_ratio": None if tokee else _ratio(table, cfg, lengths, j, "flops"),
                        "agreement": float(table.agree[j].mean()), table.metric_name: float(table.metric[j]),
                        "final_exit_" + table.metric_name: float(table.metric[0])}
  return out


def _ratio(table: DecisionTable, cfg, lengths, j: int, measure: str) -> float:
  if measure == "flops":
    return sweep.flops_ratio(cfg, table.exits[j], lengths)
  return table.layer_ratio(j, num_layers=cfg.num_layers)


# ----------------------------------------------------------------------------- identities and the file


def export_identity(path) -> str:
  """SHA-256 of a rome_flax export's model config and its parameters' checksums (the manifest's, else
  hashed now): the same for copies of one export, different for another model."""
  path = Path(os.path.expanduser(str(path)))
  config = path / EXPORT_CONFIG
  if not config.is_file():
    raise RomeFlaxError(f"{path} is not a rome_flax export ({EXPORT_CONFIG}); thresholds are calibrated for an "
                        "export: convert it first (python -m rome_flax convert)")
  try:
    model = json.loads(config.read_text(encoding="utf-8"))["model"]
  except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
    raise RomeFlaxError(f"{config} is malformed ({type(e).__name__})") from None
  params = None
  manifest = path / integrity.MANIFEST
  if manifest.is_file():
    try:
      listed = json.loads(manifest.read_text(encoding="utf-8"))["files"]
      params = {rel: e["sha256"] for rel, e in listed.items() if rel.startswith("params/")}
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
      params = None
  if not params:
    root = path / "params"
    params = {p.relative_to(path).as_posix(): integrity.sha256_of(p) for p in sorted(root.rglob("*")) if p.is_file()}
  blob = json.dumps({"model": model, "params": params}, sort_keys=True).encode()
  return hashlib.sha256(blob).hexdigest()


def data_hash(chunks) -> str:
  """SHA-256 of a split's examples (texts / words, labels / tags, ids), chunk by chunk."""
  h = hashlib.sha256()
  for c in chunks:
    fields = ("words", "tags", "ids") if hasattr(c, "words") else ("texts_a", "texts_b", "labels", "ids")
    for f in fields:
      v = getattr(c, f)
      v = v.tolist() if isinstance(v, np.ndarray) else v
      h.update(json.dumps(v, default=float).encode())
  return h.hexdigest()


def write_thresholds(path, record: dict) -> Path:
  return write_json(path, {"format": FORMAT, **record})


def read_thresholds(path, identity: str) -> dict:
  """A thresholds file's record, checked: its format, and that it was calibrated for this export."""
  p = Path(os.path.expanduser(str(path)))
  if not p.is_file():
    raise RomeFlaxError(f"thresholds file {path} does not exist" if not p.exists() else
                        f"thresholds file {path} is not a file")
  try:
    record = json.loads(p.read_text(encoding="utf-8"))
    if not isinstance(record, dict) or record.get("format") != FORMAT:
      raise ValueError(f"not a {FORMAT} file")
    setting = record["setting"]
    if not isinstance(setting, dict) or setting.get("criterion") not in CRITERIA:
      raise ValueError("no setting")
    float(setting["threshold"])
    model = record["model"]["identity"]
  except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
    raise RomeFlaxError(f"thresholds file {path} is malformed ({e if isinstance(e, ValueError) else type(e).__name__}); "
                        "write it with python -m rome_flax calibrate") from None
  if model != identity:
    raise RomeFlaxError(f"thresholds file {path} was calibrated for another model (identity {str(model)[:12]}..., this "
                        f"export's is {identity[:12]}...); calibrate this export")
  return record


def policy_from_setting(setting: dict, cfg):
  """The setting a thresholds file names -> ('sentence', ExitPolicy) or ('token', TokenPolicy)."""
  try:
    if setting["criterion"] == "tokee":
      from rome_flax.engine import token_exit
      if not kind_of(cfg).token_level_exit:
        raise RomeFlaxError("the thresholds file's setting is TOKEE (token tasks); this model has one prediction "
                            "per sentence")
      return "token", token_exit.make_token_policy(float(setting["threshold"]), int(setting["window"]),
                                                   cfg.num_layers, upper_scale=float(setting.get("upper_scale", 2.0)))
    delta = setting.get("delta")
    return "sentence", ep.policy_for(cfg, setting["criterion"], float(setting["threshold"]),
                                     min_exit_layer=int(setting.get("min_exit_layer", 1)),
                                     delta=None if delta is None else float(delta), pool=setting.get("pool"))
  except (KeyError, TypeError, ValueError) as e:
    raise RomeFlaxError(f"the thresholds file's setting is malformed ({type(e).__name__}: {e})") from None
