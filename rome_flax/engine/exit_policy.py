"""Early-exit criteria, each defined once and shared by every inference path.

A criterion is a per-exit step `step(policy, state, logits_BxC, i) -> (state, exit_now_B)`: exit i
(0-based, traced or static) has produced `logits_BxC`; `exit_now_B` says which examples would stop
there. The offline sweep scans it over cached logits [E,N,C], the latency path calls it inside its
`lax.while_loop` over layers, and the throughput scheduler calls it on each gathered batch. Because
it is the same function everywhere, the three paths take the same decisions.

`ExitPolicy` is a pytree whose thresholds are array leaves and whose criterion / exit count / minimum
exit layer are static: changing a threshold never re-traces a jitted path.

Criteria (layers and exits are 1-based in user-facing text, 0-based in code):
  entropy   exit at the first exit i with H(softmax(z_i)) < tau_i (DeeBERT / RomeBERT);
  maxprob   exit when max softmax(z_i) >= p_i;
  patience  PABEE: exit when the prediction has stayed the same for k consecutive exits (the argmax
            for classification; |z_i - z_{i-1}| < delta for regression).
Exits before `min_exit_layer` are never taken, and an example that never exits takes the last exit.

Token exits (sequence labelling, logits [B,S,C] with a word mask [B,S]): a sentence exits as a
whole (SENTEE, method-seqlab.md section 3) when its uncertainty, the max (or, `pool='avg'`, the
mean) over its words of the NORMALISED entropy H / log C, is below tau_i; maxprob pools the words'
max probabilities by min (or mean). Patience is a sentence-task criterion. The task kind (kinds/kind.py)
says which criteria apply, whether a sentence pools its words (`ExitPolicy.pool`) and the default thresholds.

`Policy` is the one protocol of every criterion: `ExitPolicy` (entropy, maxprob, patience, SENTEE)
and `token_policy.TokenPolicy` (TOKEE, each word its own exit) both implement it, and every driver
(the offline `decide`, the latency loop, the engine's steps, TOKEE's closed loop) runs a policy as
`state = policy.init_state(units)`, `state, exit_now = policy.step(state, logits, i, units)`, then
`record_exit`, the one first-exit bookkeeping, on whatever units decide (examples or words).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional, Protocol, Sequence, Union, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from rome_flax.errors import RomeFlaxError
from rome_flax.kinds import kind as kinds
from rome_flax.kinds.kind import CLASSIFICATION, REGRESSION, SENTENCE_CRITERIA, TaskKind, kind_of
from rome_flax.model import heads

CRITERIA = SENTENCE_CRITERIA
POOLS = kinds.POOLS   # how SENTEE pools a sentence's words (the CLIs' --pool)
DEFAULT_MAXPROBS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 0.999)
# Entropies: each kind's `default_entropies` (kinds/kind.py: RomeBERT's nats, SENTEE's normalised entropies).

Threshold = Union[float, Sequence[float]]


class PolicyState(NamedTuple):
  """What a criterion carries from one exit to the next, per example."""
  count_B: jax.Array  # int32: consecutive exits whose prediction did not change (patience)
  prev_B: jax.Array   # float32: previous exit's prediction (argmax or value); NaN before the first exit


@runtime_checkable
class Policy(Protocol):
  """What every early-exit criterion implements (issue 19: one protocol, not one per track).

  A *unit* is what takes an exit: an example (sentence tasks, SENTEE) or a word (TOKEE).
  `init_state(units)`: the state before the first exit, for a bool mask of the units (shape [B] or
  [B, W]; False: padding). `step(state, logits, i, units)`: exit i (0-based, traced) produced
  `logits`; returns (new state, exit_now) with exit_now one bool per unit: True where the unit exits
  at exit i (at the last exit, every unit that has not exited yet). Drivers then apply the one
  first-exit bookkeeping, `record_exit`. Thresholds are array leaves (a new threshold never re-traces); `describe()` names the
  setting in tables and prediction files."""
  num_exits: int

  def init_state(self, units) -> Any: ...
  def step(self, state, logits, i, units=None) -> tuple[Any, jax.Array]: ...
  def describe(self) -> str: ...


@struct.dataclass
class ExitPolicy:
  threshold_E: jax.Array  # float32 [E]: tau (entropy), p (maxprob) or k (patience) for each exit
  delta: jax.Array        # float32 []: regression patience tolerance (unused otherwise)
  criterion: str = struct.field(pytree_node=False)
  num_exits: int = struct.field(pytree_node=False)
  is_regression: bool = struct.field(pytree_node=False)
  min_exit_layer: int = struct.field(pytree_node=False, default=1)
  # how a sentence pools its words into its one decision (SENTEE: max / avg); None: one logit vector per example
  pool: Optional[str] = struct.field(pytree_node=False, default=None)

  def init_state(self, units) -> "PolicyState":
    """`Policy.init_state`: units is the [B] mask (or any array of that shape) of the examples."""
    return init_state(jnp.shape(units))

  def step(self, state: "PolicyState", logits, i, units=None):
    """`Policy.step`: one decision per example; units is the word mask [B, S] of token exits (SENTEE:
    the words decide together), None for a sentence head."""
    return step(self, state, logits, i, units)

  def describe(self) -> str:
    """Short human-readable name, e.g. 'entropy<0.1' or 'patience=2'."""
    values = np.asarray(self.threshold_E)[:-1] if self.num_exits > 1 else np.asarray(self.threshold_E)
    shown = _fmt(values[0]) if np.all(values == values[0]) else "/".join(_fmt(v) for v in values)
    sign = {"entropy": "<", "maxprob": ">=", "patience": "="}[self.criterion]
    text = f"{self.criterion}{sign}{shown}"
    if self.criterion == "patience" and self.is_regression:
      text += f",delta={_fmt(float(self.delta))}"
    if self.min_exit_layer > 1:
      text += f",min_layer={self.min_exit_layer}"
    if self.pool not in (None, "max"):
      text += f",pool={self.pool}"
    return text


def _fmt(v) -> str:
  return f"{float(v) + 0.0:.4g}"


def make_policy(criterion: str, threshold: Threshold, num_exits: int, *, num_labels: int,
                kind: Optional[TaskKind] = None, min_exit_layer: int = 1, delta: float | None = None,
                pool: str | None = None) -> ExitPolicy:
  """Validated policy. `threshold` is one value for every exit, or one per exit (E values, or E-1
  values for the highways: the last exit always exits, so its threshold does not matter).
  kind: the model's task kind (default: classification, regression for one label); it says which criteria
  apply and whether a sentence pools its units (token exits: a sentence exits as a whole, `pool` its words).
  """
  if criterion not in CRITERIA:
    raise RomeFlaxError(f"unknown criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
  kind = kind or (REGRESSION if num_labels == 1 else CLASSIFICATION)
  kind.check_criterion(criterion)
  pool = kind.sentence_pool(pool)
  is_regression = kind.is_regression
  if criterion == "patience" and is_regression and delta is None:
    raise RomeFlaxError("patience on a regression task needs a tolerance in the label's units: pass delta "
                        "(infer.py --delta D; a served policy as JSON, {\"criterion\": \"patience\", \"threshold\": 2, "
                        "\"delta\": D})")
  if delta is not None and not (math.isfinite(delta) and delta > 0):
    raise RomeFlaxError(f"delta must be a positive number, got {delta}")
  if not 1 <= min_exit_layer <= num_exits:
    raise RomeFlaxError(f"min_exit_layer must be in 1..{num_exits}, got {min_exit_layer}")
  values = np.atleast_1d(np.asarray(threshold, dtype=np.float64))
  if values.ndim != 1 or values.size not in (1, num_exits - 1, num_exits) or values.size == 0:
    raise RomeFlaxError(f"give one threshold or one per exit ({num_exits - 1} or {num_exits}), got {values.size}")
  if not np.all(np.isfinite(values)):
    raise RomeFlaxError(f"thresholds must be finite numbers, got {values.tolist()}")
  if criterion == "entropy" and np.any(values < 0):
    raise RomeFlaxError(f"entropy thresholds must be >= 0, got {values.tolist()}")
  if criterion == "maxprob" and np.any((values < 0) | (values > 1)):
    raise RomeFlaxError(f"max-probability thresholds must be in [0, 1], got {values.tolist()}")
  if criterion == "patience" and np.any((values < 1) | (values != np.round(values))):
    raise RomeFlaxError(f"patience must be a whole number >= 1, got {values.tolist()}")
  if values.size == 1:
    values = np.full(num_exits, values[0])
  elif values.size == num_exits - 1:
    values = np.append(values, values[-1])
  return ExitPolicy(threshold_E=jnp.asarray(values, jnp.float32),
                    delta=jnp.asarray(delta if delta is not None else 0.0, jnp.float32),
                    criterion=criterion, num_exits=num_exits, is_regression=is_regression,
                    min_exit_layer=min_exit_layer, pool=pool)


def policy_for(cfg, criterion: str, threshold: Threshold, **options) -> ExitPolicy:
  """`make_policy` for a model config: its kind says what a criterion reads (one logit vector per example,
  or words pooled into the sentence's decision: SENTEE) and its label count."""
  return make_policy(criterion, threshold, cfg.num_exits, num_labels=cfg.num_labels, kind=kind_of(cfg), **options)


def defaults_for(cfg, criterion: str) -> list[list[float]]:
  """`default_thresholds` for a model config (SENTEE's normalised entropies for token exits)."""
  return default_thresholds(criterion, cfg.num_exits, kind=kind_of(cfg))


def parse_thresholds(text: str) -> list[list[float]]:
  """'0.05,0.1,0.2' -> three settings; '0.1:0.2:0.3' is one setting with per-exit thresholds."""
  settings = []
  for item in str(text).split(","):
    item = item.strip()
    if not item:
      raise RomeFlaxError(f"threshold list {text!r} has an empty item")
    try:
      values = [float(v) for v in item.split(":")]
    except ValueError:
      raise RomeFlaxError(f"threshold list {text!r} does not parse: {item!r} is not a number "
                          "(use e.g. 0.05,0.1,0.2 or per-exit 0.1:0.2:0.3)") from None
    if values in settings:   # '0.1,0.10,1e-1': one setting three times, three identical rows
      raise RomeFlaxError(f"threshold list {text!r} repeats the setting {item!r}; give each once")
    settings.append(values)
  return settings


def default_thresholds(criterion: str, num_exits: int, *, kind: TaskKind = CLASSIFICATION) -> list[list[float]]:
  """The thresholds a sweep uses when the user names none (entropies: the kind's scale)."""
  if criterion == "entropy":
    return [[v] for v in kind.default_entropies]
  if criterion == "maxprob":
    return [[v] for v in DEFAULT_MAXPROBS]
  return [[float(k)] for k in range(1, max(num_exits - 1, 1) + 1)]


# ----------------------------------------------------------------------------- the criteria


def init_state(batch_shape) -> PolicyState:
  return PolicyState(count_B=jnp.zeros(batch_shape, jnp.int32),
                     prev_B=jnp.full(batch_shape, jnp.nan, jnp.float32))


def entropy(logits_BxC) -> jax.Array:
  """H(softmax(z)) computed stably as -sum softmax * log_softmax."""
  logp_BxC = jax.nn.log_softmax(logits_BxC.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(logp_BxC) * logp_BxC, axis=-1)


def _pool_words(values_BxS, word_mask_BxS, pool: str, worst: str):
  """A sentence's value from its words': the worst word ('max' of uncertainties, 'min' of
  confidences) or the mean. A row without words gives the value that lets it exit."""
  m_BxS = word_mask_BxS > 0
  if pool == "avg":
    return jnp.sum(jnp.where(m_BxS, values_BxS, 0.0), axis=-1) / jnp.maximum(m_BxS.sum(-1), 1)
  if worst == "max":
    return jnp.max(jnp.where(m_BxS, values_BxS, -jnp.inf), axis=-1)
  return jnp.min(jnp.where(m_BxS, values_BxS, jnp.inf), axis=-1)


def score(criterion: str, logits, word_mask_BxS=None, pool: str = "max") -> jax.Array:
  """The number an entropy or maxprob criterion compares with its threshold, per example: the entropy
  (exits below tau) or the max probability (exits at or above p). Token exits (logits [B,S,C] and
  word_mask_BxS), SENTEE (method-seqlab.md section 3): the words' normalised entropies H / log C pooled
  by max (or mean), the words' max probabilities pooled by min (or mean)."""
  logits = logits.astype(jnp.float32)
  if criterion == "entropy":
    h = entropy(logits)
    if word_mask_BxS is None:
      return h
    return _pool_words(h / math.log(logits.shape[-1]), word_mask_BxS, pool, "max")
  p = jnp.max(jax.nn.softmax(logits, axis=-1), axis=-1)
  return p if word_mask_BxS is None else _pool_words(p, word_mask_BxS, pool, "min")


def confident(criterion: str, score_B, threshold):
  return score_B < threshold if criterion == "entropy" else score_B >= threshold


# Shares of examples that a data-driven grid lets exit at the first exit (`grid_from_scores`).
GRID_SHARES = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.98)


