"""Multi-exit BERT / RoBERTa encoder in Flax: the one layer loop every path runs.

Layout of the parameters (a plain pytree, so optax, Orbax and sharding see ordinary arrays):

  {'embeddings': {...},                         # Embeddings module
   'layers':     {... every leaf [L, ...]},     # EncoderLayer params stacked on a layer axis
   'exits':      {... every leaf [L, ...]}}     # exit head params stacked; exit L = the model's head

That is the stacked layout (exports, checkpoints of models). The per-layer layout
(`unstack_layers`: 'layers' and 'exits' as tuples of per-layer trees) is what training and the
early-exit dispatch use; `stack_layers` / `unstack_layers` are the one conversion pair, and every
function here reads either (`layer_slice`).

One definition of the encoder's work: `layer_and_exit` runs layer i and (optionally) exit i;
`forward` is the one loop over layers, parameterised by what callers need (which exits, how many
layers, dropout and its key, stop-gradient into the exits, taps for the GR penalty, the short last
layer); `layer_and_exit_at` serves a traced layer index (the early-exit `while_loop`; the scheduler's cuts
read per-layer branches, or TOKEE's one body the layer taken once a step, `layer_alone`).
Training, evaluation, the offline all-exits pass, the full-model baseline and the early-exit paths
all run through these. What an exit computes is the head seam (`heads.py`).

Weight matrices are stored [out, in] as in PyTorch (`layers.Linear`: faster backward on XLA:CPU).
Numerics follow transformers' post-LN BertModel: erf GELU, LayerNorm eps from the config, additive
attention mask. With `dtype='bfloat16'` matmuls run in bfloat16 while parameters, softmax, layer
norms and logits stay float32.
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from rome_flax.errors import RomeFlaxError
from rome_flax.model import heads, layers
from rome_flax.model.config import ModelConfig

# Additive mask value for padded keys; finite so a row of all padding stays NaN-free.
_MASK_VALUE = -1e9
# EncoderLayer with query rows: below 3M + this many pieces, Q is computed for every piece (see there).
QUERY_ROWS_SLACK = 64


class Embeddings(nn.Module):
  cfg: ModelConfig

  @nn.compact
  def __call__(self, input_ids_BxS, token_type_ids_BxS, position_ids_BxS, deterministic: bool):
    cfg = self.cfg
    init = layers.dense_init(cfg)
    word = nn.Embed(cfg.vocab_size, cfg.hidden_size, embedding_init=init, name="word")
    position = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, embedding_init=init, name="position")
    token_type = nn.Embed(cfg.type_vocab_size, cfg.hidden_size, embedding_init=init, name="token_type")
    h = word(input_ids_BxS) + position(position_ids_BxS) + token_type(token_type_ids_BxS)
    h = layers.LayerNorm(cfg.layer_norm_eps, name="ln")(h).astype(layers.compute_dtype(cfg))
    return layers.Dropout(cfg.hidden_dropout_prob)(h, deterministic=deterministic)


class EncoderLayer(nn.Module):
  """One post-LN transformer layer. Q, K and V share one fused [3D, D] kernel (one big matmul)."""
  cfg: ModelConfig

  @nn.compact
  def __call__(self, h_BxSxD, mask_bias_Bx1x1xS, deterministic: bool, first_token_only: bool = False,
               query_rows_M=None, residual_out: bool = False):
    """`first_token_only`: compute the output of token 0 alone ([B,1,D]); keys and values still
    come from every token. The last layer needs nothing else when its exit pools token 0.

    `query_rows_M` (int32 [M], flat indices into the B*S tokens; B*S marks an empty slot): compute
    the outputs of those tokens alone ([M,D]), keys and values from every token: token-level early
    exit (TOKEE) runs the queries, attention output and feed-forward of its active pieces only.
    `residual_out`: return the pre-LayerNorm residual P (output = LN(P)), which a halted piece keeps.
    """
    cfg = self.cfg
    dtype = layers.compute_dtype(cfg)
    B, S, D = h_BxSxD.shape
    H, Dh = cfg.num_attention_heads, cfg.head_dim
    dense = lambda n, name: layers.Linear(n, dtype, layers.kernel_init(cfg), name=name)

    qkv = dense(3 * D, "qkv")
    # Split, then move heads forward: [B,H,S,Dh] batched matmuls ran ~25% faster in the forward on
    # XLA CPU than einsums over [B,S,H,Dh]; forward + backward, the two are level (docs/results.md).
    to_heads = lambda x: x.reshape(B, x.shape[1], H, Dh).transpose(0, 2, 1, 3)
    rows_out = None
    if first_token_only:   # same kernel, split by rows: Q for the chosen tokens, K and V for every token
      q_Bx1xD = qkv(h_BxSxD[:, :1])[..., :D]
      kernel, bias = qkv.variables["params"]["kernel"], qkv.variables["params"]["bias"]
      kv_BxSx2D = layers.linear(h_BxSxD, kernel[D:], bias[D:], dtype)
      k_BxSxD, v_BxSxD = jnp.split(kv_BxSx2D, 2, axis=-1)
      q_BxSxD, h_BxSxD, S = q_Bx1xD, h_BxSxD[:, :1], 1
    elif query_rows_M is not None:
      M = query_rows_M.shape[0]
      rows_out = jnp.minimum(query_rows_M, B * S - 1)
      h_MxD = h_BxSxD.reshape(B * S, D)[rows_out]
      if B * S < 3 * M + QUERY_ROWS_SLACK:
        # Q, K and V of every piece in one matmul, Q of the halted ones unused: cheaper than what the
        # split below costs (a copy of the [2D, D] K/V kernel rows, and Q of M rows with K and V
        # computed and dropped) unless most pieces have halted. One MiniLM layer at batch 1, 16 pieces,
        # all active: 1,314 -> 1,064 us (AMD EPYC, a loaded machine).
        q_BxSxD, k_BxSxD, v_BxSxD = jnp.split(qkv(h_BxSxD), 3, axis=-1)
      else:
        q_MxD = qkv(h_MxD)[..., :D]
        kernel, bias = qkv.variables["params"]["kernel"], qkv.variables["params"]["bias"]
        kv_BxSx2D = layers.linear(h_BxSxD, kernel[D:], bias[D:], dtype)
        k_BxSxD, v_BxSxD = jnp.split(kv_BxSx2D, 2, axis=-1)
        q_BxSxD = jnp.zeros((B * S, D), q_MxD.dtype).at[query_rows_M].set(q_MxD, mode="drop").reshape(B, S, D)
    else:
      q_BxSxD, k_BxSxD, v_BxSxD = jnp.split(qkv(h_BxSxD), 3, axis=-1)
    q_BxHxSxK = to_heads(q_BxSxD * jnp.asarray(1.0 / Dh ** 0.5, q_BxSxD.dtype))
    k_BxHxTxK, v_BxHxTxK = to_heads(k_BxSxD), to_heads(v_BxSxD)
    scores_BxHxSxT = jnp.matmul(q_BxHxSxK, k_BxHxTxK.transpose(0, 1, 3, 2),
                                preferred_element_type=jnp.float32) + mask_bias_Bx1x1xS
    probs_BxHxSxT = jax.nn.softmax(scores_BxHxSxT, axis=-1)
    probs_BxHxSxT = layers.Dropout(cfg.attention_probs_dropout_prob)(probs_BxHxSxT, deterministic=deterministic)
    ctx_BxHxSxK = jnp.matmul(probs_BxHxSxT.astype(dtype), v_BxHxTxK)
    ctx_BxSxD = ctx_BxHxSxK.transpose(0, 2, 1, 3).reshape(B, S, D)
    if rows_out is not None:   # on to the chosen tokens alone: [M, D]
      ctx_BxSxD, h_BxSxD = ctx_BxSxD.reshape(B * S, D)[rows_out], h_MxD

    attn_BxSxD = dense(D, "attention_out")(ctx_BxSxD)
    attn_BxSxD = layers.Dropout(cfg.hidden_dropout_prob)(attn_BxSxD, deterministic=deterministic)
    h_BxSxD = layers.LayerNorm(cfg.layer_norm_eps, name="attention_ln")(attn_BxSxD + h_BxSxD)

    ff_BxSxF = layers.activation(cfg.hidden_act)(dense(cfg.intermediate_size, "intermediate")(h_BxSxD))
    ff_BxSxD = dense(D, "output")(ff_BxSxF)
    ff_BxSxD = layers.Dropout(cfg.hidden_dropout_prob)(ff_BxSxD, deterministic=deterministic)
    output_ln = layers.LayerNorm(cfg.layer_norm_eps, name="output_ln")
    if residual_out:
      output_ln(ff_BxSxD + h_BxSxD)   # (declares the parameters; XLA drops the unused result)
      return ff_BxSxD + h_BxSxD
    return output_ln(ff_BxSxD + h_BxSxD)


def output_norm(layer_params, cfg: ModelConfig, p_xD):
  """Layer i's output LayerNorm on pre-LN residuals P (`EncoderLayer(residual_out=True)`): how a halted
  piece's frozen residual is read by later layers (`keep_norm_same`, method-seqlab.md section 3)."""
  return layers.LayerNorm(cfg.layer_norm_eps).apply({"params": layer_params["output_ln"]}, p_xD)


