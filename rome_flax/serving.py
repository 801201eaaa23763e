"""Answering requests with early exit: continuous batching at layer granularity, without HTTP.

`Engine(model, policy, slots=...)` owns one device worker thread that drives the open engine
(engine.py): between two layer batches it admits queued examples into free slots, and as soon as an
example exits its slot is free for the next one, so batches stay full while easy examples leave after
a layer or two. `submit(texts) -> concurrent.futures.Future` is the whole API; `server.py` puts HTTP
on top of it.

What a production queue needs (the trackers of TEI, Triton and vLLM ask for each):
  * a bounded queue: `submit` raises `Overloaded` at once when `max_queue` examples wait;
  * deadlines: a request whose deadline passes is never admitted, and one that is running when it
    passes is evicted from its slots mid-batch; its future fails with `DeadlineExceeded`;
  * cancellation: `future.cancel()` (a client that went away) frees its slots at the next step;
  * one bad request never disturbs the others: inputs are checked (`RequestError`) before queueing;
  * `close(grace_s)` stops taking work, finishes what is queued and running within the grace period,
    then fails the rest.
`full_model=True` is the baseline the load test compares against: the same queue and worker, but
each batch runs the plain full model (all layers, final exit), padded to the smallest of a few batch
sizes and length buckets: dynamic batching as TEI and Triton do it.

The worker drives "steps": `LocalSteps` binds the engine's jitted functions to a model in this process;
`artefact_runtime.ArtefactSteps` offers the same methods from an exported artefact (no rome_flax).
"""

from __future__ import annotations

import collections
import concurrent.futures
import itertools
import math
import threading
import time
from typing import Any, NamedTuple, Optional, Sequence

import numpy as np

from rome_flax.errors import RomeFlaxError


NEVER = 2 ** 30   # run(min_free=NEVER): no free-slot target (engine.NEVER)


class Overloaded(RomeFlaxError):
  """The queue is full (HTTP 429)."""


class DeadlineExceeded(RomeFlaxError):
  """The request's deadline passed before it was answered (HTTP 504)."""


class RequestError(RomeFlaxError):
  """The request itself is wrong (HTTP 400): empty text, over-long input, unknown policy."""


class ShuttingDown(RomeFlaxError):
  """The engine no longer takes work (HTTP 503)."""


