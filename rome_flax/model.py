"""Multi-exit BERT / RoBERTa encoder in Flax.

Layout of the parameters (a plain pytree, so optax, Orbax and sharding see ordinary arrays):

  {'embeddings': {...},                         # Embeddings module
   'layers':     {... every leaf [L, ...]},     # EncoderLayer params stacked on a layer axis
   'exits':      {... every leaf [L, ...]}}     # ExitHead params stacked; exit L = the model's head

Weight matrices are stored [out, in] as in PyTorch (`Linear`: faster backward on XLA:CPU).

Stacking lets one `run_layer(params, cfg, i, ...)` / `run_exit(...)` serve any layer index, static
or traced, so an early-exit `lax.while_loop` or a scheduler picks the layer at run time without
re-tracing. `forward` unrolls the layer loop in Python (static slices): on the XLA CPU backend that
is measurably faster than `lax.scan`, and it is what training uses.

Numerics follow transformers' post-LN BertModel: erf GELU, LayerNorm eps from the config, additive
attention mask. With `dtype='bfloat16'` matmuls run in bfloat16 while parameters, softmax, layer
norms and logits stay float32.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from rome_flax.config import ModelConfig

# Additive mask value for padded keys; finite so a row of all padding stays NaN-free.
_MASK_VALUE = -1e9


def _dense_init(cfg: ModelConfig):
  return nn.initializers.normal(stddev=cfg.initializer_range)


def _kernel_init(cfg: ModelConfig):
  """N(0, initializer_range) for an [out, in] kernel, drawn [in, out] and transposed: a seed gives the
  same weights as it did when kernels were stored [in, out], so earlier runs reproduce."""
  normal = _dense_init(cfg)
  return lambda key, shape, dtype=jnp.float32: jnp.swapaxes(
      normal(key, (*shape[:-2], shape[-1], shape[-2]), dtype), -1, -2)


def _compute_dtype(cfg: ModelConfig):
  return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


def _activation(name: str):
  if name == "gelu":  # exact (erf) GELU, as BERT; this form compiled to faster XLA CPU code than jax.nn.gelu
    return lambda x: 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476))
  if name in ("gelu_new", "gelu_pytorch_tanh"):
    return lambda x: jax.nn.gelu(x, approximate=True)
  return jax.nn.relu


def _mix32(x):
  """murmur3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
  x = (x ^ (x >> 16)) * jnp.uint32(0x85EBCA6B)
  x = (x ^ (x >> 13)) * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def dropout_keep_mask(key, shape, keep_prob: float) -> jax.Array:
  """Bernoulli(keep_prob) mask, a keyed hash of each element's position (counter-based, like Philox).

  Two mixing rounds, each keyed by one word of the 64-bit key, make every key a different
  permutation of the counter. Versus `jax.random.bernoulli` (threefry, 20 rounds, bits kept as
  arrays) it is a handful of integer ops that XLA fuses into the masked op, forward and backward:
  45-60 ms less per MiniLM train step on 2 CPU cores. Keep probability exact to 2^-32.
  """
  words = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  words = jnp.asarray(words, jnp.uint32).reshape(-1)
  counter = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  bits = _mix32(_mix32(counter ^ words[0]) + words[-1])
  return bits < jnp.uint32(min(round(keep_prob * 2.0 ** 32), 2 ** 32 - 1))


