"""Token-level early exit (TOKEE, method-seqlab.md sections 3 and 7): each word stops at its own layer.

The criterion, defined once (`halt_step`): after layer l every word gets its normalised entropy
u = H(softmax(z)) / log C; a word that has not halted halts when the max of u over the words within
+-floor(w/2) of it (a window truncated at the sentence's edges) is below tau_l. By default
tau_l = tau in the lower half of the layers and 2 tau in the upper half (the reference's doubling;
`upper_scale`), and, as the reference does (section 7.1), halted words' uncertainties, recomputed at
each layer from their frozen states, still enter their neighbours' windows (`masked_window=True`
leaves them out). A halted word keeps the label of its exit; at the last layer every word exits.

Halting: a halted word's pieces (`copy_wordpiece='all'`, or its first piece alone with 'first') stop
updating. At every later layer they still serve as keys and values for the active pieces, read as
that layer's output LayerNorm applied to their frozen pre-LN residual (`keep_norm_same`, the
reference's default) or, with keep_norm_same=False, as their last output unchanged. [CLS] / [SEP]
never halt; a sentence stops when all its words have halted.

One jitted loop serves every batch size (`token_exit`): a `lax.while_loop` over layers that stops
when every word of every sentence has halted. Each iteration computes keys and values for every
piece, but queries, attention output and feed-forward only for the active pieces, gathered across
the batch into a fixed-size buffer: the smallest of a few sizes (`buffer_sizes`) that holds them,
picked by `lax.switch`, so shapes are static and nothing recompiles. At batch 1 this is the latency
path, at batch 64 the throughput path. `gather=False` computes every piece and mixes (the plain
form of the same semantics: the reference's stage-2 forward, and what tests compare against).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from rome_flax import data, inference
from rome_flax import exit_policy as ep
from rome_flax import model as model_lib
from rome_flax.config import ModelConfig
from rome_flax.errors import RomeFlaxError

COPY_WORDPIECE = ("all", "first")


@struct.dataclass
class TokenPolicy:
  threshold_L: jax.Array   # float32 [L]: tau_l of each layer (the last layer always halts everything)
  window: int = struct.field(pytree_node=False)
  num_layers: int = struct.field(pytree_node=False)
  masked_window: bool = struct.field(pytree_node=False, default=False)
  copy_wordpiece: str = struct.field(pytree_node=False, default="all")
  keep_norm_same: bool = struct.field(pytree_node=False, default=True)

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


# ----------------------------------------------------------------------------- the device loop


class TokenExitResult(NamedTuple):
  word_logits_BxWxC: jax.Array   # float32 logits of each word's exit (W = S slots, words first)
  word_exit_BxW: jax.Array       # int32 0-based exit layer of each word (-1: no word)
  queries_BxL: jax.Array         # int32 active pieces per sentence and layer (queries, attention output, FFN)
  keys_BxL: jax.Array            # int32 pieces per sentence and layer while it runs (keys and values, exit head)
  layers_run: jax.Array          # int32 []


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


@functools.partial(jax.jit, static_argnames=("cfg", "gather", "sizes"))
def token_exit(prepared, cfg: ModelConfig, policy: TokenPolicy, input_ids_BxS, attention_mask_BxS,
               token_type_ids_BxS, word_mask_BxS, gather: bool = True,
               sizes: Optional[tuple] = None) -> TokenExitResult:
  """TOKEE over a batch of sentences; stops when every word of every sentence has halted."""
  mask_BxS = jnp.asarray(attention_mask_BxS, jnp.int32)
  word_mask_BxS = jnp.asarray(word_mask_BxS, jnp.int32)
  B, S = mask_BxS.shape
  L, C = cfg.num_layers, cfg.num_labels
  sizes = tuple(sizes or buffer_sizes(B * S))
  h_BxSxD = model_lib.embed(prepared, cfg, input_ids_BxS, mask_BxS, token_type_ids_BxS)
  bias = model_lib.attention_bias(mask_BxS)
  valid_BxS = mask_BxS > 0
  pos_BxW = word_positions(word_mask_BxS)                 # W = S word slots
  valid_BxW = jnp.arange(S)[None, :] < word_mask_BxS.sum(1)[:, None]
  word_of_BxS = piece_words(word_mask_BxS, mask_BxS)
  is_first_BxS = word_mask_BxS > 0

  def active_pieces(halted_BxW):
    done_B = jnp.all(halted_BxW | ~valid_BxW, axis=1)
    word_halted_BxS = jnp.take_along_axis(halted_BxW, jnp.maximum(word_of_BxS, 0), axis=1) & (word_of_BxS >= 0)
    if policy.copy_wordpiece == "first":
      word_halted_BxS = word_halted_BxS & is_first_BxS
    return valid_BxS & ~done_B[:, None] & ~word_halted_BxS, done_B

  def layer_branch(k, size):
    """Layer k on the active pieces (the first `size` of them; size None: every piece, mixed)."""
    def branch(h_BxSxD, p_BxSxD, active_BxS):
      if size is None:
        p_new = model_lib.run_layer(prepared, cfg, k, h_BxSxD, bias, residual_out=True)
        p_BxSxD = jnp.where(active_BxS[..., None], p_new.astype(p_BxSxD.dtype), p_BxSxD)
      else:
        (rows_M,) = jnp.nonzero(active_BxS.reshape(-1), size=size, fill_value=B * S)
        p_MxD = model_lib.run_layer(prepared, cfg, k, h_BxSxD, bias, query_rows_M=rows_M, residual_out=True)
        p_BxSxD = p_BxSxD.reshape(B * S, -1).at[rows_M].set(p_MxD.astype(p_BxSxD.dtype), mode="drop").reshape(
            p_BxSxD.shape)
      layer_k = model_lib.layer_slice(prepared["layers"], k)
      normed = model_lib.output_norm(layer_k, cfg, p_BxSxD).astype(h_BxSxD.dtype)
      h_BxSxD = normed if policy.keep_norm_same else jnp.where(active_BxS[..., None], normed, h_BxSxD)
      logits_BxSxC = model_lib.run_exit(prepared, cfg, k, h_BxSxD, mask_BxS)
      return h_BxSxD, p_BxSxD, logits_BxSxC
    return branch

  if gather:
    branches = [layer_branch(k, size) for k in range(L) for size in sizes]
  else:
    branches = [layer_branch(k, None) for k in range(L)]

  def cond(carry):
    i, *_, halted_BxW, _, _, _, _ = carry
    return (i < L) & ~jnp.all(halted_BxW | ~valid_BxW)

  def body(carry):
    i, h_BxSxD, p_BxSxD, halted_BxW, exit_BxW, out_BxWxC, q_BxL, kv_BxL = carry
    active_BxS, done_B = active_pieces(halted_BxW)
    n_active = active_BxS.sum()
    if gather:
      slot = jnp.minimum(jnp.searchsorted(jnp.asarray(sizes), n_active), len(sizes) - 1)
      index = i * len(sizes) + slot
    else:
      index = i
    h_BxSxD, p_BxSxD, logits_BxSxC = jax.lax.switch(index, branches, h_BxSxD, p_BxSxD, active_BxS)
    words_BxWxC = jnp.take_along_axis(logits_BxSxC.astype(jnp.float32), pos_BxW[..., None], axis=1)
    now_BxW = halt_step(policy, halted_BxW, words_BxWxC, valid_BxW, i)
    exit_BxW = jnp.where(now_BxW, i, exit_BxW)
    out_BxWxC = jnp.where(now_BxW[..., None], words_BxWxC, out_BxWxC)
    q_BxL = q_BxL.at[:, i].set(active_BxS.sum(1).astype(jnp.int32))
    kv_BxL = kv_BxL.at[:, i].set(jnp.where(done_B, 0, mask_BxS.sum(1)).astype(jnp.int32))
    return i + 1, h_BxSxD, p_BxSxD, halted_BxW | now_BxW, exit_BxW, out_BxWxC, q_BxL, kv_BxL

  zeros_BxL = jnp.zeros((B, L), jnp.int32)
  init = (jnp.int32(0), h_BxSxD, h_BxSxD.astype(jnp.float32), ~valid_BxW, jnp.full((B, S), -1, jnp.int32),
          jnp.zeros((B, S, C), jnp.float32), zeros_BxL, zeros_BxL)
  layers_run, _, _, _, exit_BxW, out_BxWxC, q_BxL, kv_BxL = jax.lax.while_loop(cond, body, init)
  return TokenExitResult(out_BxWxC, exit_BxW, q_BxL, kv_BxL, layers_run)


# ----------------------------------------------------------------------------- FLOPs


def piece_layer_flops(cfg: ModelConfig, queries, keys) -> np.ndarray:
  """FLOPs (multiply-adds x 2) of one layer of a sentence with `queries` active pieces among `keys`
  pieces, all heads: Q, attention output and FFN for active pieces; K and V for every piece; scores
  and context of active queries over all keys; the exit head on every piece (it runs on all)."""
  q, kv = np.asarray(queries, np.float64), np.asarray(keys, np.float64)
  D, F, C = cfg.hidden_size, cfg.intermediate_size, cfg.num_labels
  return 2.0 * q * (2 * D * D + 2 * D * F) + 2.0 * kv * 2 * D * D + 4.0 * q * kv * D + 2.0 * kv * D * C


def flops_ratio(cfg: ModelConfig, queries_NxL, keys_NxL, lengths_N) -> float:
  """Full model (every layer on every piece, one exit head) / TOKEE (what ran), over a dataset."""
  s = np.asarray(lengths_N, np.float64)
  D, C = cfg.hidden_size, cfg.num_labels
  full = cfg.num_layers * (piece_layer_flops(cfg, s, s) - 2.0 * s * D * C) + 2.0 * s * D * C
  return float(full.sum() / piece_layer_flops(cfg, queries_NxL, keys_NxL).sum())


# ----------------------------------------------------------------------------- over a dataset


class TokenRun(NamedTuple):
  word_logits: np.ndarray   # [N, W, C] logits of each word's exit
  word_exits: np.ndarray    # [N, W] 0-based exit layer (-1 past a sentence's words)
  queries: np.ndarray       # [N, L]
  keys: np.ndarray          # [N, L]


class TokenPass(inference.Pass):
  """TOKEE over a dataset in batches (`inference.Pass`: timed by `speed.compare`)."""

  def collect(self, outputs: list) -> TokenRun:
    N, W, L, C = self.num_examples, self.num_words, self.cfg.num_layers, self.cfg.num_labels
    logits, exits = np.zeros((N, W, C), np.float32), np.full((N, W), -1, np.int32)
    queries, keys = np.zeros((N, L), np.int64), np.zeros((N, L), np.int64)
    for piece, out in zip(self.pieces, outputs):
      rows = piece["example_ids"]
      keep = rows >= 0
      w = min(W, out.word_exit_BxW.shape[1])
      logits[rows[keep], :w] = np.asarray(out.word_logits_BxWxC)[keep, :w]
      exits[rows[keep], :w] = np.asarray(out.word_exit_BxW)[keep, :w]
      queries[rows[keep]] = np.asarray(out.queries_BxL)[keep]
      keys[rows[keep]] = np.asarray(out.keys_BxL)[keep]
    return TokenRun(logits, exits, queries, keys)


def token_pass(prepared, cfg: ModelConfig, policy: TokenPolicy, encoded: data.EncodedSplit, batch_size: int,
               gather: bool = True) -> TokenPass:
  """TOKEE over a dataset at a batch size (1: the latency path; 64: the throughput path)."""
  if not encoded.is_token_task or not cfg.is_token_task:
    raise RomeFlaxError("token-level early exit (TOKEE) is for token tasks (sequence labelling)")
  if policy.num_layers != cfg.num_layers:
    raise RomeFlaxError(f"the TOKEE policy is for {policy.num_layers} layers, the model has {cfg.num_layers}")

  def fn(p):
    arrays = [jnp.asarray(p[k]) for k in ("input_ids", "attention_mask", "token_type_ids", "word_mask")]
    return token_exit(prepared, cfg, policy, *arrays, gather=gather)

  return TokenPass(inference.plan(encoded, batch_size), fn, len(encoded), cfg, encoded.max_words)


class TagPrediction(NamedTuple):
  tags: list            # per sentence, its words' tag names
  exit_layers: list     # per sentence, each word's 1-based exit layer


def predict_tags(model, sentences: Sequence[Sequence[str]], policy, *, batch_size: int = 64,
                 max_length: Optional[int] = None) -> TagPrediction:
  """Early-exit tags for sentences given as word lists, with a token-task `MultiExitBert` (its
  tokenizer and tag set) and either a TOKEE `TokenPolicy` (each word its own layer) or a SENTEE
  `exit_policy.ExitPolicy` (each sentence one layer; the throughput path)."""
  cfg, names = model.config, model.export_info.label_names
  if not cfg.is_token_task:
    raise RomeFlaxError("predict_tags needs a model with token exits (sequence labelling)")
  if not names:
    raise RomeFlaxError("the model does not list its tag set: use a train.py export of a token task")
  sentences = [list(map(str, s)) for s in sentences]
  if not sentences or any(not s for s in sentences):
    raise RomeFlaxError("give at least one sentence, each with at least one word")
  max_length = max_length or model.export_info.max_length or 512
  encoded = data.encode_token_split(model.tokenizer, sentences, None, max_length)
  prepared = model_lib.unstack_layers(model.params)
  if isinstance(policy, TokenPolicy):
    run = token_pass(prepared, cfg, policy, encoded, batch_size).run()
    logits, layers = run.word_logits, run.word_exits + 1
  else:
    res = inference.throughput_pass(prepared, cfg, policy, encoded, batch_size).run()
    logits, layers = res.logits_NxC, np.repeat(res.exit_index_N[:, None] + 1, encoded.max_words, 1)
  ids = logits.argmax(-1)
  return TagPrediction([[names[t] for t in ids[i, :len(s)]] for i, s in enumerate(sentences)],
                       [layers[i, :len(s)].tolist() for i, s in enumerate(sentences)])