class MultiExitOutput(NamedTuple):
  exit_logits: jax.Array                       # [exits, batch, labels] float32
  hidden_states: Optional[jax.Array] = None    # [layers + 1, batch, seq, hidden], embeddings first


# ----------------------------------------------------------------------------- layouts


def layer_slice(stacked, i):
  """Parameters of layer/exit i: from a stacked tree (`i` a Python or traced int), or item i of the
  per-layer tuple (`unstack_layers`)."""
  if isinstance(stacked, (list, tuple)):
    return stacked[i]
  return jax.tree.map(lambda x: x[i], stacked)


def layer_alone(params, i) -> dict:
  """Layer i's and exit i's parameters as a one-layer per-layer tree (read them at index 0), the rest as it
  is, taken once where many branches read the same layer (the scheduler's cuts; slicing inside each branch
  traced 660 slices in a TOKEE server's warm-up): a traced slice of the stacked layout, or of the per-layer
  layout item i picked by a `lax.switch`. Either is a copy of the layer's weights (XLA:CPU has no views);
  one body then serves every layer, where a branch per layer compiled 6x the programs."""
  if is_unstacked(params) and not isinstance(i, (int, np.integer)):
    layer, exit_ = jax.lax.switch(i, [functools.partial(lambda k: (params["layers"][k], params["exits"][k]), k)
                                      for k in range(len(params["layers"]))])
    return dict(params, layers=(layer,), exits=(exit_,))
  return dict(params, layers=(layer_slice(params["layers"], i),), exits=(layer_slice(params["exits"], i),))