class Dropout(nn.Module):
  """Inverted dropout with `dropout_keep_mask`; the key comes from the 'dropout' rng stream."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = dropout_keep_mask(self.make_rng("dropout"), x.shape, keep)
    return jnp.where(mask, x * jnp.asarray(1.0 / keep, x.dtype), jnp.zeros((), x.dtype))


class Linear(nn.Module):
  """y = x @ kernel.T + bias with the kernel stored [out, in], PyTorch's layout, in float32.

  Not nn.Dense's [in, out]: on XLA:CPU the backward of x @ kernel.T (dW = dy^T x, dx = dy @ kernel)
  compiles to faster GEMMs; forward + backward of BERT's intermediate matmul took 9.3 ms instead of
  14.7 ms, and a MiniLM GR train step 536 ms instead of 631 ms (docs/results.md). It also makes
  Hugging Face weights load without transposes.
  """
  features: int
  dtype: jnp.dtype = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal(in_axis=-1, out_axis=-2)  # fan-in of [out, in]

  @nn.compact
  def __call__(self, x):
    kernel_OxI = self.param("kernel", self.kernel_init, (self.features, x.shape[-1]), jnp.float32)
    bias_O = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    return linear(x, kernel_OxI, bias_O, self.dtype)


def linear(x, kernel_OxI, bias_O, dtype):
  """`Linear`'s computation on given (possibly sliced) parameters, in `dtype`."""
  return jnp.matmul(x.astype(dtype), kernel_OxI.astype(dtype).T) + bias_O.astype(dtype)


def swap_kernel_axes(params):
  """Every 'kernel' leaf [..., a, b] -> [..., b, a]: between Flax's [in, out] and our [out, in].
  Works on arrays of any kind and under `jax.eval_shape`."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.swapaxes(-1, -2) if path[-1].key == "kernel" else x, params)


class LayerNorm(nn.Module):
  """LayerNorm computed in float32 whatever the compute dtype, cast back afterwards."""
  eps: float

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(epsilon=self.eps, dtype=jnp.float32, param_dtype=jnp.float32, name="ln")(
        x.astype(jnp.float32))
    return y.astype(x.dtype)


class Embeddings(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, input_ids_BxS, token_type_ids_BxS, position_ids_BxS, deterministic: bool):
    cfg = self.cfg
    init = _dense_init(cfg)
    word = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, name="word")
    position = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init, name="position")
    token_type = nn.Embed(cfg.type_vocab_size, cfg.hidden_size, embedding_init=init, name="token_type")
    h = word(input_ids_BxS) + position(position_ids_BxS) + token_type(token_type_ids_BxS)
    h = LayerNorm(cfg.layer_norm_eps, name="ln")(h).astype(_compute_dtype(cfg))
    return Dropout(cfg.hidden_dropout_prob)(h, deterministic=deterministic)


class EncoderLayer(nn.Module):
  """One post-LN transformer layer. Q, K and V share one fused [3D, D] kernel (one big matmul)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, h_BxSxD, mask_bias_Bx1x1xS, deterministic: bool, first_token_only: bool = False):
    """`first_token_only`: compute the output of token 0 alone ([B,1,D]); keys and values still
    come from every token. The last layer needs nothing else when its exit pools token 0."""
    cfg = self.cfg
    dtype = _compute_dtype(cfg)
    B, S, D = h_BxSxD.shape
    H, Dh = cfg.num_attention_heads, cfg.head_dim
    dense = lambda n, name: Linear(n, dtype, _kernel_init(cfg), name=name)

    qkv = dense(3 * D, "qkv")
    # Split, then move heads forward: [B,H,S,Dh] batched matmuls ran ~25% faster in the forward on
    # XLA CPU than einsums over [B,S,H,Dh]; forward + backward, the two are level (docs/results.md).
    to_heads = lambda x: x.reshape(B, x.shape[1], H, Dh).transpose(0, 2, 1, 3)
    if first_token_only:
      # Same kernel, split by rows: Q for token 0, K and V for every token.
      q_Bx1xD = qkv(h_BxSxD[:, :1])[..., :D]
      kernel, bias = qkv.variables["params"]["kernel"], qkv.variables["params"]["bias"]
      kv_BxSx2D = linear(h_BxSxD, kernel[D:], bias[D:], dtype)
      k_BxSxD, v_BxSxD = jnp.split(kv_BxSx2D, 2, axis=-1)
      q_BxSxD, h_BxSxD, S = q_Bx1xD, h_BxSxD[:, :1], 1
    else:
      q_BxSxD, k_BxSxD, v_BxSxD = jnp.split(qkv(h_BxSxD), 3, axis=-1)
    q_BxHxSxK = to_heads(q_BxSxD * jnp.asarray(1.0 / Dh ** 0.5, q_BxSxD.dtype))
    k_BxHxTxK, v_BxHxTxK = to_heads(k_BxSxD), to_heads(v_BxSxD)
    scores_BxHxSxT = jnp.matmul(q_BxHxSxK, k_BxHxTxK.transpose(0, 1, 3, 2),
                                preferred_element_type=jnp.float32) + mask_bias_Bx1x1xS
    probs_BxHxSxT = jax.nn.softmax(scores_BxHxSxT, axis=-1)
    probs_BxHxSxT = Dropout(cfg.attention_probs_dropout_prob)(probs_BxHxSxT, deterministic=deterministic)
    ctx_BxHxSxK = jnp.matmul(probs_BxHxSxT.astype(dtype), v_BxHxTxK)
    ctx_BxSxD = ctx_BxHxSxK.transpose(0, 2, 1, 3).reshape(B, S, D)

    attn_BxSxD = dense(D, "attention_out")(ctx_BxSxD)
    attn_BxSxD = Dropout(cfg.hidden_dropout_prob)(attn_BxSxD, deterministic=deterministic)
    h_BxSxD = LayerNorm(cfg.layer_norm_eps, name="attention_ln")(attn_BxSxD + h_BxSxD)

    ff_BxSxF = _activation(cfg.hidden_act)(dense(cfg.intermediate_size, "intermediate")(h_BxSxD))
    ff_BxSxD = dense(D, "output")(ff_BxSxF)
    ff_BxSxD = Dropout(cfg.hidden_dropout_prob)(ff_BxSxD, deterministic=deterministic)
    return LayerNorm(cfg.layer_norm_eps, name="output_ln")(ff_BxSxD + h_BxSxD)