def grid_from_scores(criterion: str, first_exit_logits, word_mask_NxW=None, pool: str = "max",
                     shares=GRID_SHARES) -> list[float]:
  """Thresholds at which about each of `shares` of the examples would exit at the first exit (the
  others later): a grid that reaches from little early exit to nearly all of it on any task, whatever
  its uncertainty scale (issue 25: the fixed tau list topped out at a 1.04x layer ratio on 17-tag POS).
  Quantiles of the criterion's own `score` on the cached first-exit logits, 4 significant digits."""
  values = np.asarray(score(criterion, jnp.asarray(first_exit_logits),
                            None if word_mask_NxW is None else jnp.asarray(word_mask_NxW), pool), np.float64)
  levels = np.asarray(shares) if criterion == "entropy" else 1.0 - np.asarray(shares)
  grid = np.quantile(values, levels)
  if criterion == "maxprob":
    grid = np.clip(grid, 0.0, 1.0)
  return sorted({float(f"{max(v, 0.0):.4g}") for v in grid})


# Two paths that sum in different orders (batch 1 against batch 64, gathered against plain) give scores
# that differ by rounding (~1e-6 in float32; more with bfloat16 compute): a decision whose score lies
# this close to its threshold may differ between them. Benches and tests compare decisions only past it.
TIE_TOLERANCE = 1e-3


