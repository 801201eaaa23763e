"""Answering requests with early exit: continuous batching at layer granularity, without HTTP.

`Engine(model, policy, slots=...)` owns one device worker thread that drives the open engine
(scheduler.py): between two layer batches it admits queued examples into free slots, and as soon as an
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
What differs between task kinds (kinds/kind.py) the engine asks the model's kind (`kinds.kind_of_steps`): the request's
payload (texts or word lists), what the slots take besides the pieces (the word mask), each row's answer
(`Prediction`, `WordPredictions`), and the server's default policy.
"""

from __future__ import annotations

import collections
import concurrent.futures
import inspect
import itertools
import json
import logging
import math
import threading
import time
from typing import NamedTuple, Optional, Sequence

import numpy as np

from rome_flax.errors import RequestError, RomeFlaxError
from rome_flax.kinds.kind import Prediction, TaskKind, WordPredictions, kind_of, kind_of_steps

# Prediction, WordPredictions (the kinds' answers) and RequestError (errors.py: the kinds raise it) are re-exported.
__all__ = ("Engine", "LocalSteps", "Policy", "Prediction", "WordPredictions", "make_policy", "NEVER",
           "Overloaded", "DeadlineExceeded", "RequestError", "ShuttingDown", "default_sizes", "run_tiers",
           "rust_tokenizer")


log = logging.getLogger(__name__)
NEVER = 2 ** 30   # run(min_free=NEVER): no free-slot target (engine.NEVER)
DEFAULT_BATCH = 64   # rows per layer batch (the server's --max_batch); slots default to 4 x it


class Overloaded(RomeFlaxError):
  """The queue is full (HTTP 429)."""


class DeadlineExceeded(RomeFlaxError):
  """The request's deadline passed before it was answered (HTTP 504)."""


class ShuttingDown(RomeFlaxError):
  """The engine no longer takes work (HTTP 503)."""