def is_unstacked(params) -> bool:
  return isinstance(params["layers"], (list, tuple))


def unstack_layers(params) -> dict:
  """The per-layer layout: 'layers' and 'exits' as tuples of per-layer trees (idempotent).

  Training: a step that slices layer i out of a stacked array copies it (XLA:CPU has no views), and
  the gradient of that slice is a zero-padded [L, ...] array summed with the other layers': about
  25 ms of a 400 ms MiniLM step. Early-exit dispatch: `lax.switch` over per-layer branches reads
  the weights in place (MiniLM at batch 1: 8.4 ms against 9.5 ms for a traced slice).
  """
  if is_unstacked(params):
    return params
  def split(stacked):
    n = jax.tree.leaves(stacked)[0].shape[0]
    return tuple(jax.tree.map(lambda x: x[i], stacked) for i in range(n))
  return dict(params, layers=split(params["layers"]), exits=split(params["exits"]))


def stack_layers(params) -> dict:
  """The stacked layout from the per-layer layout (idempotent)."""
  if not is_unstacked(params):
    return params
  xp = np if all(isinstance(x, np.ndarray) for x in jax.tree.leaves(params["layers"])) else jnp
  stack = lambda trees: jax.tree.map(lambda *xs: xp.stack(xs), *trees)
  return dict(params, layers=stack(params["layers"]), exits=stack(params["exits"]))


