"""The TOKEE criterion and its layer (method-seqlab.md sections 3 and 7): each word stops at its own layer.

The criterion, defined once (`halt_step`): after layer l every word gets its normalised entropy
u = H(softmax(z)) / log C; a word that has not halted halts when the max of u over the words within
+-floor(w/2) of it (a window truncated at the sentence's edges) is below tau_l. By default
tau_l = tau in the lower half of the layers and 2 tau in the upper half (the reference's doubling;
`upper_scale`), and, as the reference does (section 7.1), halted words' uncertainties, recomputed at
each layer from their frozen states, still enter their neighbours' windows (`masked_window=True`
leaves them out). A halted word keeps the label of its exit; at the last layer every word exits.

Halting (`token_layer`, the one TOKEE layer body): a halted word's pieces (`copy_wordpiece='all'`, or
its first piece alone with 'first') stop updating. At every later layer they still serve as keys and
values for the active pieces, read as that layer's output LayerNorm applied to their frozen pre-LN
residual (`keep_norm_same`, the reference's default) or, with keep_norm_same=False, as their last output
unchanged. [CLS] / [SEP] never halt; a sentence stops when all its words have halted.

Both drivers use these: `token_exit.token_exit` (a closed batch, layer by layer) and the open engine
(`engine.token_step`: slots at different layers, a finished sentence's slot refilled at once). This
module imports neither, so each can import it.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from rome_flax.engine import exit_policy as ep
from rome_flax.errors import RomeFlaxError
from rome_flax.model import encoder as model_lib
from rome_flax.model.config import ModelConfig

COPY_WORDPIECE = ("all", "first")


@struct.dataclass
class TokenPolicy:
  threshold_L: jax.Array   # float32 [L]: tau_l of each layer (the last layer always halts everything)
  window: int = struct.field(pytree_node=False)
  num_layers: int = struct.field(pytree_node=False)
  masked_window: bool = struct.field(pytree_node=False, default=False)
  copy_wordpiece: str = struct.field(pytree_node=False, default="all")
  keep_norm_same: bool = struct.field(pytree_node=False, default=True)

  @property
  def num_exits(self) -> int:
    return self.num_layers

  def init_state(self, units_BxW):
    """`exit_policy.Policy.init_state`: which words have halted, [B, W]; padding words count as halted."""
    return ~jnp.asarray(units_BxW, bool)

  def step(self, halted_BxW, logits_BxWxC, i, units_BxW=None):
    """`exit_policy.Policy.step`: layer i produced the words' logits; returns (halted, halt_now) per
    word (`halt_step`). units_BxW: the real words."""
    now_BxW = halt_step(self, halted_BxW, logits_BxWxC, units_BxW, i)
    return halted_BxW | now_BxW, now_BxW

  def describe(self) -> str:
    tau = np.asarray(self.threshold_L)
    half = self.num_layers // 2
    shown = f"{float(tau[0]):.4g}" if np.all(tau[:half] == tau[0]) else "/".join(f"{float(t):.4g}" for t in tau)
    text = f"tokee,w={self.window},tau={shown}"
    if len(tau) > half and np.all(tau[:half] == tau[0]) and not np.isclose(tau[-1], 2 * tau[0]):
      text += f",upper={float(tau[-1]):.4g}"
    if self.masked_window:
      text += ",masked"
    if self.copy_wordpiece != "all":
      text += f",copy={self.copy_wordpiece}"
    if not self.keep_norm_same:
      text += ",no_norm"
    return text


def make_token_policy(threshold, window: int, num_layers: int, *, upper_scale: float = 2.0,
                      masked_window: bool = False, copy_wordpiece: str = "all",
                      keep_norm_same: bool = True) -> TokenPolicy:
  """A validated TOKEE policy: one tau (tau_l = tau in layers 1..L/2, upper_scale * tau above) or one
  per layer; an odd window w (each word looks at +-(w-1)/2 neighbours)."""
  if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 1 or window % 2 == 0:
    raise RomeFlaxError(f"the TOKEE window must be an odd whole number >= 1 (a word and (w-1)/2 neighbours each "
                        f"side), got {window}")
  if copy_wordpiece not in COPY_WORDPIECE:
    raise RomeFlaxError(f"copy_wordpiece must be one of {', '.join(COPY_WORDPIECE)}, got {copy_wordpiece!r}")
  if not (math.isfinite(upper_scale) and upper_scale > 0):
    raise RomeFlaxError(f"upper_scale must be a positive number, got {upper_scale}")
  values = np.atleast_1d(np.asarray(threshold, np.float64))
  if values.size == 0:
    raise RomeFlaxError("no TOKEE threshold given")
  if values.ndim != 1 or values.size not in (1, num_layers):
    raise RomeFlaxError(f"give one TOKEE threshold or one per layer ({num_layers}), got {values.size}")
  if not np.all(np.isfinite(values)) or np.any(values < 0):
    raise RomeFlaxError(f"TOKEE thresholds must be numbers >= 0, got {values.tolist()}")
  if values.size == 1:
    values = np.where(np.arange(num_layers) < num_layers // 2, values[0], upper_scale * values[0])
  return TokenPolicy(jnp.asarray(values, jnp.float32), int(window), num_layers, bool(masked_window),
                     copy_wordpiece, bool(keep_norm_same))


DEFAULT_WINDOW = 3   # a server's and an artefact's TOKEE window unless one is given


def serving_window(window, token_level_exit: bool, num_layers: int):
  """The TOKEE window of a server or an artefact (static: it shapes the compiled step): the one given, checked,
  or DEFAULT_WINDOW for a token task; None for a sentence task, which refuses one."""
  if not token_level_exit:
    if window is not None:
      raise RomeFlaxError(f"--window {window}: the window is TOKEE's (token-level early exit); this export labels "
                          "sentences")
    return None
  window = DEFAULT_WINDOW if window is None else window
  try:
    make_token_policy(1.0, window, num_layers)   # checks it (odd, >= 1)
  except RomeFlaxError as e:
    raise RomeFlaxError(f"--window {window}: {e}") from None
  return window


def parse_windows(text: str) -> list[int]:
  """'3,5,15' -> [3, 5, 15] (checked by `make_token_policy`)."""
  try:
    windows = [int(v) for v in str(text).split(",") if v.strip()]
  except ValueError:
    raise RomeFlaxError(f"window list {text!r} does not parse: use odd whole numbers, e.g. 3,5,15") from None
  if not windows:
    raise RomeFlaxError(f"empty window list {text!r}")
  return windows


# ----------------------------------------------------------------------------- the criterion


def word_uncertainty(logits_BxWxC) -> jax.Array:
  """u = H(softmax(z)) / log C per word (stable: from log_softmax)."""
  return ep.entropy(logits_BxWxC) / math.log(logits_BxWxC.shape[-1])


def window_max(u_BxW, valid_BxW, window: int) -> jax.Array:
  """max of u over words k with |k - j| <= window // 2 and valid (the sentence's edges truncate it)."""
  r = window // 2
  x_BxW = jnp.where(valid_BxW, u_BxW, -jnp.inf)
  W = x_BxW.shape[1]
  padded = jnp.pad(x_BxW, ((0, 0), (r, r)), constant_values=-jnp.inf)
  return functools.reduce(jnp.maximum, [padded[:, d:d + W] for d in range(2 * r + 1)])