def default_sizes(batch: int) -> tuple[int, ...]:
  """Batch sizes of admission, of the full model's forwards and of the cuts of a step's batch: 1, B/16,
  B/4, B (one request alone runs one row: the full model on one CoNLL-2003 sentence of 18 pieces
  24.1 -> 10.3 ms, MiniLM, AMD EPYC)."""
  return tuple(sorted({1, max(1, batch // 16), max(1, batch // 4), batch}))


def run_tiers(sizes: tuple, batch: int) -> tuple[tuple[int, tuple], ...]:
  """(rows gathered, cut sizes) of an in-process engine run by how many slots are busy, fewest first: up to
  the second-smallest size, a run gathers that many rows and cuts to the sizes up to it; else all `batch`
  rows, cut to every size but a leading 1. A step reads and writes back every row it gathers, example or
  not: with one CoNLL-2003 sentence running (TOKEE, MiniLM, AMD EPYC) six steps took 17.4 ms gathering 64
  rows and 9.9 ms gathering 4. The full tier leaves the one-row cut to the small tier: each cut is compiled
  for every view and active-piece buffer. Artefacts export a run per tier (`artefact_runtime.pick_tier`
  picks one, as `LocalSteps.tier` does)."""
  if len(sizes) < 3:
    return ((batch, tuple(sizes)),)
  return ((sizes[1], tuple(sizes[:2])), (batch, tuple(sizes[1:] if sizes[0] == 1 else sizes)))


class LocalSteps:
  """The open engine's jitted functions bound to a model in this process (what `Engine` drives)."""

  def __init__(self, model, *, slots: int = 4 * DEFAULT_BATCH, batch: int = DEFAULT_BATCH, max_length: int = 128,
               sizes: Optional[Sequence[int]] = None, window: Optional[int] = None, dispatch: Optional[str] = None):
    from rome_flax.engine import early_exit, scheduler as engine
    cfg = model.config
    if not 1 <= batch <= slots:
      raise RomeFlaxError(f"need 1 <= batch ({batch}) <= slots ({slots})")
    if not 8 <= max_length <= cfg.max_position_embeddings:
      raise RomeFlaxError(f"max_length must be in 8..{cfg.max_position_embeddings}, got {max_length}")
    self._engine, self._early_exit, self.cfg = engine, early_exit, cfg
    # Layers: per-layer weights (`early_exit.prepare_params`). Sentence exits run a `lax.switch` branch per
    # layer, reading its weights in place; TOKEE's step compiles a body per cut and active-piece buffer, so it
    # runs one body on the layer picked once a step (`model.layer_alone`): a branch per layer made the
    # CoNLL-2003 server's warm-up 204 s, one body 80-86 s. Picked from per-layer weights by a switch, where it
    # was sliced from stacked ones (both copy the layer; latency and warm-up level within the noise): one
    # layout for TOKEE, the full model and an exported artefact (docs/results.md, 2026-12-05, second session).
    self.dispatch = dispatch or "switch"
    self.params = early_exit.prepare_params(model.params, self.dispatch)
    self._full_params = None if self.dispatch == "slice" else self.params
    self.num_layers, self.num_exits, self.num_labels = cfg.num_layers, cfg.num_exits, cfg.num_labels
    self.kind = kind_of(cfg)
    self.is_regression = self.kind.is_regression
    from rome_flax.engine import token_policy as tp
    self.window = tp.serving_window(window, self.kind.token_level_exit, cfg.num_layers)   # TOKEE's (static)
    self.slots, self.seq, self.batch = slots, max_length, batch
    self.sizes = tuple(sorted(set(sizes or default_sizes(batch)) | {batch}))
    self.tiers = run_tiers(self.sizes, batch)
    self.lengths = engine.trim_lengths(max_length)
    self._policies: dict = {}

  def policy(self, criterion: str, delta: float = 0.0):
    """The engine's policy for a criterion: thresholds live in the slots, so only these two matter
    (and, for TOKEE, the server's window)."""
    key = (criterion, delta)
    if key not in self._policies:
      from rome_flax.engine import exit_policy as ep
      from rome_flax.engine import token_policy as tp
      if criterion == "tokee":
        self._policies[key] = tp.make_token_policy(1.0, self.window, self.num_layers)
      else:
        self._policies[key] = ep.policy_for(self.cfg, criterion, 1.0,
                                            delta=delta if criterion == "patience" and self.is_regression else None)
    return self._policies[key]

  def init(self, tokee: bool = False):
    return self._engine.init(self.cfg, self.slots, self.seq, tokee)

  def admit(self, state, slot_B, input_ids_BxS, attention_mask_BxS, token_type_ids_BxS, priority_B, threshold_BxE,
            word_mask_BxS=None):
    return self._engine.admit(self.params, self.cfg, state, slot_B, input_ids_BxS, attention_mask_BxS,
                              token_type_ids_BxS, priority_B, threshold_BxE, word_mask_BxS)

  def run(self, state, criterion: str, min_free: int, max_steps: int, delta: float = 0.0,
          longest: Optional[int] = None, busy: Optional[int] = None):
    """Layer batches until `min_free` slots are free or `max_steps` ran. longest: no running example, and
    none admitted before the next call, has more pieces (the steps then touch only that much of each slot:
    `scheduler.run`'s view); None: the slots' whole length. busy: no more slots are in use (`run_tiers`)."""
    view = None if longest is None else self._engine.view_for(self.lengths, longest)
    batch, sizes = self.tier(busy)
    return self._engine.run(self.params, self.cfg, self.policy(criterion, delta), state, batch, self.lengths,
                            min_free, max_steps, sizes, "oldest", view)

  def tier(self, busy: Optional[int] = None) -> tuple[int, tuple]:
    """(rows gathered, cut sizes) of a run with at most `busy` slots in use (`run_tiers`; None: the full tier)."""
    from rome_flax.engine.artefact_runtime import pick_tier
    return pick_tier(self.tiers, busy)

  def evict(self, state, slot_mask_N):
    return self._engine.evict(state, slot_mask_N)

  def read(self, state):
    """(running_N, exits, out): exits per slot [N] and its exit's logits ([N, C]; a token task's [N, S, C]
    per piece), or with TOKEE each word's exit [N, W] and logits [N, W, C], words first."""
    import jax
    exits = state.exit_N if state.tokee is None else state.tokee.word_exit_NxW
    running, exits, out = jax.device_get((state.running_N, exits, state.out_NxC))
    return np.asarray(running), np.asarray(exits), np.asarray(out)

  def full_model(self, input_ids_bxs, attention_mask_bxs, token_type_ids_bxs):
    if self._full_params is None:   # per-layer weights: a static slice of the stacked ones is a copy
      self._full_params = self._early_exit.prepare_params(self.params, "switch")
    return np.asarray(self._early_exit.full_model(self._full_params, self.cfg, input_ids_bxs, attention_mask_bxs,
                                                  token_type_ids_bxs))


class Policy(NamedTuple):
  """A request's exit rule: the criterion (one per engine) and one threshold per exit (TOKEE: tau_l of
  each layer, the window is the server's)."""
  criterion: str
  threshold_E: np.ndarray
  delta: float = 0.0

  def describe(self) -> str:
    t = self.threshold_E[:-1] if len(self.threshold_E) > 1 else self.threshold_E
    if self.criterion == "tokee":   # tau in the lower half of the layers (the upper half: doubled by default)
      t = self.threshold_E[:max(1, len(self.threshold_E) // 2)]
    shown = f"{float(t[0]):.4g}" if np.all(t == t[0]) else "/".join(f"{float(v):.4g}" for v in t)
    return f"{self.criterion}:{shown}"


def make_policy(spec, num_exits: int, num_labels: int, is_regression: Optional[bool] = None, *,
                kind: Optional[TaskKind] = None, named: Optional[dict] = None, window: Optional[int] = None) -> Policy:
  """A Policy from 'entropy:0.3', {'criterion': 'entropy', 'threshold': 0.3, 'min_layer': 2}, a name of
  `named` (calibrated settings), an `exit_policy.ExitPolicy` or a `token_policy.TokenPolicy`. min_layer
  folds into the thresholds: exits before it get a threshold no score meets. kind: the model's task kind
  (as `exit_policy.make_policy`). window: the server's TOKEE window (a token task's server; None: no TOKEE).
  is_regression: how callers named a regression before `kind` (kept so that they work; one label already says it)."""
  from rome_flax.engine import exit_policy as ep
  from rome_flax.engine import token_policy as tp
  if isinstance(spec, Policy):
    return spec
  if isinstance(spec, tp.TokenPolicy):
    spec = {"criterion": "tokee", "threshold": np.asarray(spec.threshold_L).tolist(), "window": spec.window}
  if isinstance(spec, ep.ExitPolicy):
    if spec.pool not in (None, "max"):   # the engine's SENTEE pools by max
      raise RomeFlaxError(f"the server pools a sentence's words by max (SENTEE); this setting pools by {spec.pool}")
    spec = {"criterion": spec.criterion, "threshold": np.asarray(spec.threshold_E).tolist(),
            "min_layer": spec.min_exit_layer, "delta": float(spec.delta) if spec.is_regression else None}
  if isinstance(spec, str) and spec.lstrip().startswith("{"):   # the request body's object form, e.g. from --policy
    try:
      spec = json.loads(spec)
    except ValueError as e:
      raise RequestError(f"policy {spec!r} is not a JSON object: {e}") from None
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
  if spec["criterion"] == "tokee":
    return _token_policy(spec, num_exits, window)
  unknown = set(spec) - {"criterion", "threshold", "min_layer", "delta"}
  if unknown:
    raise RequestError(f"policy has unknown fields: {', '.join(sorted(unknown))}")
  try:
    p = ep.make_policy(str(spec["criterion"]), spec["threshold"], num_exits, num_labels=num_labels, kind=kind,
                       min_exit_layer=int(spec.get("min_layer") or 1), delta=spec.get("delta"))
  except (RomeFlaxError, TypeError, ValueError) as e:
    raise RequestError(f"policy: {e}") from None
  threshold_E = np.asarray(p.threshold_E, np.float32).copy()
  never = {"entropy": -1.0, "maxprob": 2.0, "patience": float(2 ** 30)}[p.criterion]
  threshold_E[:p.min_exit_layer - 1] = never
  return Policy(p.criterion, threshold_E, float(p.delta))


def _token_policy(spec: dict, num_layers: int, window: Optional[int]) -> Policy:
  """TOKEE's Policy: one tau (doubled in the upper half of the layers) or one per layer; the window is
  the server's (it shapes the compiled step), so a request may restate it, not change it."""
  from rome_flax.engine import token_policy as tp
  if window is None:
    raise RequestError("policy: tokee (token-level early exit) is for token tasks; this server labels sentences")
  unknown = set(spec) - {"criterion", "threshold", "window"}
  if unknown:
    raise RequestError(f"policy has unknown fields for tokee: {', '.join(sorted(unknown))}")
  if spec.get("window", window) != window:
    raise RequestError(f"policy: this server's TOKEE window is {window}; a request may change tau, not the window")
  try:
    p = tp.make_token_policy(spec["threshold"], window, num_layers)
  except (RomeFlaxError, TypeError, ValueError) as e:
    raise RequestError(f"policy: {e}") from None
  return Policy("tokee", np.asarray(p.threshold_L, np.float32).copy(), 0.0)


class _Request:
  __slots__ = ("rows", "policy", "deadline", "future", "submitted", "started", "results", "left", "seq")

  def __init__(self, rows, policy, deadline, seq):
    self.rows, self.policy, self.deadline, self.seq = rows, policy, deadline, seq
    self.future: concurrent.futures.Future = concurrent.futures.Future()
    self.submitted, self.started = time.monotonic(), None
    self.results: list = [None] * len(rows)
    self.left = len(rows)


def rust_tokenizer(tokenizer):
  """The Rust `tokenizers.Tokenizer` behind a fast transformers tokenizer (a copy, truncation and padding
  off), or None for a slow one. The server calls its `encode` per text: the wrapper's __call__ ends in
  `encode_batch`, which hands even one text to a thread pool, and on 2 busy cores waiting for that pool was
  40 % of the event loop's busy time at saturation (py-spy, the default run's export, ~900 requests/s, AMD
  EPYC). Same ids and token types (tests/test_serving.py compares them)."""
  backend = getattr(tokenizer, "backend_tokenizer", None)
  if backend is None:
    return None
  from tokenizers import Tokenizer
  copy = Tokenizer.from_str(backend.to_str())
  copy.no_truncation()
  copy.no_padding()
  return copy


def _pad_rows(rows, num_rows: int, seq: int):
  """Queued (request, row) pairs as right-padded [num_rows, seq] ids, mask, token types and word mask
  (a token task's rows carry their words' first pieces; rows past len(rows): all zeros)."""
  ids = np.zeros((num_rows, seq), np.int32)
  mask, types, words = np.zeros_like(ids), np.zeros_like(ids), np.zeros_like(ids)
  for r, (request, i) in enumerate(rows):
    tokens, token_types, *starts = request.rows[i]
    ids[r, :len(tokens)], types[r, :len(tokens)], mask[r, :len(tokens)] = tokens, token_types, 1
    if starts:
      words[r, starts[0]] = 1
  return ids, mask, types, words


class Engine:
  """Early-exit serving without HTTP: `submit(texts) -> Future[list[Prediction]]`.

  model: a `MultiExitBert` (with its tokenizer), or prepared steps (`LocalSteps`, an artefact's
  `ArtefactSteps`) with `tokenizer` given. policy: see `make_policy` (default entropy:0.3).
  slots: examples on the device at once; batch: rows per layer batch; max_queue: examples waiting.
  warm_up: True ('all'): every shape the worker runs is compiled before it starts; 'background': the
  admissions and the run over whole slots at the full tier before, every other view and tier in a thread
  while the engine serves (a run whose own is not compiled yet takes the whole slots: the same answers up to
  float rounding, slower steps; `warm` says when all are); False: none (each compiles on first use).
  """

  def __init__(self, model=None, policy="entropy:0.3", *, slots: int = 4 * DEFAULT_BATCH, batch: int = DEFAULT_BATCH,
               max_length: int = 128, max_queue: int = 1024, timeout_ms: Optional[float] = None,
               full_model: bool = False, steps=None, tokenizer=None, label_names: Sequence[str] = (),
               named_policies: Optional[dict] = None, metrics=None, warm_up=True):
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
    if warm_up not in (True, False, "all", "background"):
      raise RomeFlaxError(f"warm_up must be 'all', 'background' or False, got {warm_up!r}")
    self.steps, self.tokenizer, self.label_names = steps, tokenizer, tuple(label_names or ())
    self._rust_tokenizer = rust_tokenizer(tokenizer)
    self.full_model, self.max_queue, self.timeout_ms = full_model, max_queue, timeout_ms
    self.kind = kind_of_steps(steps)
    self.window = getattr(steps, "window", None)   # TOKEE's (LocalSteps: None unless the kind has token exits)
    # An artefact's own runtime copy may predate the views (its run takes no `longest`) or the tiers (no `busy`):
    # the engine passes what the steps' run takes.
    self._run_takes_longest = "longest" in inspect.signature(steps.run).parameters
    self._run_takes_busy = "busy" in inspect.signature(steps.run).parameters
    self.named_policies = {k: self._make_policy(v) for k, v in (named_policies or {}).items()}
    self.policy = self._make_policy(policy, named=self.named_policies)
    for name, p in self.named_policies.items():
      if p.criterion != self.policy.criterion:
        raise RomeFlaxError(f"named policy {name!r} uses {p.criterion}; this engine runs {self.policy.criterion}")
    exported = getattr(steps, "criteria", None)   # an artefact runs the criteria it was exported with
    if not full_model and exported is not None and self.policy.criterion not in exported:
      raise RomeFlaxError(f"policy {self.policy.criterion}: this artefact was exported with the criteria "
                          f"{', '.join(exported)} (python -m rome_flax export --criteria)")
    self.metrics = metrics
    self._pending: collections.deque = collections.deque()   # (request, row index)
    self._cancelled = 0    # requests cancelled since the queue was last compacted
    self._cond = threading.Condition()
    self._closing = False
    self._counter = itertools.count()
    self._worker_error: Optional[BaseException] = None
    self._warm_runs: Optional[set] = None   # (view, rows) of the runs compiled so far; None: every one
    self.warm_up_error: Optional[str] = None   # why a background warm-up stopped (runs then keep falling back)
    self._warm_thread: Optional[threading.Thread] = None
    later = []
    if warm_up == "background" and not full_model:
      *later, first = self._run_shapes()   # the whole slots at the full tier first: every run can fall back on it
      self.warm_up(runs=[first])
      self._warm_runs = {self._run_key(*first)} if later else None
    elif warm_up:
      self.warm_up()
    self._thread = threading.Thread(target=self._loop, name="rome_flax-engine", daemon=True)
    self._thread.start()
    if later:
      self._warm_thread = threading.Thread(target=self._warm_up_rest, args=(later,), name="rome_flax-warm-up",
                                           daemon=True)
      self._warm_thread.start()

  # ------------------------------------------------------------------ requests

  def _make_policy(self, spec, named: Optional[dict] = None) -> Policy:
    s = self.steps
    return make_policy(spec, s.num_exits, s.num_labels, kind=self.kind, named=named, window=self.window)

  def encode_words(self, sentences) -> list:
    """Token rows (input ids, token types, each word's first piece) for sentences given as word lists."""
    from rome_flax.kinds import data
    if isinstance(sentences, str) or not isinstance(sentences, (list, tuple)) or not sentences:
      raise RequestError("tokens must be a non-empty list of sentences, each a list of words")
    if len(sentences) > self.steps.slots:
      raise RequestError(f"at most {self.steps.slots} sentences per request, got {len(sentences)}")
    for i, words in enumerate(sentences):
      if isinstance(words, str) or not isinstance(words, (list, tuple)) or not words or any(
          not isinstance(w, str) or not w.strip() for w in words):
        raise RequestError(f"sentence {i + 1}: give a non-empty list of non-empty words (strings)")
    try:
      enc = data.encode_token_split(self.tokenizer, [list(w) for w in sentences], None, self.steps.seq)
    except RomeFlaxError as e:
      raise RequestError(str(e).replace("raise --max_length", "the server's --max_length is the limit")) from None
    return [(ids, types, starts) for ids, types, starts in zip(enc.input_ids, enc.token_type_ids, enc.word_starts)]

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
    if self._rust_tokenizer is not None:
      encode = self._rust_tokenizer.encode
      pairs = [None] * len(texts) if text_pairs is None else text_pairs
      encoded = [(e.ids, e.type_ids) for e in (encode(a, b, add_special_tokens=True) for a, b in zip(texts, pairs))]
    else:
      enc = self.tokenizer(list(texts), list(text_pairs) if text_pairs is not None else None, truncation=False,
                           return_token_type_ids=True, return_attention_mask=False)
      encoded = zip(enc["input_ids"], enc["token_type_ids"])
    rows = []
    for i, (ids, types) in enumerate(encoded):
      if len(ids) > self.steps.seq:
        raise RequestError(f"text {i + 1} is {len(ids)} tokens; this server takes at most {self.steps.seq}")
      rows.append((np.asarray(ids, np.int32), np.asarray(types, np.int32)))
    return rows

  def submit(self, texts=None, text_pairs=None, *, tokens=None, policy=None, timeout_ms: Optional[float] = None
             ) -> concurrent.futures.Future:
    """Queues texts (or pairs), or for a token task `tokens` (sentences as word lists); the future's result
    is a list with one `Prediction` per text, or one `WordPredictions` per sentence (the kind's answer).
    Raises RequestError (bad input), Overloaded (queue full) or ShuttingDown at once."""
    rows = self.kind.request_rows(self, texts, text_pairs, tokens)
    p = self.policy if policy is None else self._make_policy(policy, named=self.named_policies)
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
      if len(self._pending) + len(rows) > self.max_queue and self._cancelled:
        # Cancelled requests' rows do not hold places: dropped here, once per batch of cancellations.
        self._pending = collections.deque(item for item in self._pending if not item[0].future.done())
        self._cancelled = 0
      if len(self._pending) + len(rows) > self.max_queue:
        self._count("rejected", "queue_full")
        raise Overloaded(f"the queue is full ({self.max_queue} examples waiting)")
      request = _Request(rows, p, deadline, next(self._counter))
      request.future.add_done_callback(self._note_cancelled)
      self._pending.extend((request, i) for i in range(len(rows)))
      self._cond.notify()
    return request.future

  def _note_cancelled(self, future: concurrent.futures.Future) -> None:
    if future.cancelled():
      with self._cond:
        self._cancelled += 1

  def predict(self, texts=None, text_pairs=None, **kw) -> list:
    """submit(...).result(): blocking."""
    return self.submit(texts, text_pairs, **kw).result()

  def queue_size(self) -> int:
    return len(self._pending)

  # ------------------------------------------------------------------ lifecycle

  @property
  def warm(self) -> bool:
    """No background warm-up is under way or stopped short: False until it has compiled every run (with
    warm_up=False, shapes compile on first use)."""
    return self._warm_runs is None

  def _run_shapes(self) -> list[tuple[int, int]]:
    """(longest, busy) of a run under each view of the slots and tier of busy slots, smallest first."""
    s = self.steps
    views = s.lengths if self._run_takes_longest else [s.seq]
    busies = [rows for rows, _ in s.tiers] if self._run_takes_busy else [s.slots]
    return [(longest, busy) for longest in views for busy in busies]

  def _run_key(self, longest: int, busy: int) -> tuple[int, int]:
    """The compiled run that `_run_slots(longest, busy)` takes: (view, rows gathered), by the steps' rules."""
    from rome_flax.engine.artefact_runtime import pick_tier
    from rome_flax.engine.scheduler import view_for
    s = self.steps
    view = view_for(s.lengths, longest) if self._run_takes_longest else s.seq
    return view, (pick_tier(s.tiers, busy)[0] if self._run_takes_busy else s.batch)

  def _warm_up_rest(self, shapes) -> None:
    """The background warm-up: each run compiled on a state of its own (empty slots: one cheap step), the
    engine told as each is ready; the smallest views first, which short requests take. The state goes through
    an admission first, as the worker's does (tests/test_serving.py checks that the worker then neither traces
    nor compiles)."""
    try:
      state = self._admit_padding(self._init_state(), self.steps.sizes[0], self.steps.lengths[0])
      for longest, busy in shapes:
        if self._closing:
          return
        state = self._run(state, NEVER, 1, longest, busy)
        self._warm_runs.add(self._run_key(longest, busy))
      self._warm_runs = None
    except Exception as e:   # the worker goes on with what compiled (the whole slots, at least)
      self.warm_up_error = f"{type(e).__name__}: {e}"
      log.warning("background warm-up stopped: %s", self.warm_up_error)

  def _admit_padding(self, state, b: int, length: int):
    """Admits b padding rows (slot N: dropped) of `length` positions: compiles that admission bucket."""
    s = self.steps
    ids = np.ones((b, length), np.int32)
    return s.admit(state, np.full(b, s.slots, np.int32), ids, ids, np.zeros_like(ids), np.zeros(b, np.int32),
                   np.zeros((b, s.num_exits), np.float32), *self.kind.slot_inputs(ids))

  def warm_up(self, runs: Optional[Sequence[tuple[int, int]]] = None) -> None:
    """Compiles every shape the worker will run (before the first request, not during it); runs: only
    these (longest, busy) runs of the slots (the admissions always)."""
    s = self.steps
    if self.full_model:
      for b in s.sizes:
        for length in s.lengths:
          ones = np.ones((b, length), np.int32)
          s.full_model(ones, ones, np.zeros_like(ones))
      return
    state = self._init_state()
    for b in s.sizes:   # admission at every bucket (`_bucket`)
      for length in s.lengths:
        state = self._admit_padding(state, b, length)
    for longest, busy in (self._run_shapes() if runs is None else runs):   # each view and tier (`_run_slots`)
      state = self._run(state, NEVER, 1, longest, busy)
    s.read(state)

  def _run_slots(self, state, min_free: int, max_steps: int, longest: int, busy: int):
    """The steps' run until `min_free` slots are free, under the view of the longest running example and the
    tier of the busy slots where the steps take them; over the whole slots at the full tier while that run
    is not compiled yet (a background warm-up)."""
    warm = self._warm_runs
    if warm is not None and self._run_key(longest, busy) not in warm:
      longest, busy = self._run_shapes()[-1]   # the longest view, the full tier (compiled first): holds them all
    return self._run(state, min_free, max_steps, longest, busy)

  def _run(self, state, min_free: int, max_steps: int, longest: int, busy: int):
    kw = {"longest": longest} if self._run_takes_longest else {}
    if self._run_takes_busy:
      kw["busy"] = busy
    return self.steps.run(state, self.policy.criterion, min_free, max_steps, self.policy.delta, **kw)

  def _init_state(self):
    return self.steps.init(True) if self.policy.criterion == "tokee" else self.steps.init()

  def close(self, grace_s: float = 30.0) -> None:
    """Stops taking work, lets queued and running requests finish within grace_s, fails the rest."""
    with self._cond:
      self._closing = True
      self._grace_deadline = time.monotonic() + grace_s
      self._cond.notify()
    self._thread.join(grace_s + 30.0)
    if self._warm_thread is not None:   # it stops after the compile under way (one run: up to ~16 s, MiniLM TOKEE):
      self._warm_thread.join(60.0)      # not at interpreter exit, in the middle of XLA

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

  def _deliver(self, request: _Request, i: int, exit_index, logits_C: np.ndarray) -> None:
    """Answers row i of a request from its slot: exit_index and logits_C as `LocalSteps.read` gives one
    slot's (a token task's per piece, or TOKEE's per word, words first); the kind builds the answer."""
    if request.future.done():
      return
    result, layers = self.kind.answer(request.rows[i], exit_index, logits_C, self._label)
    request.results[i] = result
    if self.metrics is not None:
      for v in layers:
        self.metrics.observe_exit(v)
    request.left -= 1
    if request.left == 0:
      request.future.set_result(request.results)

  def _label(self, k: int):
    return self.label_names[k] if k < len(self.label_names) else int(k)

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

  def _bucket(self, rows) -> tuple[int, int]:
    """(batch, length) a batch of queued rows is padded to: the smallest of the steps' sizes and lengths
    that hold it, so a few short requests are embedded (admitted) or run (full model) at their own size."""
    from rome_flax.engine.artefact_runtime import bucket
    s = self.steps
    longest = max(len(request.rows[i][0]) for request, i in rows)
    return bucket(s.sizes, len(rows)), bucket(s.lengths, longest) or s.lengths[-1]

  def _run_early(self) -> None:
    s, N, B, E = self.steps, self.steps.slots, self.steps.batch, self.steps.num_exits
    state = self._init_state()
    slot_of: list = [None] * N      # (request, row) per busy slot
    length_N = np.zeros(N, np.int64)   # pieces of each busy slot's example (0: free): the steps' view
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
        b, length = self._bucket(rows)
        slot_B = np.full(b, N, np.int32)
        ids, mask, types, words = _pad_rows(rows, b, length)
        priority_B, threshold_BxE = np.zeros(b, np.int32), np.zeros((b, E), np.float32)
        for r, (request, i) in enumerate(rows):
          slot = free.popleft()
          slot_B[r], slot_of[slot] = slot, (request, i)
          length_N[slot] = len(request.rows[i][0])
          priority_B[r] = -(request.seq % (2 ** 31 - 1))
          threshold_BxE[r] = request.policy.threshold_E
        state = s.admit(state, slot_B, ids, mask, types, priority_B, threshold_BxE, *self.kind.slot_inputs(words))
      if len(free) == N:
        continue
      # Until one more slot is free (an example finished), at most L layer batches: one host round trip per
      # finished example rather than per layer batch (the default run's model at 70 % load: p50 14.1 -> 12.1 ms).
      # The steps touch only the first `longest` positions of each slot: the CoNLL-2003 export's 192-piece
      # slots hold sentences of 17 pieces on average, and copying whole slots was most of a TOKEE step.
      state = self._run_slots(state, len(free) + 1, s.num_layers, int(length_N.max()), N - len(free))
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
        length_N[slot] = 0
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
      b, length = self._bucket(rows)
      ids, mask, types, _ = _pad_rows(rows, b, length)
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
