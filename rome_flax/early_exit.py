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

Layer dispatch. `prepare_params(..., dispatch='switch')` (default) unstacks the layers once and
picks layer i with `lax.switch` over static branches, so weights are read in place;
`dispatch='slice'` keeps the stacked layout and indexes it with the traced i (`model.run_layer`),
which copies the layer's weights each iteration. Measured on CPU with MiniLM at batch 1 (6 layers,
32 tokens, no exit taken): full model 7.9 ms, switch loop 8.4 ms, slice loop 9.5 ms; a full model
that slices stacked weights with static indices took 21.9 ms, so the baseline here also runs on
unstacked weights. bench/early_exit.py --dispatch slice compares the two loops end to end.

All paths call `exit_policy.step`, so they take exactly the decisions that
`exit_policy.decide` takes on an all-exits pass (tests/test_early_exit.py checks it).
"""

from __future__ import annotations

import functools
import time
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rome_flax import exit_policy as ep
from rome_flax import model as model_lib
from rome_flax.config import ModelConfig
from rome_flax.errors import RomeFlaxError

DISPATCHES = ("switch", "slice")


# ----------------------------------------------------------------------------- parameters and layers


def prepare_params(params: dict, dispatch: str = "switch") -> dict:
  """Parameters laid out for a dispatch mode ('switch': per-layer trees; 'slice': stacked as is)."""
  if dispatch not in DISPATCHES:
    raise RomeFlaxError(f"dispatch must be one of {DISPATCHES}, got {dispatch!r}")
  if dispatch == "slice":
    return params
  per_layer = model_lib.unstack_layers(params)
  return {"embeddings": params["embeddings"], "layer_list": per_layer["layers"],
          "exit_list": per_layer["exits"]}


def _static_layer_exit(prepared, cfg: ModelConfig, k: int, h_BxSxD, mask_BxS, bias_Bx1x1xS,
                       with_exit: bool = True):
  """Layer k (+ exit k) with a Python int k."""
  if "layer_list" in prepared:
    h_BxSxD = model_lib.EncoderLayer(cfg).apply({"params": prepared["layer_list"][k]}, h_BxSxD, bias_Bx1x1xS,
                                                True)
    if not with_exit:
      return h_BxSxD, None
    return h_BxSxD, model_lib.ExitHead(cfg).apply({"params": prepared["exit_list"][k]}, h_BxSxD, mask_BxS, True)
  h_BxSxD = model_lib.run_layer(prepared, cfg, k, h_BxSxD, bias_Bx1x1xS)
  if not with_exit:
    return h_BxSxD, None
  return h_BxSxD, model_lib.run_exit(prepared, cfg, k, h_BxSxD, mask_BxS)


def _layer_exit(prepared, cfg: ModelConfig, i, h_BxSxD, mask_BxS, bias_Bx1x1xS):
  """Layer i + exit i with a traced i: `lax.switch` over static branches, or a dynamic slice."""
  if "layer_list" in prepared:
    branches = [functools.partial(_static_layer_exit, prepared, cfg, k) for k in range(cfg.num_layers)]
    return jax.lax.switch(i, branches, h_BxSxD, mask_BxS, bias_Bx1x1xS)
  h_BxSxD = model_lib.run_layer(prepared, cfg, i, h_BxSxD, bias_Bx1x1xS)
  return h_BxSxD, model_lib.run_exit(prepared, cfg, i, h_BxSxD, mask_BxS)


def _embed(prepared, cfg, input_ids_BxS, attention_mask_BxS, token_type_ids_BxS):
  return model_lib.embed(prepared, cfg, input_ids_BxS, attention_mask_BxS, token_type_ids_BxS,
                         deterministic=True)


# ----------------------------------------------------------------------------- jitted paths


class ExitResult(NamedTuple):
  logits_BxC: jax.Array     # float32 logits of the exit each example took
  exit_index_B: jax.Array   # int32, 0-based exit taken
  layer_runs: jax.Array     # int32 []: layer applications on a batch (latency: layers run; throughput: batches)


@functools.partial(jax.jit, static_argnames=("cfg",))
def full_model(prepared, cfg: ModelConfig, input_ids_BxS, attention_mask_BxS, token_type_ids_BxS):
  """Baseline: every layer, final exit only (no highway heads computed). Returns logits [B,C]."""
  mask_BxS = jnp.asarray(attention_mask_BxS, jnp.int32)
  h_BxSxD = _embed(prepared, cfg, input_ids_BxS, mask_BxS, token_type_ids_BxS)
  bias = model_lib.attention_bias(mask_BxS)
  for k in range(cfg.num_layers):
    h_BxSxD, logits_BxC = _static_layer_exit(prepared, cfg, k, h_BxSxD, mask_BxS, bias,
                                             with_exit=k == cfg.num_layers - 1)
  return logits_BxC


@functools.partial(jax.jit, static_argnames=("cfg",))
def all_exits(prepared, cfg: ModelConfig, input_ids_BxS, attention_mask_BxS, token_type_ids_BxS):
  """Every exit's logits [E,B,C] in one pass (what the offline sweep caches)."""
  mask_BxS = jnp.asarray(attention_mask_BxS, jnp.int32)
  h_BxSxD = _embed(prepared, cfg, input_ids_BxS, mask_BxS, token_type_ids_BxS)
  bias = model_lib.attention_bias(mask_BxS)
  logits = []
  for k in range(cfg.num_layers):
    h_BxSxD, logits_BxC = _static_layer_exit(prepared, cfg, k, h_BxSxD, mask_BxS, bias)
    logits.append(logits_BxC)
  return jnp.stack(logits)


