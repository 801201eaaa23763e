"""Early-exit inference over a dataset, on the host side: cutting it into pieces, running a jitted
path (`early_exit`) piece by piece with one host sync at the end, timing, and raw-text prediction.

The device paths themselves (latency `while_loop`, throughput scheduler, full model, all exits)
live in `early_exit.py`; this module only feeds them.
"""

from __future__ import annotations

import time
from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rome_flax import exit_policy as ep
from rome_flax.config import ModelConfig
from rome_flax.early_exit import (ExitResult, TRIM_LENGTHS, all_exits, full_model, latency_exit,
                                  prepare_params, throughput_chunk)
from rome_flax.errors import RomeFlaxError



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