# ----------------------------------------------------------------------------- the pieces


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
              rng=None, first_token_only: bool = False, query_rows_M=None, residual_out: bool = False):
  """Runs encoder layer i (0-based; int or traced int) on h.

  first_token_only returns [B,1,D]: token 0's output, all that a 'cls' exit reads; query_rows_M
  returns [M,D], the outputs of those tokens; residual_out the pre-LN residual (`EncoderLayer`)."""
  return EncoderLayer(cfg).apply({"params": layer_slice(params["layers"], i)}, h_BxSxD,
                                 mask_bias_Bx1x1xS, deterministic, first_token_only, query_rows_M, residual_out,
                                 rngs=_rngs(_rng_for(rng, 1, i)))


def run_exit(params, cfg: ModelConfig, i, h_BxSxD, attention_mask_BxS, *, deterministic: bool = True,
             rng=None):
  """Runs exit i (0-based; exit num_layers-1 is the final head) on layer i's output, through the
  head kind of the config (`heads.py`)."""
  return heads.head_kind(cfg).module(cfg).apply(
      {"params": layer_slice(params["exits"], i)}, h_BxSxD, attention_mask_BxS, deterministic,
      rngs=_rngs(_rng_for(rng, 2, i)))


def last_layer_first_token_only(cfg: ModelConfig, output_hidden_states: bool = False) -> bool:
  """Whether the last layer run may compute token 0 alone: its exit reads token 0 alone and nobody
  wants its full output. Skips ~80% of that layer's work (1/L of the model) with identical logits."""
  return heads.head_kind(cfg).reads_first_token_only(cfg) and not output_hidden_states


def layer_and_exit(params, cfg: ModelConfig, i, h_BxSxD, mask_BxS, mask_bias_Bx1x1xS, *,
                   deterministic: bool = True, rng=None, with_exit: bool = True, first_token_only: bool = False,
                   stop_gradient_exit: bool = False, tap_BxSxD=None):
  """Layer i, then exit i on its output: THE unit of work of every path. Returns (h, logits or None).

  tap_BxSxD (zeros) is added to the layer's output, so that its gradient is the loss's gradient with
  respect to that hidden state (GR penalty). stop_gradient_exit: the exit's loss does not reach the
  encoder (a frozen-encoder stage).
  """
  h_BxSxD = run_layer(params, cfg, i, h_BxSxD, mask_bias_Bx1x1xS, deterministic=deterministic, rng=rng,
                      first_token_only=first_token_only)
  if tap_BxSxD is not None:
    h_BxSxD = h_BxSxD + tap_BxSxD.astype(h_BxSxD.dtype)
  if not with_exit:
    return h_BxSxD, None
  h_exit = jax.lax.stop_gradient(h_BxSxD) if stop_gradient_exit else h_BxSxD
  return h_BxSxD, run_exit(params, cfg, i, h_exit, mask_BxS, deterministic=deterministic, rng=rng)