@functools.partial(jax.jit, static_argnames=("cfg",))
def latency_exit(prepared, cfg: ModelConfig, policy: ep.ExitPolicy, input_ids_BxS, attention_mask_BxS,
                 token_type_ids_BxS) -> ExitResult:
  """Runs layers until every example of the batch has exited; each keeps its first exit."""
  mask_BxS = jnp.asarray(attention_mask_BxS, jnp.int32)
  B = mask_BxS.shape[0]
  h_BxSxD = _embed(prepared, cfg, input_ids_BxS, mask_BxS, token_type_ids_BxS)
  bias = model_lib.attention_bias(mask_BxS)

  def cond(carry):
    i, _, _, done_B, _, _ = carry
    return (i < cfg.num_layers) & ~jnp.all(done_B)

  def body(carry):
    i, h_BxSxD, state, done_B, exit_B, out_BxC = carry
    h_BxSxD, logits_BxC = _layer_exit(prepared, cfg, i, h_BxSxD, mask_BxS, bias)
    state, exit_now_B = ep.step(policy, state, logits_BxC, i)
    newly_B = exit_now_B & ~done_B
    exit_B = jnp.where(newly_B, i, exit_B)
    out_BxC = jnp.where(newly_B[:, None], logits_BxC.astype(jnp.float32), out_BxC)
    return i + 1, h_BxSxD, state, done_B | exit_now_B, exit_B, out_BxC

  init = (jnp.int32(0), h_BxSxD, ep.init_state((B,)), jnp.zeros((B,), bool), jnp.zeros((B,), jnp.int32),
          jnp.zeros((B, cfg.num_labels), jnp.float32))
  layers_run, _, _, _, exit_B, out_BxC = jax.lax.while_loop(cond, body, init)
  return ExitResult(out_BxC, exit_B, layers_run)


def _pick_layer(counts_L, batch_size):
  """The lowest layer with a full batch waiting, else the lowest layer with anything waiting."""
  has_full = counts_L >= batch_size
  return jnp.where(jnp.any(has_full), jnp.argmax(has_full), jnp.argmax(counts_L > 0)).astype(jnp.int32)


TRIM_LENGTHS = (16, 32, 64, 128, 256, 512)


