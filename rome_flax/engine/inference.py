"""Early-exit inference over a dataset, on the host side: cutting it into pieces, running a jitted
path (`early_exit`) piece by piece with one host sync at the end, and raw-text prediction.

The device paths themselves (latency `while_loop`, throughput scheduler, full model, all exits)
live in `early_exit.py`; this module only feeds them. Datasets are `data.EncodedSplit`s, padded
piece by piece with `data.pad_batch` (the padder and length buckets of training batches), so an
example's results do not depend on which piece it lands in or how long that piece is padded.
Timing is `speed.py`'s job: a `Pass` is what it times.
"""

from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from rome_flax.engine import exit_policy as ep
from rome_flax.engine import scheduler as engine
from rome_flax.io import sharding
from rome_flax.kinds import data
from rome_flax.kinds.kind import kind_of
from rome_flax.model.config import ModelConfig
from rome_flax.engine.early_exit import (ExitResult, all_exits, full_model, latency_exit, prepare_params, throughput_chunk,
                                  throughput_chunks)
from rome_flax.errors import RomeFlaxError


def plan(encoded: data.EncodedSplit, rows_per_piece: int) -> list[dict[str, np.ndarray]]:
  """Cuts a dataset into fixed-size pieces (batches or chunks), longest examples first, each padded
  to its bucketed length by `data.pad_batch` (padding rows repeat a real example: see there).

  Sorting by length keeps padding small; results are per example, so order does not matter.
  """
  if len(encoded) == 0:
    raise RomeFlaxError("no examples to run")
  order = np.argsort(-encoded.lengths, kind="stable")
  return [data.pad_batch(encoded, order[start:start + rows_per_piece], rows_per_piece, repeat_first=True)
          for start in range(0, len(encoded), rows_per_piece)]


