"""Early exit that really saves time: a latency path and a throughput path, plus the full-model baseline.

Latency path (`latency_exit`): one jitted `lax.while_loop` over layers. Iteration i runs layer i and
exit i on the whole batch, asks the policy which examples exit, and stops as soon as every example
has exited; each example keeps the first exit it took. At batch size 1 this is classic early exit,
with no host round trip per layer and no re-tracing per input (the layer index is traced).

Throughput path (`throughput_chunk`): at batch size > 1 the latency path waits for the slowest
example. Here a chunk of N examples lives on the device as a buffer of hidden states [N,S,D] with,
per example, the next layer to run, the criterion state and a done flag. Each `lax.while_loop`
iteration picks a layer l (the lowest layer with a full batch of waiting examples, else the lowest
layer with any), gathers up to B of its waiting examples, runs layer l + exit l on that fixed-size
batch (cut to the length bucket of its longest example), scatters the results back and retires the
examples that exit. Shapes never change, so nothing recompiles, and an exited example costs
nothing more. At most one partial batch per layer per chunk; the host streams chunks.

Every path runs the model's one unit of work (`model.layer_and_exit`): the full model and the
all-exits pass are `model.forward`, the loops call `model.layer_and_exit_at` with a traced layer.

Layer dispatch. `prepare_params(..., dispatch='switch')` (default) puts the parameters in the
per-layer layout (`model.unstack_layers`), and `model.layer_and_exit_at` picks layer i with
`lax.switch` over static branches, so weights are read in place; `dispatch='slice'` keeps the
stacked layout and indexes it with the traced i, which copies the layer's weights each iteration. Measured on CPU with MiniLM at batch 1 (6 layers,
32 tokens, no exit taken): full model 7.9 ms, switch loop 8.4 ms, slice loop 9.5 ms; a full model
that slices stacked weights with static indices took 21.9 ms, so the baseline here also runs on
unstacked weights. bench/early_exit.py --dispatch slice compares the two loops end to end.

All paths call `exit_policy.step`, so they take exactly the decisions that
`exit_policy.decide` takes on an all-exits pass (tests/test_early_exit.py checks it).

Token exits (sequence labelling): the same paths with a word mask [B,S] (1 at each word's first
piece); a sentence is one example and exits as a whole (SENTEE), its logits [S,C] per example.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp

from rome_flax import exit_policy as ep
from rome_flax import model as model_lib
from rome_flax.config import ModelConfig
from rome_flax.data import BUCKETS
from rome_flax.errors import RomeFlaxError

DISPATCHES = ("switch", "slice")


def prepare_params(params: dict, dispatch: str = "switch") -> dict:
  """Parameters laid out for a dispatch mode ('switch': the per-layer layout; 'slice': stacked)."""
  if dispatch not in DISPATCHES:
    raise RomeFlaxError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}")
  return model_lib.stack_layers(params) if dispatch == "slice" else model_lib.unstack_layers(params)


# ----------------------------------------------------------------------------- jitted paths


def example_logits_shape(cfg: ModelConfig, batch: int, seq: int) -> tuple:
  """Shape of a batch's logits at one exit: [B, C], or [B, S, C] for token exits."""
  return (batch, seq, cfg.num_labels) if cfg.is_token_task else (batch, cfg.num_labels)


class ExitResult(NamedTuple):
  logits_BxC: jax.Array     # float32 logits of the exit each example took ([B, S, C] for token exits)
  exit_index_B: jax.Array   # int32, 0-based exit taken
  layer_runs: jax.Array     # int32 []: layer applications on a batch (latency: layers run; throughput: batches)


@functools.partial(jax.jit, static_argnames=("cfg",))
def full_model(prepared, cfg: ModelConfig, input_ids_BxS, attention_mask_BxS, token_type_ids_BxS):
  """Baseline: every layer, final exit only (no highway heads computed). Returns logits [B,C]."""
  return model_lib.forward(prepared, cfg, input_ids_BxS, attention_mask_BxS, token_type_ids_BxS,
                           exits=(cfg.num_layers - 1,)).exit_logits[0]


@functools.partial(jax.jit, static_argnames=("cfg",))
def all_exits(prepared, cfg: ModelConfig, input_ids_BxS, attention_mask_BxS, token_type_ids_BxS):
  """Every exit's logits [E,B,C] in one pass (what the offline sweep caches)."""
  return model_lib.forward(prepared, cfg, input_ids_BxS, attention_mask_BxS, token_type_ids_BxS).exit_logits