class ExitHead(nn.Module):
  """Exit i: pool layer i's output (token 0 or masked mean), pooler Linear+tanh, dropout, classifier."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, h_BxSxD, mask_BxS, deterministic: bool, return_pooled: bool = False):
    cfg = self.cfg
    if cfg.exit_pooling == "cls":
      x_BxD = h_BxSxD[:, 0]
    else:
      m_BxSx1 = mask_BxS[..., None].astype(h_BxSxD.dtype)
      x_BxD = (h_BxSxD * m_BxSx1).sum(1) / jnp.maximum(m_BxSx1.sum(1), 1)
    pooled_BxD = jnp.tanh(Linear(cfg.hidden_size, _compute_dtype(cfg), _kernel_init(cfg), name="pooler")(x_BxD))
    x_BxD = Dropout(cfg.hidden_dropout_prob)(pooled_BxD, deterministic=deterministic)
    logits_BxC = Linear(cfg.num_labels, jnp.float32, _kernel_init(cfg), name="classifier")(x_BxD)
    if return_pooled:
      return logits_BxC, pooled_BxD.astype(jnp.float32)
    return logits_BxC


class MultiExitOutput(NamedTuple):
  exit_logits: jax.Array                       # [exits, batch, labels] float32
  hidden_states: Optional[jax.Array] = None    # [layers + 1, batch, seq, hidden], embeddings first


# ----------------------------------------------------------------------------- functional pieces


def layer_slice(stacked, i):
  """Parameters of layer/exit i: from a stacked tree (`i` a Python or traced int), or item i of the
  per-layer tuple of the train layout (`unstack_layers`)."""
  if isinstance(stacked, (list, tuple)):
    return stacked[i]
  return jax.tree.map(lambda x: x[i], stacked)


def is_unstacked(params) -> bool:
  return isinstance(params["layers"], (list, tuple))


def unstack_layers(params) -> dict:
  """The train layout: 'layers' and 'exits' as tuples of per-layer trees (idempotent).

  A train step that slices layer i out of a stacked array copies it (XLA:CPU has no views), and
  the gradient of that slice is a zero-padded [L, ...] array summed with the other layers': about
  25 ms of a 400 ms MiniLM step. The train state keeps the layers apart instead; exports,
  checkpointed models and the early-exit paths keep them stacked (`stack_layers`).
  """
  if is_unstacked(params):
    return params
  def split(stacked):
    n = jax.tree.leaves(stacked)[0].shape[0]
    return tuple(jax.tree.map(lambda x: x[i], stacked) for i in range(n))
  return dict(params, layers=split(params["layers"]), exits=split(params["exits"]))


def stack_layers(params) -> dict:
  """The stacked layout from the train layout (idempotent)."""
  if not is_unstacked(params):
    return params
  stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  return dict(params, layers=stack(params["layers"]), exits=stack(params["exits"]))


def _rng_for(rng, tag: int, i):
  return None if rng is None else jax.random.fold_in(jax.random.fold_in(rng, tag), i)


def _rngs(rng):
  return {} if rng is None else {"dropout": rng}


def attention_bias(attention_mask_BxS) -> jax.Array:
  """Additive float32 attention bias [B,1,1,S] from a 0/1 padding mask."""
  return jnp.where(attention_mask_BxS[:, None, None, :] > 0, 0.0, _MASK_VALUE).astype(jnp.float32)


def position_ids_for(cfg: ModelConfig, input_ids_BxS, attention_mask_BxS):
  if cfg.model_type == "roberta":
    # transformers' create_position_ids_from_input_ids: count non-pad tokens from padding_idx + 1.
    not_pad = (input_ids_BxS != cfg.pad_token_id).astype(jnp.int32)
    return jnp.cumsum(not_pad, axis=1) * not_pad + cfg.pad_token_id
  return jnp.broadcast_to(jnp.arange(input_ids_BxS.shape[1], dtype=jnp.int32), input_ids_BxS.shape)


def embed(params, cfg: ModelConfig, input_ids_BxS, attention_mask_BxS=None, token_type_ids_BxS=None,
          *, deterministic: bool = True, rng=None):
  input_ids_BxS = jnp.asarray(input_ids_BxS, jnp.int32)
  if attention_mask_BxS is None:
    attention_mask_BxS = jnp.ones_like(input_ids_BxS)
  if token_type_ids_BxS is None:
    token_type_ids_BxS = jnp.zeros_like(input_ids_BxS)
  position_ids_BxS = position_ids_for(cfg, input_ids_BxS, attention_mask_BxS)
  return Embeddings(cfg).apply({"params": params["embeddings"]}, input_ids_BxS,
                               jnp.asarray(token_type_ids_BxS, jnp.int32), position_ids_BxS,
                               deterministic, rngs=_rngs(_rng_for(rng, 0, 0)))


def run_layer(params, cfg: ModelConfig, i, h_BxSxD, mask_bias_Bx1x1xS, *, deterministic: bool = True,
              rng=None, first_token_only: bool = False):
  """Runs encoder layer i (0-based; int or traced int) on h.

  first_token_only returns [B,1,D]: token 0's output, all that a 'cls' exit reads."""
  return EncoderLayer(cfg).apply({"params": layer_slice(params["layers"], i)}, h_BxSxD,
                                 mask_bias_Bx1x1xS, deterministic, first_token_only,
                                 rngs=_rngs(_rng_for(rng, 1, i)))