def _device_arrays(piece: dict) -> tuple:
  return tuple(jnp.asarray(piece[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))


def _word_mask(piece: dict):
  """A token task's word mask on the device, else None (what the criterion pools words by)."""
  return jnp.asarray(piece["word_mask"]) if "word_mask" in piece else None


class RunResult(NamedTuple):
  logits_NxC: np.ndarray      # [N, C], or word-level [N, W, C] for token exits
  exit_index_N: np.ndarray    # 0-based exit per example (final exit for the full model)
  layer_runs: int             # layers run (latency) / layer batches run (throughput) / batches x L (full)


class Pass:
  """One pass of a jitted path over a dataset: its pieces and the call that runs one piece.

  Calling it runs every piece and syncs with the device once, at the end: that is what
  `speed.compare` times, while `warm_up` (one call per distinct piece shape: compiles) happens
  apart and `collect` (outputs -> per-example arrays) after.
  """

  def __init__(self, pieces: list[dict], fn, num_examples: int, cfg: ModelConfig, num_units: int = 0):
    self.pieces, self.fn, self.num_examples, self.cfg, self.num_units = pieces, fn, num_examples, cfg, num_units
    self.kind = kind_of(cfg)

  def _empty(self) -> tuple[np.ndarray, np.ndarray]:
    """Per-example logits (zeros) and exits (the final exit) to fill."""
    shape = (self.num_examples,) + self.kind.unit_shape(self.num_units) + (self.cfg.num_labels,)
    return np.zeros(shape, np.float32), np.full((self.num_examples,), self.cfg.num_layers - 1, np.int32)

  def warm_up(self) -> None:
    seen = set()
    for piece in self.pieces:
      if piece["input_ids"].shape not in seen:
        seen.add(piece["input_ids"].shape)
        jax.block_until_ready(self.fn(piece))

  def __call__(self, progress=None) -> list:
    return jax.block_until_ready([self.fn(p) for p in (progress(self.pieces) if progress else self.pieces)])

  def collect(self, outputs: list) -> RunResult:
    final_exit = self.cfg.num_layers - 1
    logits, exits = self._empty()
    runs = 0
    for piece, out in zip(self.pieces, outputs):
      rows = piece["example_ids"]
      keep = rows >= 0
      out_logits = self.kind.to_units(out.logits_BxC if isinstance(out, ExitResult) else out, piece, self.num_units)
      logits[rows[keep]] = out_logits[keep]
      if isinstance(out, ExitResult):
        exits[rows[keep]] = np.asarray(out.exit_index_B)[keep]
        runs += int(out.layer_runs)
      else:
        runs += final_exit + 1
    return RunResult(logits, exits, runs)

  def run(self, progress=None) -> RunResult:
    return self.collect(self(progress))


def local_mesh(devices: Optional[int] = None):
  """A 1-D mesh over this process's devices (all, or the first `devices`): what inference spreads over."""
  local = jax.local_devices()
  if devices is not None and not 1 <= devices <= len(local):
    raise RomeFlaxError(f"--devices must be in 1..{len(local)} (this process sees {len(local)}), got {devices}")
  return sharding.data_mesh(local[:devices or len(local)])


def _batch_parallel(prepared, mesh, batch_size: int):
  """(parameters replicated over the mesh, piece -> device arrays split along the batch) for the
  data-parallel paths (all exits, full model); one device: the parameters and arrays as they are."""
  if mesh is None or mesh.size == 1:
    return prepared, _device_arrays
  if batch_size % mesh.size:
    raise RomeFlaxError(f"batch size {batch_size} must be a multiple of the {mesh.size} devices it is split across")
  split = sharding.batch_sharding(mesh)
  return (jax.device_put(prepared, sharding.replicated(mesh)),
          lambda piece: tuple(jax.device_put(a, split) for a in _device_arrays(piece)))


def full_model_pass(prepared, cfg: ModelConfig, encoded: data.EncodedSplit, batch_size: int, mesh=None) -> Pass:
  """The baseline at a batch size: all layers, final exit only (batches split over `mesh`)."""
  params, arrays = _batch_parallel(prepared, mesh, batch_size)
  return Pass(plan(encoded, batch_size), lambda p: full_model(params, cfg, *arrays(p)), len(encoded), cfg,
              _num_units(encoded))


def _num_units(encoded: data.EncodedSplit) -> int:
  return kind_of(encoded).num_units(encoded)


def latency_pass(prepared, cfg: ModelConfig, policy: ep.ExitPolicy, encoded: data.EncodedSplit,
                 batch_size: int = 1) -> Pass:
  """Latency path over a dataset, batch by batch (batch_size 1: classic per-example early exit)."""
  return Pass(plan(encoded, batch_size),
              lambda p: latency_exit(prepared, cfg, policy, *_device_arrays(p), _word_mask(p)),
              len(encoded), cfg, _num_units(encoded))


class AdmissionPass(Pass):
  """The throughput path as a host-driven open engine: admit a batch of rows whenever enough slots are
  free, `engine.run` until B slots are free again, collect the finished slots, repeat (issue 19).

  Unlike closed chunks, which each end with up to one partial batch per layer, slots refill as
  examples exit, so only the very end of the dataset runs partial batches. One host sync per refill.
  Rows are admitted longest first, each padded to the slots' length (the bucket of the longest)."""

  def __init__(self, prepared, cfg: ModelConfig, policy: ep.ExitPolicy, encoded: data.EncodedSplit,
               batch_size: int, slots: int):
    seq = data.bucket_length(int(encoded.lengths.max()), encoded.max_length)
    order = np.argsort(-encoded.lengths, kind="stable")
    pieces = [data.pad_batch(encoded, order[start:start + batch_size], batch_size, repeat_first=True, seq=seq)
              for start in range(0, len(encoded), batch_size)]
    super().__init__(pieces, None, len(encoded), cfg, _num_units(encoded))
    self.prepared, self.policy, self.batch_size, self.slots, self.seq = prepared, policy, batch_size, slots, seq
    self.threshold_BxE = np.broadcast_to(np.asarray(policy.threshold_E), (batch_size, cfg.num_exits))

  def _admit(self, state, piece, slot_B):
    return engine.admit(self.prepared, self.cfg, state, slot_B, piece["input_ids"], piece["attention_mask"],
                        piece["token_type_ids"], piece["attention_mask"].sum(1), self.threshold_BxE,
                        piece.get("word_mask"))

  def warm_up(self) -> None:
    state = self._admit(engine.init(self.cfg, self.slots, self.seq), self.pieces[0],
                        np.full(self.batch_size, self.slots, np.int32))
    jax.block_until_ready(engine.run(self.prepared, self.cfg, self.policy, state, self.batch_size, max_steps=1))

  def __call__(self, progress=None) -> list:
    N, B = self.slots, self.batch_size
    state = engine.init(self.cfg, N, self.seq)
    example_of_N = np.full(N, -1)           # the example each slot holds (running or not yet collected)
    running_N = np.zeros(N, bool)
    words_of_N = np.zeros((N, self.seq), np.int32)
    finished, pieces = [], iter(progress(self.pieces) if progress else self.pieces)
    piece = next(pieces, None)
    while True:
      while piece is not None:
        rows = np.flatnonzero(piece["example_ids"] >= 0)
        free = np.flatnonzero(example_of_N < 0)
        if len(free) < len(rows):
          break
        slot_B = np.full(B, N, np.int32)
        slot_B[rows] = free[:len(rows)]
        state = self._admit(state, piece, slot_B)
        example_of_N[free[:len(rows)]] = piece["example_ids"][rows]
        running_N[free[:len(rows)]] = True
        if "word_mask" in piece:
          words_of_N[free[:len(rows)]] = piece["word_mask"][rows]
        piece = next(pieces, None)
      if not running_N.any():
        break
      state = engine.run(self.prepared, self.cfg, self.policy, state, B,
                         min_free=B if piece is not None else engine.NEVER)
      now_running_N, exit_N, out_N = jax.device_get((state.running_N, state.exit_N, state.out_NxC))
      done_N = running_N & ~now_running_N
      finished.append((example_of_N[done_N], exit_N[done_N], out_N[done_N], words_of_N[done_N]))
      example_of_N[done_N] = -1
      running_N = np.array(now_running_N)
    finished.append(int(state.runs))
    return finished

  def collect(self, outputs: list) -> RunResult:
    *finished, runs = outputs
    logits, exits = self._empty()
    for rows, exit_rows, out_rows, words in finished:
      logits[rows] = self.kind.to_units(out_rows, {"word_mask": words}, self.num_units)
      exits[rows] = exit_rows
    return RunResult(logits, exits, runs)


def throughput_pass(prepared, cfg: ModelConfig, policy: ep.ExitPolicy, encoded: data.EncodedSplit,
                    batch_size: int = 64, chunk_size: Optional[int] = None, mesh=None,
                    admission: bool = False) -> Pass:
  """Throughput path over a dataset: chunks of `chunk_size` examples on device; with a mesh of D
  devices, D chunks at a time, one per device (`early_exit.throughput_chunks`).

  The default chunk is 16 batches (or the whole dataset, rounded up to a batch, if smaller; with D
  devices, 1/D of it): larger chunks leave fewer partial batches (at most one per layer per chunk)
  but hold more hidden states. admission=True: `chunk_size` slots refilled as examples exit
  (`AdmissionPass`), one device.
  """
  devices = 1 if mesh is None else mesh.size
  if batch_size < 1:
    raise RomeFlaxError(f"batch_size must be >= 1, got {batch_size}")
  chunk_size = chunk_size or min(16 * batch_size, -(-len(encoded) // (batch_size * devices)) * batch_size)
  if chunk_size < batch_size:
    raise RomeFlaxError(f"chunk_size ({chunk_size}) must be at least batch_size ({batch_size})")
  if admission:
    if devices > 1:
      raise RomeFlaxError("the admission pass runs on one device; use closed chunks (admission=False) on a mesh")
    return AdmissionPass(prepared, cfg, policy, encoded, batch_size, chunk_size)
  if devices == 1:
    def fn(p):
      return throughput_chunk(prepared, cfg, policy, *_device_arrays(p), jnp.asarray(p["example_ids"] >= 0),
                              batch_size, word_mask_NxS=_word_mask(p))
    return Pass(plan(encoded, chunk_size), fn, len(encoded), cfg, _num_units(encoded))

  params = jax.device_put(prepared, sharding.replicated(mesh))
  split = sharding.batch_sharding(mesh)

  def fn_devices(p):
    valid_DxN = (p["example_ids"] >= 0).reshape(devices, -1)
    arrays = (p["input_ids"], p["attention_mask"], p["token_type_ids"], valid_DxN)
    words = None if "word_mask" not in p else jax.device_put(p["word_mask"], split)
    return throughput_chunks(params, cfg, policy, *(jax.device_put(a, split) for a in arrays), batch_size, mesh,
                             word_mask_DxNxS=words)

  return Pass(_per_device_groups(plan(encoded, chunk_size), devices), fn_devices, len(encoded), cfg,
              _num_units(encoded))


def _per_device_groups(pieces: list[dict], devices: int) -> list[dict]:
  """Consecutive pieces stacked D at a time ([D, N, S] arrays, padded to the group's longest piece;
  a missing piece is all padding), example_ids flattened to D*N in the same order."""
  groups = []
  for start in range(0, len(pieces), devices):
    group = pieces[start:start + devices]
    S = max(p["input_ids"].shape[1] for p in group)
    widen = lambda a: np.pad(a, ((0, 0), (0, S - a.shape[1])))
    blank = {k: np.zeros_like(v) if k != "example_ids" else np.full_like(v, -1) for k, v in group[0].items()}
    group = group + [blank] * (devices - len(group))
    keys = ("input_ids", "attention_mask", "token_type_ids") + (("word_mask",) if "word_mask" in group[0] else ())
    stacked = {k: np.stack([widen(p[k]) for p in group]) for k in keys}
    stacked["example_ids"] = np.concatenate([p["example_ids"] for p in group])
    groups.append(stacked)
  return groups


def exit_logits_of(run_piece, encoded: data.EncodedSplit, batch_size: int, progress=None) -> np.ndarray:
  """Every exit's logits [E,N,C] for a dataset, in dataset order, from `run_piece(piece) -> [E,B,C]`
  over `plan`'s length-sorted pieces; the host reads back once, at the end. The offline sweep's
  cache and the trainer's evaluation both go through here. Token exits: word-level [E,N,W,C]."""
  pieces = plan(encoded, batch_size)
  outputs = [run_piece(piece) for piece in (progress(pieces) if progress else pieces)]
  outputs = jax.device_get(outputs)
  kind, units = kind_of(encoded), _num_units(encoded)
  out = np.zeros((outputs[0].shape[0], len(encoded)) + kind.unit_shape(units) + (outputs[0].shape[-1],), np.float32)
  for piece, logits in zip(pieces, outputs):
    rows = piece["example_ids"]
    keep = rows >= 0
    logits = kind.to_units(logits, piece, units)
    out[:, rows[keep]] = np.asarray(logits)[:, keep]
  return out


def run_all_exits(prepared, cfg: ModelConfig, encoded: data.EncodedSplit, batch_size: int,
                  progress=None, mesh=None) -> np.ndarray:
  """Every exit's logits [E,N,C] for a dataset (the offline sweep's cache), batches split over `mesh`."""
  params, arrays = _batch_parallel(prepared, mesh, batch_size)
  return exit_logits_of(lambda piece: all_exits(params, cfg, *arrays(piece)), encoded, batch_size, progress)


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
  split = data.Split("predict", "predict", texts, list(text_pairs) if text_pairs is not None else None, None,
                     np.arange(len(texts)))
  encoded = data.encode_split(model.tokenizer, split, max_length, is_regression=model.config.is_regression)
  prepared = prepare_params(model.params, dispatch)
  make = throughput_pass if path == "throughput" else latency_pass
  res = make(prepared, model.config, policy, encoded, batch_size).run()
  return Prediction(kind_of(model.config).predictions(res.logits_NxC), res.exit_index_N + 1, res.logits_NxC)