@functools.partial(jax.jit, static_argnames=("cfg",))
def latency_exit(prepared, cfg: ModelConfig, policy: ep.ExitPolicy, input_ids_BxS, attention_mask_BxS,
                 token_type_ids_BxS, word_mask_BxS=None) -> ExitResult:
  """Runs layers until every example of the batch has exited; each keeps its first exit."""
  mask_BxS = jnp.asarray(attention_mask_BxS, jnp.int32)
  B, S = mask_BxS.shape
  h_BxSxD = model_lib.embed(prepared, cfg, input_ids_BxS, mask_BxS, token_type_ids_BxS)
  bias = model_lib.attention_bias(mask_BxS)

  def cond(carry):
    i, _, _, done_B, _, _ = carry
    return (i < cfg.num_layers) & ~jnp.all(done_B)

  def body(carry):
    i, h_BxSxD, state, done_B, exit_B, out_BxC = carry
    h_BxSxD, logits_BxC = model_lib.layer_and_exit_at(prepared, cfg, i, h_BxSxD, mask_BxS, bias)
    state, exit_now_B = ep.step(policy, state, logits_BxC, i, word_mask_BxS)
    newly_B = exit_now_B & ~done_B
    exit_B = jnp.where(newly_B, i, exit_B)
    out_BxC = jnp.where(ep.per_example(newly_B, out_BxC), logits_BxC.astype(jnp.float32), out_BxC)
    return i + 1, h_BxSxD, state, done_B | exit_now_B, exit_B, out_BxC

  init = (jnp.int32(0), h_BxSxD, ep.init_state((B,)), jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32),
          jnp.zeros(example_logits_shape(cfg, B, S), jnp.float32))
  layers_run, _, _, _, exit_B, out_BxC = jax.lax.while_loop(cond, body, init)
  return ExitResult(out_BxC, exit_B, layers_run)


def _pick_layer(counts_L, batch_size):
  """The lowest layer with a full batch waiting, else the lowest layer with anything waiting."""
  has_full = counts_L >= batch_size
  return jnp.where(jnp.any(has_full), jnp.argmax(has_full), jnp.argmax(counts_L > 0)).astype(jnp.int32)


def trim_lengths(seq_len: int) -> tuple[int, ...]:
  """Lengths a gathered batch may be trimmed to inside a chunk padded to seq_len: the buckets of
  `data.bucket_length`, the one bucketing rule of training and inference batches."""
  return tuple(sorted({min(b, seq_len) for b in BUCKETS} | {seq_len}))


def _layer_exit_trimmed(prepared, cfg: ModelConfig, l, h_BxSxD, mask_BxS, longest, lengths: tuple):
  """Layer l + exit l on the batch cut to the shortest allowed length that holds its longest example.

  A chunk is padded to its longest example, but a gathered batch of shorter ones need not pay for
  that: `lax.switch` picks a branch per (layer, length), like the full model's per-batch buckets.
  Positions past the cut are padding for every example of the batch, so the result is the same.
  """
  S = h_BxSxD.shape[1]
  k = jnp.minimum(jnp.searchsorted(jnp.asarray(lengths), longest), len(lengths) - 1)

  def cut(s, layer_exit):
    def branch(h_BxSxD, mask_BxS):
      m_BxS = mask_BxS[:, :s]
      h_cut, logits_BxC = layer_exit(h_BxSxD[:, :s], m_BxS, model_lib.attention_bias(m_BxS))
      if cfg.is_token_task and s < S:   # token logits back to the chunk's length (padding: zeros)
        logits_BxC = jnp.pad(logits_BxC, ((0, 0), (0, S - s), (0, 0)))
      return (h_BxSxD.at[:, :s].set(h_cut) if s < S else h_cut), logits_BxC
    return branch

  if model_lib.is_unstacked(prepared):
    branches = [cut(s, layer_exit) for layer_exit in model_lib.layer_and_exit_branches(prepared, cfg)
                for s in lengths]
    return jax.lax.switch(l * len(lengths) + k, branches, h_BxSxD, mask_BxS)
  layer_exit = functools.partial(model_lib.layer_and_exit_at, prepared, cfg, l)
  return jax.lax.switch(k, [cut(s, layer_exit) for s in lengths], h_BxSxD, mask_BxS)