def threshold_in_gap(values, quantile: float = 0.5, spread: float = 0.05) -> float:
  """A threshold near the `quantile` of `values` that no value sits near: the middle of the largest
  gap between neighbouring sorted values within +-`spread` (a share of the values) of that quantile.
  For benches and tests that compare the decisions of two paths (issue 23: a median threshold sat
  within rounding of a word's uncertainty, and batch 1 and batch 64 disagreed on it)."""
  v = np.sort(np.ravel(np.asarray(values, np.float64)))
  v = v[np.isfinite(v)]
  n = len(v)
  if n < 2:
    raise RomeFlaxError(f"threshold_in_gap needs at least 2 finite values, got {n}")
  lo = int(np.clip(math.floor((quantile - spread) * n) - 1, 0, n - 2))
  hi = int(np.clip(math.ceil((quantile + spread) * n), lo, n - 2))
  k = lo + int(np.argmax(v[lo + 1:hi + 2] - v[lo:hi + 1]))
  return float((v[k] + v[k + 1]) / 2)


def near_ties(values, threshold, tol: float = TIE_TOLERANCE) -> np.ndarray:
  """Which values lie within `tol` of their threshold (broadcast): decisions two paths may take
  differently by rounding alone."""
  return np.abs(np.asarray(values, np.float64) - np.asarray(threshold, np.float64)) <= tol