def trim_lengths(seq_len: int) -> tuple[int, ...]:
  """Lengths a gathered batch may be trimmed to inside a chunk padded to seq_len."""
  return tuple(sorted({min(b, seq_len) for b in TRIM_LENGTHS} | {seq_len}))


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
      return (h_BxSxD.at[:, :s].set(h_cut) if s < S else h_cut), logits_BxC
    return branch

  if "layer_list" in prepared:
    branches = [cut(s, functools.partial(_static_layer_exit, prepared, cfg, j))
                for j in range(cfg.num_layers) for s in lengths]
    return jax.lax.switch(l * len(lengths) + k, branches, h_BxSxD, mask_BxS)
  branches = [cut(s, functools.partial(_layer_exit, prepared, cfg, l)) for s in lengths]
  return jax.lax.switch(k, branches, h_BxSxD, mask_BxS)


@functools.partial(jax.jit, static_argnames=("cfg", "batch_size", "lengths"))
def throughput_chunk(prepared, cfg: ModelConfig, policy: ep.ExitPolicy, input_ids_NxS, attention_mask_NxS,
                     token_type_ids_NxS, valid_N, batch_size: int, lengths: Optional[tuple] = None) -> ExitResult:
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
  h_NxSxD = _embed(prepared, cfg, input_ids_NxS, mask_NxS, token_type_ids_NxS)

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
    state_B, exit_now_B = ep.step(policy, jax.tree.map(lambda x: x[safe_B], state_N), logits_BxC, l)
    put = lambda buf, val: buf.at[idx_B].set(val, mode="drop")
    h_NxSxD = put(h_NxSxD, h_BxSxD.astype(h_NxSxD.dtype))
    next_layer_N = put(next_layer_N, jnp.full((batch_size,), l + 1, jnp.int32))
    state_N = jax.tree.map(put, state_N, state_B)
    done_N = put(done_N, exit_now_B)
    exit_N = put(exit_N, jnp.where(exit_now_B, l, exit_N[safe_B]))
    out_NxC = put(out_NxC, jnp.where(exit_now_B[:, None], logits_BxC.astype(jnp.float32), out_NxC[safe_B]))
    return runs + 1, h_NxSxD, next_layer_N, done_N, state_N, exit_N, out_NxC

  init = (jnp.int32(0), h_NxSxD, jnp.zeros((N,), jnp.int32), ~jnp.asarray(valid_N, bool), ep.init_state((N,)),
          jnp.zeros((N,), jnp.int32), jnp.zeros((N, cfg.num_labels), jnp.float32))
  runs, _, _, _, _, exit_N, out_NxC = jax.lax.while_loop(cond, body, init)
  return ExitResult(out_NxC, exit_N, runs)


# ----------------------------------------------------------------------------- host-side drivers


class Encoded(NamedTuple):
  """Token arrays of a dataset, padded to one length S (rows are examples)."""
  input_ids: np.ndarray       # [N, S] int32
  attention_mask: np.ndarray  # [N, S] int32
  token_type_ids: np.ndarray  # [N, S] int32

  @property
  def num_examples(self) -> int:
    return self.input_ids.shape[0]