@functools.partial(jax.jit, static_argnames=("cfg", "batch_size", "lengths"))
def throughput_chunk(prepared, cfg: ModelConfig, policy: ep.ExitPolicy, input_ids_NxS, attention_mask_NxS,
                     token_type_ids_NxS, valid_N, batch_size: int, lengths: Optional[tuple] = None,
                     word_mask_NxS=None) -> ExitResult:
  """Early exit over a chunk of N examples, running one layer at a time on B waiting examples.

  `valid_N` marks padding rows (False), which are never run. Waiting examples are gathered in row
  order, so a chunk sorted by length batches similar lengths together, and each batch is trimmed
  to one of `lengths` (default: trim_lengths(S)). Returns per-example logits and exits and, as
  layer_runs, the number of layer batches that ran.
  """
  mask_NxS = jnp.asarray(attention_mask_NxS, jnp.int32)
  N, S = mask_NxS.shape
  L = cfg.num_layers
  lengths = tuple(lengths or trim_lengths(S))
  length_N = mask_NxS.sum(axis=1)
  h_NxSxD = model_lib.embed(prepared, cfg, input_ids_NxS, mask_NxS, token_type_ids_NxS)

  def cond(carry):
    return ~jnp.all(carry[3])

  def body(carry):
    runs, h_NxSxD, next_layer_N, done_N, state_N, exit_N, out_NxC = carry
    waiting_N = ~done_N
    counts_L = jnp.zeros((L,), jnp.int32).at[jnp.minimum(next_layer_N, L - 1)].add(waiting_N.astype(jnp.int32))
    l = _pick_layer(counts_L, batch_size)
    (idx_B,) = jnp.nonzero(waiting_N & (next_layer_N == l), size=batch_size, fill_value=N)
    safe_B = jnp.minimum(idx_B, N - 1)
    longest = jnp.max(jnp.where(idx_B < N, length_N[safe_B], 1))
    h_BxSxD, logits_BxC = _layer_exit_trimmed(prepared, cfg, l, h_NxSxD[safe_B], mask_NxS[safe_B], longest,
                                              lengths)
    words_B = None if word_mask_NxS is None else word_mask_NxS[safe_B]
    state_B, exit_now_B = ep.step(policy, jax.tree.map(lambda x: x[safe_B], state_N), logits_BxC, l, words_B)
    put = lambda buf, val: buf.at[idx_B].set(val, mode="drop")
    h_NxSxD = put(h_NxSxD, h_BxSxD.astype(h_NxSxD.dtype))
    next_layer_N = put(next_layer_N, jnp.full((batch_size,), l + 1, jnp.int32))
    state_N = jax.tree.map(put, state_N, state_B)
    done_N = put(done_N, exit_now_B)
    exit_N = put(exit_N, jnp.where(exit_now_B, l, exit_N[safe_B]))
    out_NxC = put(out_NxC, jnp.where(ep.per_example(exit_now_B, logits_BxC), logits_BxC.astype(jnp.float32),
                                     out_NxC[safe_B]))
    return runs + 1, h_NxSxD, next_layer_N, done_N, state_N, exit_N, out_NxC

  init = (jnp.int32(0), h_NxSxD, jnp.zeros((N,), jnp.int32), ~jnp.asarray(valid_N, bool), ep.init_state((N,)),
          jnp.zeros((N,), jnp.int32), jnp.zeros(example_logits_shape(cfg, N, S), jnp.float32))
  runs, _, _, _, _, exit_N, out_NxC = jax.lax.while_loop(cond, body, init)
  return ExitResult(out_NxC, exit_N, runs)


@functools.partial(jax.jit, static_argnames=("cfg", "batch_size", "mesh"))
def throughput_chunks(prepared, cfg: ModelConfig, policy: ep.ExitPolicy, input_ids_DxNxS, attention_mask_DxNxS,
                      token_type_ids_DxNxS, valid_DxN, batch_size: int, mesh, word_mask_DxNxS=None) -> ExitResult:
  """`throughput_chunk` on every device of `mesh` at once, each device on its own chunk (row d of the
  [D, N, S] inputs): one scheduler per device, no collectives, each device's loop stops on its own.

  Returns the D chunks' results flattened to D*N examples; layer_runs is the sum over devices.
  """
  from jax.sharding import PartitionSpec as P
  axis = mesh.axis_names[0]

  def per_device(prepared, policy, ids, mask, types, valid, *words):
    res = throughput_chunk(prepared, cfg, policy, ids[0], mask[0], types[0], valid[0], batch_size,
                           word_mask_NxS=words[0][0] if words else None)
    return jax.tree.map(lambda x: x[None], res)

  words = () if word_mask_DxNxS is None else (word_mask_DxNxS,)
  res = jax.shard_map(per_device, mesh=mesh, in_specs=(P(), P()) + (P(axis),) * (4 + len(words)),
                      out_specs=P(axis), check_vma=False)(
      prepared, policy, input_ids_DxNxS, attention_mask_DxNxS, token_type_ids_DxNxS, valid_DxN, *words)
  D, N = valid_DxN.shape
  return ExitResult(res.logits_BxC.reshape(D * N, *res.logits_BxC.shape[2:]), res.exit_index_B.reshape(D * N),
                    res.layer_runs.sum())