def near_tie_examples(policy: ExitPolicy, exit_logits_ExNxC, word_mask_NxW=None,
                      tol: float = TIE_TOLERANCE) -> np.ndarray:
  """[N] bool: examples with an exit before the last whose `score` lies within `tol` of that exit's
  threshold (entropy, maxprob; patience counts whole predictions: none). Compare two paths' decisions
  on the others."""
  N = np.shape(exit_logits_ExNxC)[1]
  if policy.criterion not in ("entropy", "maxprob"):
    return np.zeros(N, bool)
  words = None if word_mask_NxW is None else jnp.asarray(word_mask_NxW)
  s_ExN = np.stack([np.asarray(score(policy.criterion, jnp.asarray(z), words, policy.pool))
                    for z in exit_logits_ExNxC[:-1]]) if len(exit_logits_ExNxC) > 1 else np.zeros((0, N))
  t_Ex1 = np.asarray(policy.threshold_E)[:-1, None]
  near_ExN = near_ties(s_ExN, t_Ex1, tol)
  if policy.criterion == "entropy":
    near_ExN &= t_Ex1 > 0    # no entropy is below 0: a zero threshold never splits
  return near_ExN.any(0)


def step(policy: ExitPolicy, state: PolicyState, logits_BxC, i, word_mask_BxS=None):
  """Exit i has produced logits_BxC: returns (new state, exit_now_B). The last exit always exits.

  Token exits: logits [B,S,C] and word_mask_BxS (1 at each word's first piece): the sentence's
  words decide together (`score`: SENTEE). threshold_E may also be per example, [B, E] (the engine's
  per-request thresholds)."""
  threshold = policy.threshold_E[..., i]
  logits_BxC = logits_BxC.astype(jnp.float32)
  if policy.pool is not None and (word_mask_BxS is None or logits_BxC.ndim != 3):
    raise RomeFlaxError("a token-task policy needs token logits [B,S,C] and the word mask")
  if policy.criterion in ("entropy", "maxprob"):
    words = word_mask_BxS if policy.pool is not None else None
    confident_B = confident(policy.criterion, score(policy.criterion, logits_BxC, words, policy.pool), threshold)
  else:
    pred_B = heads.predictions(logits_BxC, policy.is_regression).astype(jnp.float32)
    if policy.is_regression:
      same_B = jnp.abs(pred_B - state.prev_B) < policy.delta
    else:
      same_B = pred_B == state.prev_B
    count_B = jnp.where(same_B, state.count_B + 1, 0)
    state = PolicyState(count_B=count_B, prev_B=pred_B)
    confident_B = count_B.astype(jnp.float32) >= threshold
  allowed = i + 1 >= policy.min_exit_layer
  exit_now_B = (confident_B & allowed) | (i == policy.num_exits - 1)
  return state, exit_now_B