def halt_step(policy: TokenPolicy, halted_BxW, logits_BxWxC, valid_BxW, i):
  """Layer i (0-based) has produced word logits: which words halt now. THE TOKEE decision, used by
  every path and (through `halt_on`) by self-sampling's simulation."""
  return halt_on(policy, halted_BxW, word_uncertainty(logits_BxWxC), valid_BxW, i)


def halt_on(policy: TokenPolicy, halted_BxW, u_BxW, valid_BxW, i):
  """`halt_step` from the words' uncertainties. threshold_L may also be per sentence, [B, L]."""
  counted_BxW = valid_BxW & ~halted_BxW if policy.masked_window else valid_BxW
  tau = policy.threshold_L[..., i]
  tau = tau[:, None] if tau.ndim == 1 else tau
  below_BxW = window_max(u_BxW, counted_BxW, policy.window) < tau
  return valid_BxW & ~halted_BxW & (below_BxW | (i == policy.num_layers - 1))


@jax.jit
def simulate(policy: TokenPolicy, u_LxNxW, valid_NxW):
  """Exit layer (0-based) of every word given every layer's word uncertainties, e.g. those of the
  frozen stage-1 model (self-sampling; a real run's states change after a halt, these do not).
  policy.threshold_L may be per sentence, [N, L]."""
  def body(carry, xs):
    halted, exit_ = carry
    u, i = xs
    now = halt_on(policy, halted, u, valid_NxW, i)
    return (halted | now, jnp.where(now, i, exit_)), None
  L = u_LxNxW.shape[0]
  init = (~valid_NxW, jnp.full(valid_NxW.shape, L - 1, jnp.int32))
  (_, exit_NxW), _ = jax.lax.scan(body, init, (u_LxNxW, jnp.arange(L)))
  return exit_NxW


def piece_words(word_mask_BxS, attention_mask_BxS) -> jax.Array:
  """Word index of each piece (the word it belongs to), -1 for [CLS], the closing special token and
  padding: pieces from a word's first piece up to the next word's belong to it."""
  S = word_mask_BxS.shape[1]
  length_B = attention_mask_BxS.sum(1)
  word_BxS = jnp.cumsum(word_mask_BxS, axis=1) - 1
  pos = jnp.arange(S)[None, :]
  inner = (pos > 0) & (pos < length_B[:, None] - 1)
  return jnp.where(inner, word_BxS, -1).astype(jnp.int32)


