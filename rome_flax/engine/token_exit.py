"""Token-level early exit (TOKEE) over a closed batch, and over a dataset.

The criterion and the layer body are `token_policy`'s (re-exported here). One jitted loop serves every
batch size (`token_exit`): a `lax.while_loop` over layers that stops when every word of every sentence
has halted. Each iteration computes keys and values for every piece, but queries, attention output and
feed-forward only for the active pieces, gathered across the batch into a fixed-size buffer: the
smallest of a few sizes (`buffer_sizes`) that holds them, picked by `lax.switch`, so shapes are static
and nothing recompiles. At batch 1 this is the latency path, at batch 64 the throughput path.
`gather=False` computes every piece and mixes (the plain form of the same semantics: the reference's
stage-2 forward, and what tests compare against). The open engine (`engine.token_step`) runs the same
layer body on slots at different layers, refilling a finished sentence's slot at once (the server).
"""

from __future__ import annotations

import functools
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from rome_flax.engine import exit_policy as ep
from rome_flax.engine import inference
from rome_flax.errors import RomeFlaxError
from rome_flax.kinds import data
from rome_flax.kinds.kind import kind_of
from rome_flax.model import encoder as model_lib
from rome_flax.model.config import ModelConfig
from rome_flax.engine.token_policy import (COPY_WORDPIECE, TokenPolicy, active_pieces, buffer_sizes,  # noqa: F401
                                    halt_on, halt_step, make_token_policy, parse_windows, piece_words, simulate,
                                    token_layer, token_layer_in_buffers, window_max, word_positions,
                                    word_uncertainty)

# ----------------------------------------------------------------------------- the device loop


class TokenExitResult(NamedTuple):
  word_logits_BxWxC: jax.Array   # float32 logits of each word's exit (W = S slots, words first)
  word_exit_BxW: jax.Array       # int32 0-based exit layer of each word (-1: no word)
  queries_BxL: jax.Array         # int32 active pieces per sentence and layer (queries, attention output, FFN)
  keys_BxL: jax.Array            # int32 pieces per sentence and layer while it runs (keys and values, exit head)
  layers_run: jax.Array          # int32 []


@functools.partial(jax.jit, static_argnames=("cfg", "gather", "sizes"))
def token_exit(prepared, cfg: ModelConfig, policy: TokenPolicy, input_ids_BxS, attention_mask_BxS,
               token_type_ids_BxS, word_mask_BxS, gather: bool = True,
               sizes: Optional[tuple] = None) -> TokenExitResult:
  """TOKEE over a batch of sentences; stops when every word of every sentence has halted."""
  mask_BxS = jnp.asarray(attention_mask_BxS, jnp.int32)
  word_mask_BxS = jnp.asarray(word_mask_BxS, jnp.int32)
  B, S = mask_BxS.shape
  L, C = cfg.num_layers, cfg.num_labels
  h_BxSxD = model_lib.embed(prepared, cfg, input_ids_BxS, mask_BxS, token_type_ids_BxS)
  bias = model_lib.attention_bias(mask_BxS)
  valid_BxS = mask_BxS > 0
  pos_BxW = word_positions(word_mask_BxS)                 # W = S word slots
  valid_BxW = jnp.arange(S)[None, :] < word_mask_BxS.sum(1)[:, None]
  word_of_BxS = piece_words(word_mask_BxS, mask_BxS)
  is_first_BxS = word_mask_BxS > 0

  buffers = tuple(sizes or buffer_sizes(B * S)) if gather else ()   # past the largest: every piece, mixed

  def layer(k):
    def run(h_BxSxD, p_BxSxD, active_BxS):
      return token_layer_in_buffers(prepared, cfg, policy, k, h_BxSxD, mask_BxS, bias, p_BxSxD, active_BxS, buffers)
    return run

  def cond(carry):
    i, *_, halted_BxW, _, _, _, _ = carry
    return (i < L) & ~jnp.all(halted_BxW | ~valid_BxW)

  def body(carry):
    i, h_BxSxD, p_BxSxD, halted_BxW, exit_BxW, out_BxWxC, q_BxL, kv_BxL = carry
    active_BxS, done_B = active_pieces(policy, halted_BxW, valid_BxW, valid_BxS, word_of_BxS, is_first_BxS)
    h_BxSxD, p_BxSxD, logits_BxSxC = jax.lax.switch(i, [layer(k) for k in range(L)], h_BxSxD, p_BxSxD, active_BxS)
    words_BxWxC = jnp.take_along_axis(logits_BxSxC.astype(jnp.float32), pos_BxW[..., None], axis=1)
    _, now_BxW = policy.step(halted_BxW, words_BxWxC, i, valid_BxW)
    halted_BxW, exit_BxW, out_BxWxC = ep.record_exit(now_BxW, i, words_BxWxC, halted_BxW, exit_BxW, out_BxWxC)
    q_BxL = q_BxL.at[:, i].set(active_BxS.sum(1).astype(jnp.int32))
    kv_BxL = kv_BxL.at[:, i].set(jnp.where(done_B, 0, mask_BxS.sum(1)).astype(jnp.int32))
    return i + 1, h_BxSxD, p_BxSxD, halted_BxW, exit_BxW, out_BxWxC, q_BxL, kv_BxL

  zeros_BxL = jnp.zeros((B, L), jnp.int32)
  init = (jnp.int32(0), h_BxSxD, h_BxSxD.astype(jnp.float32), policy.init_state(valid_BxW),
          jnp.full((B, S), -1, jnp.int32),
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
    N, W, L, C = self.num_examples, self.num_units, self.cfg.num_layers, self.cfg.num_labels
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
  if not (kind_of(encoded).token_level_exit and kind_of(cfg).token_level_exit):
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
  if not kind_of(cfg).token_level_exit:
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