def record_exit(exit_now_B, i, logits_BxC, done_B, exit_B, out_BxC):
  """The first-exit bookkeeping of every driver (offline scan, latency loop, engine steps, TOKEE's
  loop): units that exit now and had not exited keep exit i and its logits. Units are examples
  (exit_now_B [B], logits [B, C] or [B, S, C]) or words (TOKEE: [B, W] and [B, W, C]).
  Returns (done_B, exit_B, out_BxC)."""
  newly_B = exit_now_B & ~done_B
  exit_B = jnp.where(newly_B, i, exit_B)
  out_BxC = jnp.where(per_example(newly_B, out_BxC), logits_BxC.astype(jnp.float32), out_BxC)
  return done_B | exit_now_B, exit_B, out_BxC


class Decision(NamedTuple):
  exit_index_N: jax.Array  # int32, 0-based exit taken by each example
  logits_NxC: jax.Array    # float32, the logits of that exit ([N, W, C] for token exits)


def per_example(flag_B, like):
  """A per-unit flag ([B], or [B, W] for words) broadcast against per-unit values ([B, ...] logits of
  either head, [B, W, C] word logits)."""
  return flag_B.reshape(flag_B.shape + (1,) * (like.ndim - flag_B.ndim))


@jax.jit
def decide(policy: ExitPolicy, exit_logits_ExNxC, word_mask_NxW=None) -> Decision:
  """Offline: the exit each example takes, given every exit's logits (one all-exits pass).
  Token exits: logits [E,N,W,C] (word-level) and word_mask_NxW."""
  E, N = exit_logits_ExNxC.shape[:2]
  if E != policy.num_exits:
    raise RomeFlaxError(f"policy is for {policy.num_exits} exits, logits have {E}")

  def body(carry, xs):
    state, done_N, exit_N, out_NxC = carry
    logits_NxC, i = xs
    state, exit_now_N = policy.step(state, logits_NxC, i, word_mask_NxW)
    return (state, *record_exit(exit_now_N, i, logits_NxC, done_N, exit_N, out_NxC)), None

  init = (policy.init_state(jnp.ones((N,), bool)), jnp.zeros((N,), bool), jnp.zeros((N,), jnp.int32),
          jnp.zeros(exit_logits_ExNxC.shape[1:], jnp.float32))
  (_, _, exit_N, out_NxC), _ = jax.lax.scan(
      body, init, (exit_logits_ExNxC.astype(jnp.float32), jnp.arange(E, dtype=jnp.int32)))
  return Decision(exit_N, out_NxC)