def layer_and_exit_branches(params, cfg: ModelConfig) -> list:
  """One inference callable per layer, `(h_BxSxD, mask_BxS, bias) -> (h_BxSxD, logits_BxC)`, with a
  static layer index: the branches of a `lax.switch` over layers.

  The last layer's branch computes token 0 alone when its head reads nothing else, and hands back
  its input as the hidden state (same shape for every branch; nothing reads the state after it).
  """
  def branch(k, h_BxSxD, mask_BxS, bias_Bx1x1xS):
    short = k == cfg.num_layers - 1 and last_layer_first_token_only(cfg)
    h_out, logits_BxC = layer_and_exit(params, cfg, k, h_BxSxD, mask_BxS, bias_Bx1x1xS, first_token_only=short)
    return (h_BxSxD if short else h_out), logits_BxC
  return [functools.partial(branch, k) for k in range(cfg.num_layers)]


def layer_and_exit_at(params, cfg: ModelConfig, i, h_BxSxD, mask_BxS, mask_bias_Bx1x1xS):
  """Layer i + exit i (inference) with a traced i: `lax.switch` over static per-layer branches when
  the parameters are per-layer (weights read in place), else a traced slice of the stacked layout."""
  if is_unstacked(params):
    return jax.lax.switch(i, layer_and_exit_branches(params, cfg), h_BxSxD, mask_BxS, mask_bias_Bx1x1xS)
  return layer_and_exit(params, cfg, i, h_BxSxD, mask_BxS, mask_bias_Bx1x1xS)


# ----------------------------------------------------------------------------- the loop


def forward(params, cfg: ModelConfig, input_ids_BxS, attention_mask_BxS=None, token_type_ids_BxS=None,
            *, deterministic: bool = True, rng=None, exits: Optional[Sequence[int]] = None,
            num_layers: Optional[int] = None, stop_gradient_exits: bool = False, taps_KxBxSxD=None,
            output_hidden_states: bool = False, active_BxLxS=None) -> MultiExitOutput:
  """The one loop over layers: runs `num_layers` layers (default all) and the exits in `exits`
  (0-based, default every layer run), returning their logits [len(exits), B, C] in that order.

  active_BxLxS (0/1, token-level early exit simulated in training: self-sampling, method-seqlab.md
  section 4): a piece inactive at layer l keeps its pre-LN residual, P_l = a P_new + (1 - a) P_{l-1},
  and every piece reads H_l = LN_l(P_l), as `token_exit` runs it at inference.

  The loop is unrolled in Python: on XLA:CPU that was 15-18% faster than `lax.scan`. The last
  layer run computes token 0 alone when its exit reads nothing else (`last_layer_first_token_only`).
  taps_KxBxSxD: added to the outputs of layers 1..K (GR penalty). stop_gradient_exits: the exits
  read stop_gradient(h) (a frozen-encoder stage).
  """
  num_layers = num_layers or cfg.num_layers
  exits = tuple(range(num_layers)) if exits is None else tuple(int(e) for e in exits)
  if not exits or not 1 <= num_layers <= cfg.num_layers or any(not 0 <= e < num_layers for e in exits):
    raise RomeFlaxError(f"forward: exits {exits} must be a non-empty subset of the {num_layers} layers run "
                        f"(the model has {cfg.num_layers})")
  input_ids_BxS = jnp.asarray(input_ids_BxS, jnp.int32)
  if attention_mask_BxS is None:
    attention_mask_BxS = jnp.ones_like(input_ids_BxS)
  mask_BxS = jnp.asarray(attention_mask_BxS, jnp.int32)
  h_BxSxD = embed(params, cfg, input_ids_BxS, mask_BxS, token_type_ids_BxS, deterministic=deterministic, rng=rng)
  mask_bias = attention_bias(mask_BxS)
  num_taps = 0 if taps_KxBxSxD is None else taps_KxBxSxD.shape[0]
  short_last = last_layer_first_token_only(cfg, output_hidden_states) and num_taps < num_layers
  hidden, logits = [h_BxSxD], []
  residual_BxSxD = h_BxSxD.astype(jnp.float32)
  for i in range(num_layers):
    if active_BxLxS is not None:
      p_new = run_layer(params, cfg, i, h_BxSxD, mask_bias, deterministic=deterministic, rng=rng, residual_out=True)
      residual_BxSxD = jnp.where(active_BxLxS[:, i, :, None] > 0, p_new.astype(jnp.float32), residual_BxSxD)
      h_BxSxD = output_norm(layer_slice(params["layers"], i), cfg, residual_BxSxD).astype(h_BxSxD.dtype)
      if i in exits:
        h_exit = jax.lax.stop_gradient(h_BxSxD) if stop_gradient_exits else h_BxSxD
        logits.append(run_exit(params, cfg, i, h_exit, mask_BxS, deterministic=deterministic, rng=rng))
      hidden.append(h_BxSxD)
      continue
    h_BxSxD, logits_BxC = layer_and_exit(
        params, cfg, i, h_BxSxD, mask_BxS, mask_bias, deterministic=deterministic, rng=rng,
        with_exit=i in exits, first_token_only=short_last and i == num_layers - 1,
        stop_gradient_exit=stop_gradient_exits, tap_BxSxD=taps_KxBxSxD[i] if i < num_taps else None)
    if logits_BxC is not None:
      logits.append(logits_BxC)
    hidden.append(h_BxSxD)
  return MultiExitOutput(
      exit_logits=jnp.stack(logits),
      hidden_states=jnp.stack(hidden).astype(jnp.float32) if output_hidden_states else None)