def word_positions(word_mask_BxS) -> jax.Array:
  """[B, S] positions of each sentence's words' first pieces, in order, then other positions."""
  return jnp.argsort(~(word_mask_BxS > 0), axis=1, stable=True).astype(jnp.int32)


def active_pieces(policy: TokenPolicy, halted_BxW, valid_BxW, valid_BxS, word_of_BxS, is_first_BxS):
  """Pieces that still update at the next layer, and which sentences are done (every word halted)."""
  done_B = jnp.all(halted_BxW | ~valid_BxW, axis=1)
  word_halted_BxS = jnp.take_along_axis(halted_BxW, jnp.maximum(word_of_BxS, 0), axis=1) & (word_of_BxS >= 0)
  if policy.copy_wordpiece == "first":
    word_halted_BxS = word_halted_BxS & is_first_BxS
  return valid_BxS & ~done_B[:, None] & ~word_halted_BxS, done_B


def buffer_sizes(total: int, smallest: int = 8, steps: int = 6) -> tuple[int, ...]:
  """Active-piece buffer sizes for a batch of `total` pieces: total, total/2, ... (at most `steps`,
  not below `smallest`). Fewer sizes compile faster; more waste less on padding slots."""
  sizes = {total}
  size = total
  for _ in range(steps - 1):
    size = -(-size // 2)
    if size < smallest:
      break
    sizes.add(size)
  return tuple(sorted(sizes))


def token_layer(prepared, cfg: ModelConfig, policy: TokenPolicy, k, h_BxSxD, mask_BxS, bias, p_BxSxD,
                active_BxS, query_rows_M=None):
  """Layer k (an int, or traced with stacked weights) + exit k under halting: (h, p, logits_BxSxC). Only
  active pieces update their pre-LN residual p; query_rows_M (flat indices of the active pieces in order,
  padded with B*S: at least as many as there are active pieces) computes queries, attention output and
  feed-forward for those rows alone, else every piece is computed and mixed (the plain form: same results)."""
  B, S = mask_BxS.shape
  if query_rows_M is None:
    p_new = model_lib.run_layer(prepared, cfg, k, h_BxSxD, bias, residual_out=True)
    p_BxSxD = jnp.where(active_BxS[..., None], p_new.astype(p_BxSxD.dtype), p_BxSxD)
  else:
    p_MxD = model_lib.run_layer(prepared, cfg, k, h_BxSxD, bias, query_rows_M=query_rows_M, residual_out=True)
    # Back to the pieces by a gather (each active piece's rank among the active ones), not a scatter
    # into [B*S, D]. With Q computed for every piece of a small batch (model.EncoderLayer), TOKEE at
    # batch 1 went from 779 to 575 ms on 96 CoNLL sentences (bench/token_exit.py, AMD EPYC, issue 23).
    rank_BxS = jnp.clip(jnp.cumsum(active_BxS.reshape(-1)) - 1, 0, query_rows_M.shape[0] - 1).reshape(B, S)
    p_BxSxD = jnp.where(active_BxS[..., None], p_MxD[rank_BxS].astype(p_BxSxD.dtype), p_BxSxD)
  normed = model_lib.output_norm(model_lib.layer_slice(prepared["layers"], k), cfg, p_BxSxD).astype(h_BxSxD.dtype)
  h_BxSxD = normed if policy.keep_norm_same else jnp.where(active_BxS[..., None], normed, h_BxSxD)
  return h_BxSxD, p_BxSxD, model_lib.run_exit(prepared, cfg, k, h_BxSxD, mask_BxS)


def token_layer_in_buffers(prepared, cfg: ModelConfig, policy: TokenPolicy, k, h_BxSxD, mask_BxS, bias,
                           p_BxSxD, active_BxS, buffers: tuple = ()):
  """`token_layer` that computes queries, attention output and feed-forward for the active pieces alone,
  gathered into the smallest of `buffers` (static sizes below B*S, picked by `lax.switch`) that holds them;
  when none does, or buffers=(), every piece is computed and mixed (the same results). Both TOKEE drivers
  run their layers through this: the closed batch's loop and the open engine's step."""
  B, S = mask_BxS.shape

  def branch(size):
    def layer(h_BxSxD, p_BxSxD, active_BxS):
      rows_M = None if size is None else jnp.nonzero(active_BxS.reshape(-1), size=size, fill_value=B * S)[0]
      return token_layer(prepared, cfg, policy, k, h_BxSxD, mask_BxS, bias, p_BxSxD, active_BxS, rows_M)
    return layer

  buffers = tuple(b for b in sorted(buffers) if b < B * S)
  if not buffers:
    return branch(None)(h_BxSxD, p_BxSxD, active_BxS)
  index = jnp.searchsorted(jnp.asarray(buffers), active_BxS.sum())   # len(buffers): every piece
  return jax.lax.switch(index, [branch(b) for b in buffers] + [branch(None)], h_BxSxD, p_BxSxD, active_BxS)
