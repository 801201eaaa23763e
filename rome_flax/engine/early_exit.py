"""Early exit that really saves time: a latency path and a throughput path, plus the full-model baseline.

Latency path (`latency_exit`): one jitted `lax.while_loop` over layers. Iteration i runs layer i and
exit i on the whole batch, asks the policy which examples exit, and stops as soon as every example
has exited; each example keeps the first exit it took. At batch size 1 this is classic early exit,
with no host round trip per layer and no re-tracing per input (the layer index is traced).

Throughput path (`throughput_chunk` = `engine.chunk`): at batch size > 1 the latency path waits for
the slowest example. The open engine (scheduler.py) keeps N examples on the device in slots and runs one
layer at a time on B waiting ones, retiring those that exit; a closed chunk admits N examples and runs
until all have exited, the admission pass (`inference.throughput_pass(admission=True)`) and the
server refill slots as they free up.

Every path runs the model's one unit of work (`model.layer_and_exit`): the full model and the
all-exits pass are `model.forward`, the loops call `model.layer_and_exit_at` with a traced layer.

Layer dispatch. `prepare_params(..., dispatch='switch')` (default) puts the parameters in the
per-layer layout (`model.unstack_layers`), and `model.layer_and_exit_at` picks layer i with
`lax.switch` over static branches, so weights are read in place; `dispatch='slice'` keeps the
stacked layout and indexes it with the traced i, which copies the layer's weights each iteration. Measured on CPU with MiniLM at batch 1 (6 layers,
32 tokens, no exit taken): full model 7.9 ms, switch loop 8.4 ms, slice loop 9.5 ms; a full model
that slices stacked weights with static indices took 21.9 ms, so the baseline here also runs on
unstacked weights. bench/early_exit.py --dispatch slice compares the two loops end to end.

All paths call the policy's `step` (`exit_policy.Policy`), so they take exactly the decisions that
`exit_policy.decide` takes on an all-exits pass (tests/test_early_exit.py checks it).

Token exits (sequence labelling): the same paths with a word mask [B,S] (1 at each word's first
piece); a sentence is one example and exits as a whole (SENTEE), its logits [S,C] per example.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from rome_flax.engine import exit_policy as ep
from rome_flax.engine import scheduler as engine
from rome_flax.errors import RomeFlaxError
from rome_flax.model import encoder as model_lib
from rome_flax.model.config import ModelConfig

DISPATCHES = ("switch", "slice")


def prepare_params(params: dict, dispatch: str = "switch") -> dict:
  """Parameters laid out for a dispatch mode ('switch': the per-layer layout; 'slice': stacked)."""
  if dispatch not in DISPATCHES:
    raise RomeFlaxError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}")
  return model_lib.stack_layers(params) if dispatch == "slice" else model_lib.unstack_layers(params)


# ----------------------------------------------------------------------------- jitted paths


example_logits_shape = engine.logits_shape


# The throughput path is the open engine's closed chunk (scheduler.py), re-exported under its old names.
ExitResult = engine.ExitResult
throughput_chunk = engine.chunk
trim_lengths = engine.trim_lengths


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
    state, exit_now_B = policy.step(state, logits_BxC, i, word_mask_BxS)
    return (i + 1, h_BxSxD, state, *ep.record_exit(exit_now_B, i, logits_BxC, done_B, exit_B, out_BxC))

  init = (jnp.int32(0), h_BxSxD, policy.init_state(jnp.ones((B,), bool)), jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32),
          jnp.zeros(example_logits_shape(cfg, B, S), jnp.float32))
  layers_run, _, _, _, exit_B, out_BxC = jax.lax.while_loop(cond, body, init)
  return ExitResult(out_BxC, exit_B, layers_run)


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