def last_layer_first_token_only(cfg: ModelConfig, output_hidden_states: bool = False) -> bool:
  """Whether the last layer may compute token 0 alone: its exit pools [CLS] and nobody wants its
  full output. Skips ~80% of that layer's work (1/L of the model) with identical logits."""
  return cfg.exit_pooling == "cls" and not output_hidden_states


def run_exit(params, cfg: ModelConfig, i, h_BxSxD, attention_mask_BxS, *, deterministic: bool = True,
             rng=None, return_pooled: bool = False):
  """Runs exit i (0-based; exit num_layers-1 is the final head) on layer i's output."""
  return ExitHead(cfg).apply({"params": layer_slice(params["exits"], i)}, h_BxSxD, attention_mask_BxS,
                             deterministic, return_pooled, rngs=_rngs(_rng_for(rng, 2, i)))


def forward(params, cfg: ModelConfig, input_ids_BxS, attention_mask_BxS=None, token_type_ids_BxS=None,
            *, deterministic: bool = True, rng=None, output_hidden_states: bool = False,
            num_layers: Optional[int] = None) -> MultiExitOutput:
  """All exits in one pass. `num_layers` truncates the model (e.g. the full-model baseline's cost)."""
  input_ids_BxS = jnp.asarray(input_ids_BxS, jnp.int32)
  if attention_mask_BxS is None:
    attention_mask_BxS = jnp.ones_like(input_ids_BxS)
  attention_mask_BxS = jnp.asarray(attention_mask_BxS, jnp.int32)
  h_BxSxD = embed(params, cfg, input_ids_BxS, attention_mask_BxS, token_type_ids_BxS,
                  deterministic=deterministic, rng=rng)
  mask_bias = attention_bias(attention_mask_BxS)
  hidden, logits = [h_BxSxD], []
  num_layers = num_layers or cfg.num_layers
  short_last = last_layer_first_token_only(cfg, output_hidden_states)
  for i in range(num_layers):
    h_BxSxD = run_layer(params, cfg, i, h_BxSxD, mask_bias, deterministic=deterministic, rng=rng,
                        first_token_only=short_last and i == num_layers - 1)
    logits.append(run_exit(params, cfg, i, h_BxSxD, attention_mask_BxS, deterministic=deterministic,
                           rng=rng))
    hidden.append(h_BxSxD)
  return MultiExitOutput(
      exit_logits=jnp.stack(logits),
      hidden_states=jnp.stack(hidden).astype(jnp.float32) if output_hidden_states else None)