def default_sizes(batch: int) -> tuple[int, ...]:
  """Batch sizes a step may cut its batch to: B/16, B/4, B (at low load a step runs 4 rows, not 64)."""
  return tuple(sorted({max(1, batch // 16), max(1, batch // 4), batch}))


class LocalSteps:
  """The open engine's jitted functions bound to a model in this process (what `Engine` drives)."""

  def __init__(self, model, *, slots: int = 256, batch: int = 64, max_length: int = 128,
               sizes: Optional[Sequence[int]] = None):
    from rome_flax import early_exit, engine
    cfg = model.config
    if cfg.is_token_task:
      raise RomeFlaxError("serving covers sentence tasks (classification, regression); this export has token "
                          "exits (sequence labelling), which infer.py runs offline")
    if not 1 <= batch <= slots:
      raise RomeFlaxError(f"need 1 <= batch ({batch}) <= slots ({slots})")
    if not 8 <= max_length <= cfg.max_position_embeddings:
      raise RomeFlaxError(f"max_length must be in 8..{cfg.max_position_embeddings}, got {max_length}")
    self._engine, self._early_exit, self.cfg = engine, early_exit, cfg
    self.params = early_exit.prepare_params(model.params)
    self.num_layers, self.num_exits, self.num_labels = cfg.num_layers, cfg.num_exits, cfg.num_labels
    self.is_regression = cfg.is_regression
    self.slots, self.seq, self.batch = slots, max_length, batch
    self.sizes = tuple(sorted(set(sizes or default_sizes(batch)) | {batch}))
    self.lengths = engine.trim_lengths(max_length)
    self._policies: dict = {}

  def policy(self, criterion: str, delta: float = 0.0):
    """The engine's policy for a criterion: thresholds live in the slots, so only these two matter."""
    key = (criterion, delta)
    if key not in self._policies:
      from rome_flax import exit_policy as ep
      self._policies[key] = ep.make_policy(criterion, 1.0, self.num_exits, num_labels=self.num_labels,
                                           delta=delta if criterion == "patience" and self.is_regression else None)
    return self._policies[key]

  def init(self):
    return self._engine.init(self.cfg, self.slots, self.seq)

  def admit(self, state, slot_B, input_ids_BxS, attention_mask_BxS, token_type_ids_BxS, priority_B, threshold_BxE):
    return self._engine.admit(self.params, self.cfg, state, slot_B, input_ids_BxS, attention_mask_BxS,
                              token_type_ids_BxS, priority_B, threshold_BxE)

  def run(self, state, criterion: str, min_free: int, max_steps: int, delta: float = 0.0):
    return self._engine.run(self.params, self.cfg, self.policy(criterion, delta), state, self.batch, self.lengths,
                            min_free, max_steps, self.sizes, "oldest")

  def evict(self, state, slot_mask_N):
    return self._engine.evict(state, slot_mask_N)

  def read(self, state):
    import jax
    running, exits, out = jax.device_get((state.running_N, state.exit_N, state.out_NxC))
    return np.asarray(running), np.asarray(exits), np.asarray(out)

  def full_model(self, input_ids_bxs, attention_mask_bxs, token_type_ids_bxs):
    return np.asarray(self._early_exit.full_model(self.params, self.cfg, input_ids_bxs, attention_mask_bxs,
                                                  token_type_ids_bxs))


class Policy(NamedTuple):
  """A request's exit rule: the criterion (one per engine) and one threshold per exit."""
  criterion: str
  threshold_E: np.ndarray
  delta: float = 0.0

  def describe(self) -> str:
    t = self.threshold_E[:-1] if len(self.threshold_E) > 1 else self.threshold_E
    shown = f"{float(t[0]):.4g}" if np.all(t == t[0]) else "/".join(f"{float(v):.4g}" for v in t)
    return f"{self.criterion}:{shown}"


def make_policy(spec, num_exits: int, num_labels: int, is_regression: bool, *,
                named: Optional[dict] = None) -> Policy:
  """A Policy from 'entropy:0.3', {'criterion': 'entropy', 'threshold': 0.3, 'min_layer': 2}, a name of
  `named` (calibrated settings), or an `exit_policy.ExitPolicy`. min_layer folds into the thresholds:
  exits before it get a threshold no score meets."""
  from rome_flax import exit_policy as ep
  if isinstance(spec, Policy):
    return spec
  if isinstance(spec, ep.ExitPolicy):
    spec = {"criterion": spec.criterion, "threshold": np.asarray(spec.threshold_E).tolist(),
            "min_layer": spec.min_exit_layer, "delta": float(spec.delta) if spec.is_regression else None}
  if isinstance(spec, str):
    if named and spec in named:
      return named[spec]
    criterion, _, value = spec.partition(":")
    if not value:
      known = f"; named settings: {', '.join(sorted(named))}" if named else ""
      raise RequestError(f"policy {spec!r}: write CRITERION:THRESHOLD, e.g. entropy:0.3{known}")
    try:
      spec = {"criterion": criterion, "threshold": [float(v) for v in value.split("/")]}
    except ValueError:
      raise RequestError(f"policy {spec!r}: the threshold is not a number") from None
  if not isinstance(spec, dict) or "criterion" not in spec or "threshold" not in spec:
    raise RequestError("policy must be 'CRITERION:THRESHOLD', a calibrated setting's name, or "
                       "{\"criterion\": ..., \"threshold\": ...}")
  unknown = set(spec) - {"criterion", "threshold", "min_layer", "delta"}
  if unknown:
    raise RequestError(f"policy has unknown fields: {', '.join(sorted(unknown))}")
  try:
    p = ep.make_policy(str(spec["criterion"]), spec["threshold"], num_exits, num_labels=num_labels,
                       min_exit_layer=int(spec.get("min_layer") or 1), delta=spec.get("delta"))
  except (RomeFlaxError, TypeError, ValueError) as e:
    raise RequestError(f"policy: {e}") from None
  threshold_E = np.asarray(p.threshold_E, np.float32).copy()
  never = {"entropy": -1.0, "maxprob": 2.0, "patience": float(2 ** 30)}[p.criterion]
  threshold_E[:p.min_exit_layer - 1] = never
  return Policy(p.criterion, threshold_E, float(p.delta))


class _Request:
  __slots__ = ("rows", "policy", "deadline", "future", "submitted", "started", "results", "left", "seq")

  def __init__(self, rows, policy, deadline, seq):
    self.rows, self.policy, self.deadline, self.seq = rows, policy, deadline, seq
    self.future: concurrent.futures.Future = concurrent.futures.Future()
    self.submitted, self.started = time.monotonic(), None
    self.results: list = [None] * len(rows)
    self.left = len(rows)


def _pad_rows(rows, num_rows: int, seq: int):
  """Queued (request, row) pairs as right-padded [num_rows, seq] ids, mask and token types (rows past
  len(rows): all zeros)."""
  ids = np.zeros((num_rows, seq), np.int32)
  mask, types = np.zeros_like(ids), np.zeros_like(ids)
  for r, (request, i) in enumerate(rows):
    tokens, token_types = request.rows[i]
    ids[r, :len(tokens)], types[r, :len(tokens)], mask[r, :len(tokens)] = tokens, token_types, 1
  return ids, mask, types


class Prediction(NamedTuple):
  label: Any                    # class id or name; the value for regression
  probabilities: Optional[list]
  exit_layer: int               # 1-based


class Engine:
  """Early-exit serving without HTTP: `submit(texts) -> Future[list[Prediction]]`.

  model: a `MultiExitBert` (with its tokenizer), or prepared steps (`LocalSteps`, an artefact's
  `ArtefactSteps`) with `tokenizer` given. policy: see `make_policy` (default entropy:0.3).
  slots: examples on the device at once; batch: rows per layer batch; max_queue: examples waiting.
  """

  def __init__(self, model=None, policy="entropy:0.3", *, slots: int = 256, batch: int = 64,
               max_length: int = 128, max_queue: int = 1024, timeout_ms: Optional[float] = None,
               full_model: bool = False, steps=None, tokenizer=None, label_names: Sequence[str] = (),
               named_policies: Optional[dict] = None, metrics=None, warm_up: bool = True):
    if steps is None:
      if model is None:
        raise RomeFlaxError("give a model or steps")
      steps = LocalSteps(model, slots=slots, batch=batch, max_length=max_length)
      tokenizer = tokenizer or model.tokenizer
      label_names = label_names or model.export_info.label_names
    if tokenizer is None:
      raise RomeFlaxError("serving needs the model's tokenizer: use an export directory with tokenizer files")
    if max_queue < 1:
      raise RomeFlaxError(f"max_queue must be >= 1, got {max_queue}")
    if timeout_ms is not None and not (math.isfinite(timeout_ms) and timeout_ms > 0):
      raise RomeFlaxError(f"timeout_ms must be a positive number, got {timeout_ms}")
    self.steps, self.tokenizer, self.label_names = steps, tokenizer, tuple(label_names or ())
    self.full_model, self.max_queue, self.timeout_ms = full_model, max_queue, timeout_ms
    self.named_policies = {k: make_policy(v, steps.num_exits, steps.num_labels, steps.is_regression)
                           for k, v in (named_policies or {}).items()}
    self.policy = make_policy(policy, steps.num_exits, steps.num_labels, steps.is_regression,
                              named=self.named_policies)
    for name, p in self.named_policies.items():
      if p.criterion != self.policy.criterion:
        raise RomeFlaxError(f"named policy {name!r} uses {p.criterion}; this engine runs {self.policy.criterion}")
    self.metrics = metrics
    self._pending: collections.deque = collections.deque()   # (request, row index)
    self._cond = threading.Condition()
    self._closing = False
    self._counter = itertools.count()
    self._worker_error: Optional[BaseException] = None
    if warm_up:
      self.warm_up()
    self._thread = threading.Thread(target=self._loop, name="rome_flax-engine", daemon=True)
    self._thread.start()

  # ------------------------------------------------------------------ requests

  def encode(self, texts, text_pairs=None) -> list:
    """Token rows (input ids, token types) for texts; RequestError for what cannot be served."""
    if isinstance(texts, str) or not isinstance(texts, (list, tuple)) or not texts:
      raise RequestError("texts must be a non-empty list of strings")
    if len(texts) > self.steps.slots:
      raise RequestError(f"at most {self.steps.slots} texts per request, got {len(texts)}")
    if any(not isinstance(t, str) or not t.strip() for t in texts):
      raise RequestError("every text must be a non-empty string")
    if text_pairs is not None:
      if not isinstance(text_pairs, (list, tuple)) or len(text_pairs) != len(texts) or any(
          not isinstance(t, str) or not t.strip() for t in text_pairs):
        raise RequestError("text_pairs must be a list of non-empty strings, one per text")
    enc = self.tokenizer(list(texts), list(text_pairs) if text_pairs is not None else None, truncation=False,
                         return_token_type_ids=True, return_attention_mask=False)
    rows = []
    for i, (ids, types) in enumerate(zip(enc["input_ids"], enc["token_type_ids"])):
      if len(ids) > self.steps.seq:
        raise RequestError(f"text {i + 1} is {len(ids)} tokens; this server takes at most {self.steps.seq}")
      rows.append((np.asarray(ids, np.int32), np.asarray(types, np.int32)))
    return rows

  def submit(self, texts, text_pairs=None, *, policy=None, timeout_ms: Optional[float] = None
             ) -> concurrent.futures.Future:
    """Queues texts (or pairs); the future's result is a list of `Prediction`, one per text.
    Raises RequestError (bad input), Overloaded (queue full) or ShuttingDown at once."""
    rows = self.encode(texts, text_pairs)
    p = self.policy if policy is None else make_policy(policy, self.steps.num_exits, self.steps.num_labels,
                                                       self.steps.is_regression, named=self.named_policies)
    if p.criterion != self.policy.criterion:
      raise RequestError(f"this server exits by {self.policy.criterion}; a request may change its thresholds, "
                         f"not the criterion ({p.criterion})")
    timeout_ms = self.timeout_ms if timeout_ms is None else timeout_ms
    if timeout_ms is not None and not (isinstance(timeout_ms, (int, float)) and math.isfinite(timeout_ms)
                                       and timeout_ms > 0):
      raise RequestError(f"timeout_ms must be a positive number, got {timeout_ms!r}")
    deadline = None if timeout_ms is None else time.monotonic() + timeout_ms / 1e3
    with self._cond:
      if self._closing:
        raise ShuttingDown("the server is shutting down")
      if self._worker_error is not None:
        raise RomeFlaxError(f"the engine's worker stopped: {self._worker_error}")
      if len(self._pending) + len(rows) > self.max_queue:
        self._count("rejected", "queue_full")
        raise Overloaded(f"the queue is full ({self.max_queue} examples waiting)")
      request = _Request(rows, p, deadline, next(self._counter))
      self._pending.extend((request, i) for i in range(len(rows)))
      self._cond.notify()
    return request.future

  def predict(self, texts, text_pairs=None, **kw) -> list:
    """submit(...).result(): blocking."""
    return self.submit(texts, text_pairs, **kw).result()

  def queue_size(self) -> int:
    return len(self._pending)

  # ------------------------------------------------------------------ lifecycle

  def warm_up(self) -> None:
    """Compiles every shape the worker will run (before the first request, not during it)."""
    s = self.steps
    if self.full_model:
      for b in s.sizes:
        for length in s.lengths:
          ones = np.ones((b, length), np.int32)
          s.full_model(ones, ones, np.zeros_like(ones))
      return
    state = s.init()
    B = s.batch
    ids = np.ones((B, s.seq), np.int32)
    state = s.admit(state, np.full(B, s.slots, np.int32), ids, ids, np.zeros_like(ids), np.zeros(B, np.int32),
                    np.zeros((B, s.num_exits), np.float32))
    s.read(s.run(state, self.policy.criterion, NEVER, 1, self.policy.delta))

  def close(self, grace_s: float = 30.0) -> None:
    """Stops taking work, lets queued and running requests finish within grace_s, fails the rest."""
    with self._cond:
      self._closing = True
      self._grace_deadline = time.monotonic() + grace_s
      self._cond.notify()
    self._thread.join(grace_s + 30.0)

  @property
  def closing(self) -> bool:
    return self._closing

  # ------------------------------------------------------------------ the worker

  def _count(self, what: str, label: str = "") -> None:
    if self.metrics is not None:
      self.metrics.count(what, label)

  def _take(self, limit: int, now: float) -> list:
    """Up to `limit` queued rows whose requests still want an answer (expired ones fail with 504)."""
    taken = []
    with self._cond:
      while self._pending and len(taken) < limit:
        request, i = self._pending.popleft()
        if request.future.done():
          continue
        if request.deadline is not None and now > request.deadline:
          self._fail(request, DeadlineExceeded("the request's deadline passed while it was queued"), "deadline")
          continue
        if request.started is None:
          request.started = now
          if self.metrics is not None:
            self.metrics.observe_queue(now - request.submitted)
        taken.append((request, i))
    return taken

  def _fail(self, request: _Request, error: Exception, label: str) -> None:
    if not request.future.done():
      request.future.set_exception(error)
      self._count("rejected", label)

  def _deliver(self, request: _Request, i: int, exit_index: int, logits_C: np.ndarray) -> None:
    if request.future.done():
      return
    if self.steps.is_regression:
      label, probs = float(logits_C[0]), None
    else:
      z = logits_C.astype(np.float64)
      e = np.exp(z - z.max())
      probs = (e / e.sum()).tolist()
      k = int(np.argmax(logits_C))
      label = self.label_names[k] if k < len(self.label_names) else k
    request.results[i] = Prediction(label, probs, int(exit_index) + 1)
    if self.metrics is not None:
      self.metrics.observe_exit(int(exit_index) + 1)
    request.left -= 1
    if request.left == 0:
      request.future.set_result(request.results)

  def _loop(self) -> None:
    try:
      self._run_full() if self.full_model else self._run_early()
    except BaseException as e:   # the worker must never die silently: fail everything queued
      self._worker_error = e
      with self._cond:
        for request, _ in list(self._pending):
          self._fail(request, RomeFlaxError(f"the engine's worker stopped: {e}"), "error")
        self._pending.clear()
      raise

  def _wait_for_work(self, busy: bool) -> bool:
    """Blocks while there is nothing to do; False once closing and drained (or past the grace)."""
    with self._cond:
      while not self._pending and not busy:
        if self._closing:
          return False
        self._cond.wait(0.05)
      if self._closing and time.monotonic() > self._grace_deadline:
        for request, _ in list(self._pending):
          self._fail(request, ShuttingDown("the server shut down before this request ran"), "shutdown")
        self._pending.clear()
        return busy
    return True

  def _run_early(self) -> None:
    s, N, B, E = self.steps, self.steps.slots, self.steps.batch, self.steps.num_exits
    state = s.init()
    slot_of: list = [None] * N      # (request, row) per busy slot
    free = collections.deque(range(N))
    while True:
      busy = len(free) < N
      if not self._wait_for_work(busy):
        return
      if self._closing and time.monotonic() > self._grace_deadline:
        for slot, held in enumerate(slot_of):
          if held is not None:
            self._fail(held[0], ShuttingDown("the server shut down before this request finished"), "shutdown")
        return
      now = time.monotonic()
      while free:
        rows = self._take(min(B, len(free)), now)
        if not rows:
          break
        slot_B = np.full(B, N, np.int32)
        ids, mask, types = _pad_rows(rows, B, s.seq)
        priority_B, threshold_BxE = np.zeros(B, np.int32), np.zeros((B, E), np.float32)
        for r, (request, i) in enumerate(rows):
          slot = free.popleft()
          slot_B[r], slot_of[slot] = slot, (request, i)
          priority_B[r] = -(request.seq % (2 ** 31 - 1))
          threshold_BxE[r] = request.policy.threshold_E
        state = s.admit(state, slot_B, ids, mask, types, priority_B, threshold_BxE)
      if len(free) == N:
        continue
      # Until one more slot is free (an example finished), at most L layer batches: one host round trip per
      # finished example rather than per layer batch (the default run's model at 70 % load: p50 14.1 -> 12.1 ms).
      state = s.run(state, self.policy.criterion, len(free) + 1, s.num_layers, self.policy.delta)
      running_N, exit_N, out_N = s.read(state)
      if self.metrics is not None:
        self.metrics.set_state(len(self._pending), int(running_N.sum()), N)
      now = time.monotonic()
      evict = np.zeros(N, bool)
      for slot, held in enumerate(slot_of):
        if held is None:
          continue
        request, i = held
        if not running_N[slot]:
          self._deliver(request, i, exit_N[slot], out_N[slot])
        elif request.future.done() or (request.deadline is not None and now > request.deadline):
          if not request.future.done():
            self._fail(request, DeadlineExceeded("the request's deadline passed while it ran"), "deadline")
          evict[slot] = True
        else:
          continue
        slot_of[slot] = None
        free.append(slot)
      if evict.any():
        state = s.evict(state, evict)

  def _run_full(self) -> None:
    s, B = self.steps, self.steps.batch
    while True:
      if not self._wait_for_work(False):
        return
      if self._closing and time.monotonic() > self._grace_deadline:
        return
      rows = self._take(B, time.monotonic())
      if not rows:
        continue
      b = next(size for size in s.sizes if size >= len(rows))
      longest = max(len(request.rows[i][0]) for request, i in rows)
      length = next((x for x in s.lengths if x >= longest), s.lengths[-1])
      ids, mask, types = _pad_rows(rows, b, length)
      mask[len(rows):, 0] = 1   # padding rows attend to one token (no all-padding softmax)
      if self.metrics is not None:
        self.metrics.set_state(len(self._pending), len(rows), b)
      logits = s.full_model(ids, mask, types)
      now = time.monotonic()
      for r, (request, i) in enumerate(rows):
        if request.deadline is not None and now > request.deadline:
          self._fail(request, DeadlineExceeded("the request's deadline passed while it ran"), "deadline")
        else:
          self._deliver(request, i, s.num_layers - 1, logits[r])