# ----------------------------------------------------------------------------- initialisation


def init_params(cfg: ModelConfig, rng, *, host: bool = False) -> dict:
  """THE parameter initialiser: random models, and whatever a converted checkpoint lacks.

  BERT init: N(0, initializer_range) for weight matrices and embeddings (kernels drawn [in, out]
  and transposed, `layers.kernel_init`), zero biases, unit LayerNorm; every exit pooler a copy of
  one pooler, as with a pretrained checkpoint; each exit classifier its own draw. Stacked layout.
  `host=True` returns writable NumPy arrays (the converter fills them in place). Jitted: run
  eagerly, Linen's init compiles a hundred small programs (seconds for a BERT).
  """
  params = _init_params_jit(cfg, rng)
  return jax.tree.map(np.array, jax.device_get(params)) if host else params


@functools.partial(jax.jit, static_argnums=0)
def _init_params_jit(cfg: ModelConfig, rng) -> dict:
  k_emb, k_layers, k_pool, k_cls = jax.random.split(rng, 4)
  ids = jnp.zeros((1, 2), jnp.int32)
  h = jnp.zeros((1, 2, cfg.hidden_size), layers.compute_dtype(cfg))
  emb = Embeddings(cfg).init(k_emb, ids, ids, ids, True)["params"]
  encoder = jax.vmap(lambda k: EncoderLayer(cfg).init(k, h, attention_bias(ids + 1), True)["params"])(
      jax.random.split(k_layers, cfg.num_layers))
  head = heads.head_kind(cfg).module(cfg).init(k_pool, h, ids + 1, True)["params"]
  exits = jax.tree.map(lambda x: jnp.broadcast_to(x, (cfg.num_layers,) + x.shape), head)
  exits["classifier"] = {   # one draw per exit (the poolers stay copies)
      "kernel": layers.kernel_init(cfg)(k_cls, (cfg.num_layers, cfg.num_labels, cfg.hidden_size)),
      "bias": jnp.zeros((cfg.num_layers, cfg.num_labels), jnp.float32)}
  return {"embeddings": emb, "layers": encoder, "exits": exits}


def param_shapes(cfg: ModelConfig) -> dict:
  """Shapes and dtypes of `init_params` without allocating anything."""
  return jax.eval_shape(lambda: init_params(cfg, jax.random.PRNGKey(0)))


# Encoder weight matrices that RomeBERT's gradient projection acts on (kernels under params['layers']).
ENCODER_MATRICES = ("qkv", "attention_out", "intermediate", "output")