def init_params(cfg: ModelConfig, rng) -> dict:
  """Random parameters (BERT init: N(0, initializer_range), zero bias, unit LayerNorm).

  As with a pretrained checkpoint, every exit pooler starts as a copy of one pooler. Jitted: run
  eagerly, Linen's init compiles a hundred small programs (seconds for a BERT).
  """
  return _init_params_jit(cfg, rng)


@functools.partial(jax.jit, static_argnums=0)
def _init_params_jit(cfg: ModelConfig, rng) -> dict:
  k_emb, k_layers, k_pool, k_cls = jax.random.split(rng, 4)
  L, D = cfg.num_layers, cfg.hidden_size
  ids = jnp.zeros((1, 2), jnp.int32)
  h = jnp.zeros((1, 2, D), _compute_dtype(cfg))
  emb = Embeddings(cfg).init(k_emb, ids, ids, ids, True)["params"]
  layers = jax.vmap(lambda k: EncoderLayer(cfg).init(k, h, attention_bias(ids + 1), True)["params"])(
      jax.random.split(k_layers, L))
  head = ExitHead(cfg).init(k_pool, h, ids + 1, True)["params"]
  exits = jax.tree.map(lambda x: jnp.broadcast_to(x, (L,) + x.shape), head)
  exits["classifier"] = {
      "kernel": _kernel_init(cfg)(k_cls, (L, cfg.num_labels, D)),
      "bias": jnp.zeros((L, cfg.num_labels), jnp.float32)}
  return {"embeddings": emb, "layers": layers, "exits": exits}


def param_shapes(cfg: ModelConfig) -> dict:
  """Shapes and dtypes of `init_params` without allocating anything."""
  return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))


# Encoder weight matrices that RomeBERT's gradient projection acts on (kernels under params['layers']).
ENCODER_MATRICES = ("qkv", "attention_out", "intermediate", "output")