def bucket_length(n: int, cap: Optional[int] = None) -> int:
  """Padded length for a longest example of n tokens: the next of TRIM_LENGTHS (as training batches)."""
  n = max(int(n), 1)
  b = next((t for t in TRIM_LENGTHS if t >= n), -(-n // TRIM_LENGTHS[-1]) * TRIM_LENGTHS[-1])
  return min(b, cap) if cap else b


class Piece(NamedTuple):
  rows: np.ndarray    # indices into the dataset; -1 marks padding rows
  arrays: tuple       # (input_ids, attention_mask, token_type_ids), each [rows, S]


def plan(encoded: Encoded, rows_per_piece: int, *, sort_by_length: bool = True) -> list[Piece]:
  """Cuts a dataset into fixed-size pieces (batches or chunks) padded to a bucketed length.

  Sorting by length first keeps padding small; results are per example, so order does not matter.
  """
  N, S = encoded.input_ids.shape
  if N == 0:
    raise RomeFlaxError("no examples to run")
  lengths = encoded.attention_mask.sum(1)
  order = np.argsort(-lengths, kind="stable") if sort_by_length else np.arange(N)
  pieces = []
  for start in range(0, N, rows_per_piece):
    rows = order[start:start + rows_per_piece]
    s = bucket_length(lengths[rows].max(), cap=S)
    pad = rows_per_piece - len(rows)
    take = np.concatenate([rows, np.full(pad, rows[0])]) if pad else rows
    arrays = tuple(np.ascontiguousarray(a[take, :s]).astype(np.int32)
                   for a in (encoded.input_ids, encoded.attention_mask, encoded.token_type_ids))
    pieces.append(Piece(np.concatenate([rows, np.full(pad, -1)]), arrays))
  return pieces


class RunResult(NamedTuple):
  logits_NxC: np.ndarray
  exit_index_N: np.ndarray    # 0-based exit per example (final exit for the full model)
  layer_runs: int             # layers run (latency) / layer batches run (throughput) / batches x L (full)
  seconds: float              # wall clock of the timed pass, compile and warm-up excluded
  warmup_seconds: float       # first call per distinct shape (compile + one run)


def _run(pieces: list[Piece], fn, num_examples: int, num_labels: int, final_exit: int,
         progress=None, warmup: bool = True) -> RunResult:
  """Warm-up (one call per distinct shape, timed apart), then the timed pass; one host sync at the end."""
  t0 = time.perf_counter()
  seen = set()
  for piece in pieces if warmup else ():
    key = tuple(a.shape for a in piece.arrays)
    if key not in seen:
      seen.add(key)
      jax.block_until_ready(fn(piece))
  warmup_seconds = time.perf_counter() - t0
  t0 = time.perf_counter()
  outputs = []
  for piece in (progress(pieces) if progress else pieces):
    outputs.append(fn(piece))
  outputs = jax.block_until_ready(outputs)
  seconds = time.perf_counter() - t0
  logits = np.zeros((num_examples, num_labels), np.float32)
  exits = np.full((num_examples,), final_exit, np.int32)
  runs = 0
  for piece, out in zip(pieces, outputs):
    keep = piece.rows >= 0
    if isinstance(out, ExitResult):
      logits[piece.rows[keep]] = np.asarray(out.logits_BxC)[keep]
      exits[piece.rows[keep]] = np.asarray(out.exit_index_B)[keep]
      runs += int(out.layer_runs)
    else:
      logits[piece.rows[keep]] = np.asarray(out)[keep]
      runs += final_exit + 1
  return RunResult(logits, exits, runs, seconds, warmup_seconds)


def best_of(repeats: int, *runs) -> list[RunResult]:
  """Calls each `run(warmup=...)` `repeats` times, alternating (warm-up in the first round only).

  Returns each run's fastest timed pass, with its first-round warm-up time: side-by-side runs see
  the same machine load, which makes their ratio meaningful on a shared machine.
  """
  best: list[Optional[RunResult]] = [None] * len(runs)
  for r in range(repeats):
    for k, run in enumerate(runs):
      res = run(warmup=r == 0)
      if best[k] is None:
        best[k] = res
      elif res.seconds < best[k].seconds:
        best[k] = res._replace(warmup_seconds=best[k].warmup_seconds)
  return best


def _device_piece(piece: Piece):
  return tuple(jnp.asarray(a) for a in piece.arrays)


def run_full_model(prepared, cfg: ModelConfig, encoded: Encoded, batch_size: int, progress=None,
                   warmup: bool = True) -> RunResult:
  """The baseline at a batch size: all layers, final exit only."""
  pieces = plan(encoded, batch_size)
  fn = lambda p: full_model(prepared, cfg, *_device_piece(p))
  return _run(pieces, fn, encoded.num_examples, cfg.num_labels, cfg.num_layers - 1, progress, warmup)


def run_latency(prepared, cfg: ModelConfig, policy: ep.ExitPolicy, encoded: Encoded, batch_size: int = 1,
                progress=None, warmup: bool = True) -> RunResult:
  """Latency path over a dataset, batch by batch (batch_size 1: classic per-example early exit)."""
  pieces = plan(encoded, batch_size)
  fn = lambda p: latency_exit(prepared, cfg, policy, *_device_piece(p))
  return _run(pieces, fn, encoded.num_examples, cfg.num_labels, cfg.num_layers - 1, progress, warmup)


def run_throughput(prepared, cfg: ModelConfig, policy: ep.ExitPolicy, encoded: Encoded, batch_size: int = 64,
                   chunk_size: Optional[int] = None, progress=None, warmup: bool = True) -> RunResult:
  """Throughput path over a dataset: chunks of `chunk_size` examples on device.

  The default chunk is 16 batches (or the whole dataset, rounded up to a batch, if smaller): larger
  chunks leave fewer partial batches (at most one per layer per chunk) but hold more hidden states.
  """
  if batch_size < 1:
    raise RomeFlaxError(f"batch_size must be >= 1, got {batch_size}")
  chunk_size = chunk_size or min(16 * batch_size, -(-encoded.num_examples // batch_size) * batch_size)
  if chunk_size < batch_size:
    raise RomeFlaxError(f"chunk_size ({chunk_size}) must be at least batch_size ({batch_size})")
  pieces = plan(encoded, chunk_size)

  def fn(p):
    ids, mask, types = _device_piece(p)
    return throughput_chunk(prepared, cfg, policy, ids, mask, types, jnp.asarray(p.rows >= 0), batch_size)

  return _run(pieces, fn, encoded.num_examples, cfg.num_labels, cfg.num_layers - 1, progress, warmup)


def run_all_exits(prepared, cfg: ModelConfig, encoded: Encoded, batch_size: int, progress=None) -> np.ndarray:
  """Every exit's logits [E,N,C] for a dataset (the offline sweep's cache)."""
  pieces = plan(encoded, batch_size)
  out = np.zeros((cfg.num_exits, encoded.num_examples, cfg.num_labels), np.float32)
  for piece in (progress(pieces) if progress else pieces):
    keep = piece.rows >= 0
    out[:, piece.rows[keep]] = np.asarray(all_exits(prepared, cfg, *_device_piece(piece)))[:, keep]
  return out


class Prediction(NamedTuple):
  predictions: np.ndarray   # class ids, or regression values
  exit_layers: np.ndarray   # 1-based layer each example exited at
  logits: np.ndarray        # [N, C] logits of the exit taken


def predict(model, texts, policy: ep.ExitPolicy, text_pairs=None, *, batch_size: int = 64,
            path: str = "throughput", max_length: int = 128, dispatch: str = "switch") -> Prediction:
  """Early-exit predictions for raw texts with a `MultiExitBert` (its tokenizer) and a policy.

  path='throughput' batches exited examples out of the work (best for many texts);
  path='latency' runs batch by batch and stops each batch when all of it has exited.
  """
  if path not in ("throughput", "latency"):
    raise RomeFlaxError(f"path must be 'throughput' or 'latency', got {path!r}")
  if policy.num_exits != model.config.num_exits:
    raise RomeFlaxError(f"policy is for {policy.num_exits} exits, the model has {model.config.num_exits}")
  texts = list(texts)
  if not texts:
    raise RomeFlaxError("no texts to predict")
  arrays = model.encode(texts, text_pairs, max_length=max_length)
  encoded = Encoded(*(np.asarray(arrays[k], np.int32) for k in ("input_ids", "attention_mask", "token_type_ids")))
  prepared = prepare_params(model.params, dispatch)
  run = run_throughput if path == "throughput" else run_latency
  res = run(prepared, model.config, policy, encoded, batch_size, warmup=False)
  preds = res.logits_NxC[:, 0] if model.config.is_regression else res.logits_NxC.argmax(-1)
  return Prediction(preds, res.exit_index_N + 1, res.logits_NxC)
