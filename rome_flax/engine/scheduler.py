"""The open early-exit engine: a fixed set of slots on the device, new work admitted while it runs.

Every sentence-level early-exit path that batches examples runs here (issue 19): the closed chunk
of `infer.py --path throughput`, the admission pass over a dataset, and the server's step loop; and
TOKEE for the server (`token_step`, state from `init(..., tokee=True)`): a sentence whose words have
all halted frees its slot for the next one while the others run.
The engine is three pure, jitted functions over an `EngineState` of N slots:

  init(cfg, slots, seq)                     -> state        every slot free
  admit(params, cfg, state, slot_A, rows)   -> state        embeds A rows into the given free slots
  run(params, cfg, policy, state, ...)      -> state        steps until enough slots are free

and the step every one of them repeats (`step`): pick a layer l (the lowest layer with a full batch of
B waiting slots, else the lowest with any), gather up to B of its waiting slots (highest `priority`
first: the longest for a dataset pass, the oldest request for the server), run layer l + exit l on
that fixed-size batch cut to the length bucket of its longest example, apply the exit policy (with
each slot's own thresholds) and retire the slots that exit; they keep their results (`exit_N`,
`out_NxC`) until the host admits new work into them. Shapes never change, so each function compiles
once per (slots, length, batch) and nothing recompiles as work comes and goes.

The host owns the queue. It reads `running_N` after a `run` (one sync), collects the slots that
finished, and admits more rows into free slots; `evict` frees slots whose caller went away. The host
also knows how long its examples are: it admits rows cut to their own batch and length bucket, and runs
under a `view` (the bucket of the longest running example), so short requests in long slots pay for
their own length, not the slots'.
A closed chunk (`chunk`) is admit-everything-then-run-to-the-end, the same step in one `while_loop`.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from rome_flax.engine import exit_policy as ep
from rome_flax.engine import token_policy as tp
from rome_flax.engine.artefact_runtime import bucket
from rome_flax.kinds.data import BUCKETS
from rome_flax.kinds.kind import kind_of
from rome_flax.model import encoder as model_lib
from rome_flax.model.config import ModelConfig

NEVER = 2 ** 30   # `run(min_free=NEVER)`: run until no slot is running
QUERY_BUFFERS = 3   # a TOKEE step computes queries for its active pieces in b*s/4, b*s/2 or all b*s rows


class EngineState(NamedTuple):
  """N slots. A slot is free (running False) or runs one example through its layers."""
  h_NxSxD: jax.Array          # hidden state of each slot's example after its last layer run
  mask_NxS: jax.Array         # int32 attention mask
  length_N: jax.Array         # int32 pieces
  priority_N: jax.Array       # int32: among the slots waiting at a layer, the highest go first
  next_layer_N: jax.Array     # int32: the layer each slot runs next (0-based)
  running_N: jax.Array        # bool: holds an example that has not exited
  policy_state: ep.PolicyState
  threshold_NxE: jax.Array    # float32: each slot's thresholds (per-request policies)
  exit_N: jax.Array           # int32: 0-based exit taken (valid once a slot stops running)
  out_NxC: jax.Array          # float32 logits of that exit ([N, S, C] for token exits)
  runs: jax.Array             # int32 []: layer batches run since init
  words_NxS: Optional[jax.Array] = None   # int32 word mask (token exits, SENTEE) else None
  tokee: Optional["TokenSlots"] = None    # per-word halting (TOKEE) else None


class TokenSlots(NamedTuple):
  """What TOKEE keeps per slot besides `EngineState` (whose out_NxC then holds each word's exit logits,
  words first, [N, W=S, C], and exit_N the sentence's last layer)."""
  p_NxSxD: jax.Array          # float32 pre-LN residual of every piece (frozen once its word halts)
  halted_NxW: jax.Array       # bool: the word has halted (True past the sentence's words)
  word_exit_NxW: jax.Array    # int32 0-based exit layer of each word (-1: no word)
  queries_NxL: jax.Array      # int32 active pieces per layer (queries, attention output, FFN)
  keys_NxL: jax.Array         # int32 pieces per layer while the sentence ran (keys, values, exit head)


def logits_shape(cfg: ModelConfig, batch: int, seq: int) -> tuple:
  """Shape of a batch's logits at one exit: [B, C], or [B, S, C] for token exits."""
  return kind_of(cfg).logits_shape(batch, seq, cfg.num_labels)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def init(cfg: ModelConfig, slots: int, seq: int, tokee: bool = False) -> EngineState:
  """Every slot free. Hidden states in the model's compute dtype; `tokee` adds per-word halting state.
  (Jitted: every field its own buffer, which `admit` and `run` donate.)"""
  from rome_flax.model import layers
  zeros_N = jnp.zeros((slots,), jnp.int32)
  unit_axis = kind_of(cfg).unit_shape(seq)   # words: a per-piece word mask per slot (SENTEE pools words by it)
  token_slots = None
  if tokee:
    if not kind_of(cfg).token_level_exit:
      raise ValueError("TOKEE slots need a model with token exits")
    zeros_NxL = jnp.zeros((slots, cfg.num_layers), jnp.int32)
    token_slots = TokenSlots(jnp.zeros((slots, seq, cfg.hidden_size), jnp.float32), jnp.ones((slots, seq), bool),
                             jnp.full((slots, seq), -1, jnp.int32), zeros_NxL, zeros_NxL)
  return EngineState(
      h_NxSxD=jnp.zeros((slots, seq, cfg.hidden_size), layers.compute_dtype(cfg)),
      mask_NxS=jnp.zeros((slots, seq), jnp.int32), length_N=zeros_N, priority_N=zeros_N, next_layer_N=zeros_N,
      running_N=jnp.zeros((slots,), bool), policy_state=ep.init_state((slots,)),
      threshold_NxE=jnp.zeros((slots, cfg.num_exits), jnp.float32), exit_N=zeros_N,
      out_NxC=jnp.zeros(logits_shape(cfg, slots, seq), jnp.float32), runs=jnp.int32(0),
      words_NxS=jnp.zeros((slots,) + unit_axis, jnp.int32) if unit_axis else None, tokee=token_slots)


def _admit(prepared, cfg: ModelConfig, state: EngineState, slot_A, input_ids_AxS, attention_mask_AxS,
           token_type_ids_AxS, priority_A, threshold_AxE, word_mask_AxS=None) -> EngineState:
  """Rows into slots `slot_A` (N: a padding row, dropped). Rows may be shorter than the slots (s <= S):
  only their s positions are embedded, and the slots' positions past them are zeros. (A server admits a
  few short requests into long slots: the CoNLL-2003 export's 64 rows into 192-piece slots took 45 ms, most
  of it the embedding's LayerNorm over 64 x 192 positions; cut to 32 positions, 0.85 ms. AMD EPYC.)"""
  mask_Axs = jnp.asarray(attention_mask_AxS, jnp.int32)
  (A, s), S = mask_Axs.shape, state.mask_NxS.shape[1]
  if s > S:
    raise ValueError(f"rows of {s} positions do not fit slots of {S}")
  to_slot = lambda x: jnp.pad(x, ((0, 0), (0, S - s)) + ((0, 0),) * (x.ndim - 2))   # past the rows: zeros
  h_AxSxD = to_slot(model_lib.embed(prepared, cfg, input_ids_AxS, mask_Axs, token_type_ids_AxS))
  mask_AxS = to_slot(mask_Axs)
  word_mask_AxS = None if word_mask_AxS is None else to_slot(jnp.asarray(word_mask_AxS, jnp.int32))
  put = lambda buf, val: buf.at[slot_A].set(val, mode="drop")
  fresh = ep.init_state((A,))
  return state._replace(
      h_NxSxD=put(state.h_NxSxD, h_AxSxD.astype(state.h_NxSxD.dtype)), mask_NxS=put(state.mask_NxS, mask_AxS),
      length_N=put(state.length_N, mask_AxS.sum(1)), priority_N=put(state.priority_N, jnp.asarray(priority_A, jnp.int32)),
      next_layer_N=put(state.next_layer_N, jnp.zeros((A,), jnp.int32)),
      running_N=put(state.running_N, jnp.ones((A,), bool)),
      policy_state=jax.tree.map(put, state.policy_state, fresh),
      threshold_NxE=put(state.threshold_NxE, jnp.asarray(threshold_AxE, jnp.float32)),
      exit_N=put(state.exit_N, jnp.zeros((A,), jnp.int32)),
      out_NxC=put(state.out_NxC, jnp.zeros((A,) + state.out_NxC.shape[1:], jnp.float32)),
      words_NxS=None if state.words_NxS is None else put(state.words_NxS, jnp.asarray(word_mask_AxS, jnp.int32)),
      tokee=None if state.tokee is None else _admit_words(state.tokee, slot_A, h_AxSxD, word_mask_AxS, put))


def _admit_words(t: TokenSlots, slot_A, h_AxSxD, word_mask_AxS, put) -> TokenSlots:
  """TOKEE's per-slot state for admitted sentences: no word halted, the residual stream is the embedding."""
  word_mask_AxS = jnp.asarray(word_mask_AxS, jnp.int32)
  A, S = word_mask_AxS.shape
  valid_AxW = jnp.arange(S)[None, :] < word_mask_AxS.sum(1)[:, None]
  zeros_AxL = jnp.zeros((A,) + t.queries_NxL.shape[1:], jnp.int32)
  return TokenSlots(put(t.p_NxSxD, h_AxSxD.astype(jnp.float32)), put(t.halted_NxW, ~valid_AxW),
                    put(t.word_exit_NxW, jnp.full((A, S), -1, jnp.int32)), put(t.queries_NxL, zeros_AxL),
                    put(t.keys_NxL, zeros_AxL))


admit = jax.jit(_admit, static_argnames=("cfg",), donate_argnames=("state",))


@functools.partial(jax.jit, donate_argnames=("state",))
def evict(state: EngineState, slot_mask_N) -> EngineState:
  """Frees slots (a caller that went away or timed out): they stop running and take no more layers."""
  return state._replace(running_N=state.running_N & ~jnp.asarray(slot_mask_N, bool))


def trim_lengths(seq_len: int) -> tuple[int, ...]:
  """Lengths a gathered batch may be trimmed to inside slots of length seq_len: the buckets of
  `data.bucket_length`, the one bucketing rule of training and inference batches."""
  return tuple(sorted({min(b, seq_len) for b in BUCKETS} | {seq_len}))


PICKS = ("lowest", "oldest")


def pick_layer(counts_L, batch_size, fallback_layer=None):
  """The lowest layer with a full batch waiting, else the lowest layer with anything waiting ('lowest':
  the most batching, for a dataset pass) or `fallback_layer` ('oldest': the layer of the slot with the
  highest priority, so a server's oldest request is not held back while newer ones catch up)."""
  has_full = counts_L >= batch_size
  partial = jnp.argmax(counts_L > 0) if fallback_layer is None else fallback_layer
  return jnp.where(jnp.any(has_full), jnp.argmax(has_full), partial).astype(jnp.int32)


def layer_exit_trimmed(prepared, cfg: ModelConfig, l, h_BxSxD, mask_BxS, longest, lengths: tuple, count=None,
                       sizes: Optional[tuple] = None, carry: tuple = (), layer_fn=None):
  """Layer l + exit l on the batch cut to the shortest allowed length that holds its longest example
  and (given `count`, the real rows, which come first) to the smallest of `sizes` that holds them.

  Slots are as long as their longest possible example, but a gathered batch of shorter ones need not
  pay for that: `lax.switch` picks a branch per (length, size), and per layer too with per-layer
  weights and no `layer_fn`, like the full model's per-batch buckets. Positions and rows past the cut are padding, so the
  real rows' results are the same; rows past the cut come back as they went in (hidden state) or zeros
  (logits). A server's sizes are (1, 4) or (4, 16, 64) (`serving.run_tiers`): at low load a step runs 1
  or 4 rows, not 64. (Gathering only b x s inside each branch and scattering back there measured slower,
  AMD EPYC, MiniLM, 256 slots x 128: one example through 6 layers 113 -> 154 ms, 64 examples 450 -> 504
  ms: the slots' arrays are copied through the conditional.)

  layer_fn(params, k, h, mask, bias, *carry) -> (h, logits, *carry), layer k of params (layer l alone, taken
  once for every branch from either layout, `model.layer_alone`, and k = 0: one body for every layer, where a
  branch per layer compiled 6x the programs): another layer body on the same cuts (TOKEE's
  `token_policy.token_layer_in_buffers`), with `carry` extra [B, S, ...] arrays it reads and returns, cut
  and restored like h. Returns (h, logits, *carry).
  """
  B, S = h_BxSxD.shape[:2]
  sizes = tuple(sizes or (B,))
  k = jnp.minimum(jnp.searchsorted(jnp.asarray(lengths), longest), len(lengths) - 1)
  j = 0 if count is None else jnp.minimum(jnp.searchsorted(jnp.asarray(sizes), count), len(sizes) - 1)

  def cut(s, b, layer_exit):
    def branch(h_BxSxD, mask_BxS, *carry_BxS):
      m_bxs = mask_BxS[:b, :s]
      h_cut, logits_bxC, *carry_cut = layer_exit(h_BxSxD[:b, :s], m_bxs, model_lib.attention_bias(m_bxs),
                                                 *[c[:b, :s] for c in carry_BxS])
      pad = kind_of(cfg).batch_pad(B, S, b, s)
      if any(after for _, after in pad):   # logits back to the batch's shape (padding: zeros)
        logits_bxC = jnp.pad(logits_bxC, pad)
      restore = lambda full, part: full.at[:b, :s].set(part) if (s < S or b < B) else part
      return (restore(h_BxSxD, h_cut), logits_bxC, *[restore(c, x) for c, x in zip(carry_BxS, carry_cut)])
    return branch

  shapes = [(s, b) for s in lengths for b in sizes]
  index = k * len(sizes) + j
  operands = (h_BxSxD, mask_BxS, *carry)
  if model_lib.is_unstacked(prepared) and layer_fn is None:   # a branch per layer too: each reads its weights in place
    branches = [cut(s, b, body) for body in model_lib.layer_and_exit_branches(prepared, cfg) for s, b in shapes]
    return jax.lax.switch(l * len(shapes) + index, branches, *operands)
  plain = lambda params, layer, h, mask, bias: model_lib.layer_and_exit(params, cfg, layer, h, mask, bias)
  body = functools.partial(layer_fn or plain, model_lib.layer_alone(prepared, l), 0)
  return jax.lax.switch(index, [cut(s, b, body) for s, b in shapes], *operands)


def waiting_at(state: EngineState, l, batch_size: int):
  """Up to B slots waiting at layer l, highest priority first (ties: lower slot first); N fills the rest.

  A dataset pass gives each example its length as priority, so a batch groups similar lengths (for
  rows sorted longest first this is plain row order); the server gives older requests priority."""
  N = state.running_N.shape[0]
  waiting_N = state.running_N & (state.next_layer_N == l)
  slot_N = jnp.arange(N, dtype=jnp.int32)
  _, _, order_N = jax.lax.sort(((~waiting_N).astype(jnp.int32), -state.priority_N, slot_N), num_keys=3)
  idx_B = order_N[:batch_size]
  return jnp.where(waiting_N[idx_B], idx_B, N)


def _gather(state: EngineState, num_layers: int, batch_size: int, pick: str):
  """The step's choice: layer l, up to B slots waiting there (`idx_B`, N past the real ones), the same
  indices clipped for gathering (`safe_B`) and the longest example among them."""
  N = state.running_N.shape[0]
  counts_L = jnp.zeros((num_layers,), jnp.int32).at[jnp.minimum(state.next_layer_N, num_layers - 1)].add(
      state.running_N.astype(jnp.int32))
  oldest = None
  if pick == "oldest":
    top = jnp.argmax(jnp.where(state.running_N, state.priority_N, jnp.iinfo(jnp.int32).min))
    oldest = state.next_layer_N[top]
  l = pick_layer(counts_L, batch_size, oldest)
  idx_B = waiting_at(state, l, batch_size)
  safe_B = jnp.minimum(idx_B, N - 1)
  longest = jnp.max(jnp.where(idx_B < N, state.length_N[safe_B], 1))
  return l, idx_B, safe_B, longest


class _SlotRows(NamedTuple):
  """Reading and writing a step's gathered slots: per-slot fields whole, per-piece fields ([N, S, ...])
  cut to their first `view` positions (a step's longest trim length: `run`'s view)."""
  idx_B: jax.Array
  safe_B: jax.Array
  view: int

  def take(self, x):
    return x[self.safe_B]

  def take_pieces(self, x):
    return x[self.safe_B, :self.view]

  def put(self, buf, val):
    return buf.at[self.idx_B].set(val.astype(buf.dtype), mode="drop")

  def put_pieces(self, buf, val):
    return buf.at[self.idx_B, :self.view].set(val.astype(buf.dtype), mode="drop")


def step(prepared, cfg: ModelConfig, policy: ep.ExitPolicy, state: EngineState, batch_size: int,
         lengths: tuple, sizes: Optional[tuple] = None, pick: str = "lowest") -> EngineState:
  """One layer batch: pick a layer, gather its waiting slots, layer + exit, policy, retire the exited.
  Every running example fits in the first lengths[-1] positions of its slot, and only those are read."""
  N = state.running_N.shape[0]
  l, idx_B, safe_B, longest = _gather(state, cfg.num_layers, batch_size, pick)
  io = _SlotRows(idx_B, safe_B, lengths[-1])
  count = None if sizes is None else jnp.sum(idx_B < N)
  h_BxSxD, logits_BxC = layer_exit_trimmed(prepared, cfg, l, io.take_pieces(state.h_NxSxD),
                                           io.take_pieces(state.mask_NxS), longest, lengths, count, sizes)
  words_B = None if state.words_NxS is None else io.take_pieces(state.words_NxS)
  per_piece_out = len(logits_shape(cfg, 1, 1)) == 3   # token exits' logits [N, S, C]
  take_out, put_out = (io.take_pieces, io.put_pieces) if per_piece_out else (io.take, io.put)
  slot_policy = policy.replace(threshold_E=io.take(state.threshold_NxE))
  policy_B, exit_now_B = slot_policy.step(jax.tree.map(io.take, state.policy_state), logits_BxC, l, words_B)
  _, exit_B, out_BxC = ep.record_exit(exit_now_B, l, logits_BxC, jnp.zeros_like(exit_now_B), io.take(state.exit_N),
                                      take_out(state.out_NxC))
  return state._replace(
      h_NxSxD=io.put_pieces(state.h_NxSxD, h_BxSxD),
      next_layer_N=io.put(state.next_layer_N, jnp.full((batch_size,), l + 1, jnp.int32)),
      running_N=io.put(state.running_N, ~exit_now_B),
      policy_state=jax.tree.map(io.put, state.policy_state, policy_B),
      exit_N=io.put(state.exit_N, exit_B), out_NxC=put_out(state.out_NxC, out_BxC), runs=state.runs + 1)


def token_step(prepared, cfg: ModelConfig, policy: tp.TokenPolicy, state: EngineState, batch_size: int,
               lengths: tuple, sizes: Optional[tuple] = None, pick: str = "lowest") -> EngineState:
  """`step` for TOKEE: the gathered sentences run layer l with their halted words' pieces frozen, each
  word halts by the window rule with its slot's thresholds, and a sentence whose words have all halted
  frees its slot: token-level refill. Queries, attention output and feed-forward run for the active
  pieces alone, gathered into a quarter or half of the cut batch's pieces when they fit
  (`token_policy.token_layer_in_buffers`, `QUERY_BUFFERS`): computing every piece while any word of its
  sentence ran saved 1.13x FLOPs on CoNLL-2003 dev where the active pieces alone saved 1.80x (MiniLM
  joint_weighted, window 1, tau 0.05)."""
  N = state.running_N.shape[0]
  t = state.tokee
  l, idx_B, safe_B, longest = _gather(state, cfg.num_layers, batch_size, pick)
  io = _SlotRows(idx_B, safe_B, lengths[-1])
  count = None if sizes is None else jnp.sum(idx_B < N)
  mask_BxS, words_BxS, halted_BxW = (io.take_pieces(x) for x in (state.mask_NxS, state.words_NxS, t.halted_NxW))
  valid_BxW = jnp.arange(io.view)[None, :] < words_BxS.sum(1)[:, None]
  active_BxS, done_B = tp.active_pieces(policy, halted_BxW, valid_BxW, mask_BxS > 0,
                                        tp.piece_words(words_BxS, mask_BxS), words_BxS > 0)
  active_BxS = active_BxS & (idx_B < N)[:, None]   # padding rows (a copy of slot N-1) fill no query buffer

  def layer_fn(params, k, h, mask, bias, p, active):
    buffers = tp.buffer_sizes(mask.size, steps=QUERY_BUFFERS)   # per cut (b, s): static
    h, p, logits = tp.token_layer_in_buffers(params, cfg, policy, k, h, mask, bias, p, active, buffers)
    return h, logits, p, active

  h_BxSxD, logits_BxSxC, p_BxSxD, _ = layer_exit_trimmed(
      prepared, cfg, l, io.take_pieces(state.h_NxSxD), mask_BxS, longest, lengths, count, sizes,
      carry=(io.take_pieces(t.p_NxSxD), active_BxS), layer_fn=layer_fn)
  words_BxWxC = jnp.take_along_axis(logits_BxSxC.astype(jnp.float32), tp.word_positions(words_BxS)[..., None], axis=1)
  slot_policy = policy.replace(threshold_L=io.take(state.threshold_NxE))
  _, now_BxW = slot_policy.step(halted_BxW, words_BxWxC, l, valid_BxW)
  halted_BxW, word_exit_BxW, out_BxWxC = ep.record_exit(now_BxW, l, words_BxWxC, halted_BxW,
                                                         io.take_pieces(t.word_exit_NxW), io.take_pieces(state.out_NxC))
  finished_B = jnp.all(halted_BxW | ~valid_BxW, axis=1)
  tokee = TokenSlots(
      io.put_pieces(t.p_NxSxD, p_BxSxD), io.put_pieces(t.halted_NxW, halted_BxW),
      io.put_pieces(t.word_exit_NxW, word_exit_BxW),
      io.put(t.queries_NxL, io.take(t.queries_NxL).at[:, l].set(active_BxS.sum(1).astype(jnp.int32))),
      io.put(t.keys_NxL, io.take(t.keys_NxL).at[:, l].set(jnp.where(done_B, 0, mask_BxS.sum(1)).astype(jnp.int32))))
  return state._replace(
      h_NxSxD=io.put_pieces(state.h_NxSxD, h_BxSxD),
      next_layer_N=io.put(state.next_layer_N, jnp.full((batch_size,), l + 1, jnp.int32)),
      running_N=io.put(state.running_N, ~finished_B), exit_N=io.put(state.exit_N, jnp.full((batch_size,), l, jnp.int32)),
      out_NxC=io.put_pieces(state.out_NxC, out_BxWxC),
      runs=state.runs + 1, tokee=tokee)


def _run(prepared, cfg: ModelConfig, policy, state: EngineState, batch_size: int,
         lengths: Optional[tuple] = None, min_free=NEVER, max_steps=NEVER, sizes: Optional[tuple] = None,
         pick: str = "lowest", view: Optional[int] = None) -> EngineState:
  """Steps while a slot runs, fewer than `min_free` slots are free and fewer than `max_steps` ran.
  policy: an `exit_policy.ExitPolicy` (a sentence's exit) or a `token_policy.TokenPolicy` (TOKEE: the
  state from `init(..., tokee=True)`).
  `sizes`: batch sizes a step may cut its batch to (`layer_exit_trimmed`; default: batch_size only);
  `pick`: the layer rule when no layer has a full batch (`pick_layer`).
  `view` (one of `lengths`, static): the caller's promise that every running example fits in the slots'
  first `view` positions; each step then reads, runs and writes back those alone (`view_for`). A server's
  slots are as long as its longest request may be, its requests mostly short: the CoNLL-2003 export's
  192-piece slots, one sentence of ~18 pieces at a time, admitted at its own length either way: TOKEE
  78.6 -> 22.6 ms a request in process (AMD EPYC). Inside the view a step still cuts its batch to the
  batch's own bucket (`layer_exit_trimmed`): under load some running sentence is long, and the others'
  batches need not pay for it."""
  S = state.mask_NxS.shape[1]
  lengths = tuple(lengths or trim_lengths(S))
  sizes = None if sizes is None else tuple(sorted(set(sizes) | {batch_size}))
  if view is not None:
    if view not in lengths:
      raise ValueError(f"view {view} is not one of the trim lengths {lengths}")
    lengths = tuple(x for x in lengths if x <= view)

  def cond(carry):
    steps, state = carry
    free = jnp.sum(~state.running_N)
    return jnp.any(state.running_N) & (free < min_free) & (steps < max_steps)

  one_step = token_step if isinstance(policy, tp.TokenPolicy) else step

  def body(carry):
    steps, state = carry
    return steps + 1, one_step(prepared, cfg, policy, state, batch_size, lengths, sizes, pick)

  return jax.lax.while_loop(cond, body, (jnp.int32(0), state))[1]


def view_for(lengths: tuple, longest: int) -> int:
  """`run`'s view for examples of at most `longest` pieces: the shortest trim length holding them."""
  return bucket(lengths, longest) or lengths[-1]


run = jax.jit(_run, static_argnames=("cfg", "batch_size", "lengths", "sizes", "pick", "view"),
              donate_argnames=("state",))


class ExitResult(NamedTuple):
  logits_BxC: jax.Array     # float32 logits of the exit each example took ([B, S, C] for token exits)
  exit_index_B: jax.Array   # int32, 0-based exit taken
  layer_runs: jax.Array     # int32 []: layer applications on a batch (latency: layers run; throughput: batches)


@functools.partial(jax.jit, static_argnames=("cfg", "batch_size", "lengths"))
def chunk(prepared, cfg: ModelConfig, policy: ep.ExitPolicy, input_ids_NxS, attention_mask_NxS,
          token_type_ids_NxS, valid_N, batch_size: int, lengths: Optional[tuple] = None,
          word_mask_NxS=None) -> ExitResult:
  """A closed chunk: N examples into N slots (rows with valid_N False stay free), run until all exit.

  Priority is length, so batches group similar lengths; for rows sorted longest first (what
  `inference.plan` gives) that is plain row order. Returns per-example logits and exits and, as
  layer_runs, the number of layer batches that ran."""
  mask_NxS = jnp.asarray(attention_mask_NxS, jnp.int32)
  N, S = mask_NxS.shape
  state = init(cfg, N, S)
  slot_N = jnp.where(jnp.asarray(valid_N, bool), jnp.arange(N, dtype=jnp.int32), N)
  threshold_NxE = jnp.broadcast_to(policy.threshold_E, (N, cfg.num_exits))
  state = _admit(prepared, cfg, state, slot_N, input_ids_NxS, mask_NxS, token_type_ids_NxS, mask_NxS.sum(1),
                 threshold_NxE, word_mask_NxS)
  state = _run(prepared, cfg, policy, state, batch_size, lengths)
  return ExitResult(state.out_NxC, state.exit_N, state.runs)
