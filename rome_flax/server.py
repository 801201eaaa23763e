"""`python -m rome_flax serve`: an HTTP server in front of `serving.Engine`.

Starlette on uvicorn: an ASGI app is a plain function of the request (testable without a socket),
uvicorn brings HTTP/1.1 keep-alive, graceful shutdown on SIGTERM (stop accepting, let in-flight
requests finish within `--grace_s`, exit 0) and nothing else we would not use; FastAPI would add
pydantic and OpenAPI on top of Starlette for five endpoints that check their own input.

Endpoints:
  POST /predict  {"texts": [...], "text_pairs": [...]?, "policy": "entropy:0.2" | {...} | name?,
                  "timeout_ms": 2000?} -> {"predictions": [{"label", "probabilities", "exit_layer"}],
                  "server_ms"}; 400 bad request, 429 queue full, 503 shutting down, 504 deadline.
                 A token task's export (sequence labelling) takes {"tokens": [["EU", "rejects", ...], ...],
                 "policy": "tokee:0.3" | "entropy:0.2"?} -> {"predictions": [{"tags", "probabilities",
                 "exit_layers"}]}: with TOKEE each word its own exit layer, and a sentence's slot refilled
                 as soon as all its words have halted.
  GET /health    {"status": "ok", ..., "warm": true} (503 while draining; "warm": false while --warm_up background
                 still compiles)
  GET /metrics   Prometheus text: request and queue latency histograms, queue size, slot occupancy,
                 exit-layer histogram, requests by status, rejections by reason.
A client that disconnects while its request waits or runs cancels it: its slots are freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import threading
import time
from typing import Optional

from rome_flax.engine import serving
from rome_flax.errors import RomeFlaxError
from rome_flax.runtime import compilation_cache_in_use
from rome_flax.kinds.kind import kind_of_steps

DISCONNECT_POLL_S = 0.25   # how often a waiting request checks its client (0.05: ~10% of a core at 128 in flight)


class Metrics:
  """Prometheus metrics of one server, in a registry of its own."""

  def __init__(self, num_layers: int):
    import prometheus_client as prom
    self.registry = prom.CollectorRegistry()
    latency_buckets = (.005, .01, .025, .05, .075, .1, .15, .2, .3, .5, .75, 1, 1.5, 2, 3, 5, 10, 30)
    self.request_latency = prom.Histogram("rome_flax_request_duration_seconds", "Time from arrival to answer",
                                          buckets=latency_buckets, registry=self.registry)
    self.queue_latency = prom.Histogram("rome_flax_queue_duration_seconds", "Time a request waited for a slot",
                                        buckets=latency_buckets, registry=self.registry)
    self.exit_layer = prom.Histogram("rome_flax_exit_layer", "Layer (1-based) each example exited at",
                                     buckets=tuple(range(1, num_layers + 1)), registry=self.registry)
    self.queue_size = prom.Gauge("rome_flax_queue_size", "Examples waiting for a slot", registry=self.registry)
    self.slots_busy = prom.Gauge("rome_flax_slots_busy", "Slots holding a running example", registry=self.registry)
    self.slot_occupancy = prom.Gauge("rome_flax_slot_occupancy", "Busy slots / slots", registry=self.registry)
    self.requests = prom.Counter("rome_flax_requests", "Requests answered, by HTTP status", ["status"],
                                 registry=self.registry)
    self.rejected = prom.Counter("rome_flax_rejected", "Requests refused or dropped, by reason", ["reason"],
                                 registry=self.registry)

  def count(self, what: str, label: str = "") -> None:
    if what == "rejected":
      self.rejected.labels(reason=label).inc()

  def observe_queue(self, seconds: float) -> None:
    self.queue_latency.observe(seconds)

  def observe_exit(self, layer: int) -> None:
    self.exit_layer.observe(layer)

  def set_state(self, queued: int, busy: int, slots: int) -> None:
    self.queue_size.set(queued)
    self.slots_busy.set(busy)
    self.slot_occupancy.set(busy / max(slots, 1))

  def text(self) -> bytes:
    import prometheus_client as prom
    return prom.generate_latest(self.registry)


def build_app(engine: serving.Engine, metrics: Metrics, info: dict):
  """The ASGI app over a running engine."""
  from starlette.applications import Starlette
  from starlette.responses import JSONResponse, Response
  from starlette.routing import Route

  def error(status: int, message: str) -> JSONResponse:
    metrics.requests.labels(status=str(status)).inc()
    return JSONResponse({"error": message}, status_code=status)

  async def predict(request):
    t0 = time.perf_counter()
    try:
      body = json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
      metrics.count("rejected", "bad_request")
      return error(400, "the body is not JSON")
    if not isinstance(body, dict):
      metrics.count("rejected", "bad_request")
      return error(400, "the body must be a JSON object with 'texts' (or 'tokens' for a token task)")
    unknown = set(body) - {"texts", "text_pairs", "policy", "timeout_ms", "tokens"}
    if unknown:
      metrics.count("rejected", "bad_request")
      return error(400, f"unknown fields: {', '.join(sorted(unknown))}")
    try:
      future = engine.submit(body.get("texts"), body.get("text_pairs"), tokens=body.get("tokens"),
                             policy=body.get("policy"), timeout_ms=body.get("timeout_ms"))
    except serving.RequestError as e:
      metrics.count("rejected", "bad_request")
      return error(400, str(e))
    except serving.Overloaded as e:
      return error(429, f"Model is overloaded: {e}")
    except serving.ShuttingDown as e:
      return error(503, str(e))
    waiting = asyncio.wrap_future(future)
    while True:   # bounded: the engine answers or fails every request by its deadline or at shutdown
      done, _ = await asyncio.wait({waiting}, timeout=DISCONNECT_POLL_S)
      if done:
        break
      if await request.is_disconnected():
        future.cancel()
        metrics.count("rejected", "disconnected")
        return Response(status_code=499)
    try:
      predictions = waiting.result()
    except serving.DeadlineExceeded as e:
      return error(504, str(e))
    except serving.ShuttingDown as e:
      return error(503, str(e))
    except Exception as e:   # the worker stopped (serving.Engine fails every request it holds): answer, never hang
      return error(500, f"internal error: {e}")
    seconds = time.perf_counter() - t0
    metrics.request_latency.observe(seconds)
    metrics.requests.labels(status="200").inc()
    return JSONResponse({"predictions": [p._asdict() for p in predictions], "server_ms": round(seconds * 1e3, 3)})

  async def health(request):
    if engine.closing:
      return JSONResponse({"status": "draining"}, status_code=503)
    warm = {"warm": engine.warm, **({"warm_up_error": engine.warm_up_error} if engine.warm_up_error else {})}
    return JSONResponse({"status": "ok", **info, "queue": engine.queue_size(), **warm})

  async def metrics_endpoint(request):
    metrics.queue_size.set(engine.queue_size())   # (slots are set by the worker after each run)
    return Response(metrics.text(), media_type="text/plain; version=0.0.4")

  return Starlette(routes=[Route("/predict", predict, methods=["POST"]), Route("/health", health),
                           Route("/metrics", metrics_endpoint)])


def serve(checkpoint: Optional[str], *, artefact: Optional[str] = None, host: str = "127.0.0.1", port: int = 8080,
          policy: Optional[str] = None, max_batch: Optional[int] = None, slots: Optional[int] = None,
          max_queue: int = 1024,
          timeout_ms: Optional[float] = None, full_model: bool = False, max_length: Optional[int] = None,
          thresholds_file: Optional[str] = None, grace_s: float = 30.0, window: Optional[int] = None,
          warm_up: str = "all", say=print) -> None:
  """Loads the model (or artefact), compiles, serves until SIGTERM / SIGINT, drains, returns."""
  import uvicorn

  sock = _listen(host, port)   # first: a port in use is one error line, before minutes of loading and compiling
  from rome_flax.engine import token_policy as tp
  named, calibrated = {}, None
  if artefact:
    import importlib.util
    import types
    from pathlib import Path
    runtime = Path(artefact) / "artefact_runtime.py"
    if not runtime.is_file():
      raise RomeFlaxError(f"{artefact} is not an exported artefact (no artefact_runtime.py): "
                          "write one with python -m rome_flax export")
    spec = importlib.util.spec_from_file_location("rome_flax_artefact_runtime", runtime)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    try:
      steps = module.load(artefact)
    except ValueError as e:   # artefact_runtime.ArtefactError: a missing, altered or foreign file
      raise RomeFlaxError(f"--artefact {artefact}: {e}") from None
    tokenizer, label_names, source = _artefact_tokenizer(artefact), steps.label_names or (), artefact
    kind = kind_of_steps(steps)   # from the manifest
    if thresholds_file:
      cfg = types.SimpleNamespace(num_exits=steps.num_exits, num_labels=steps.num_labels,
                                  num_layers=steps.num_layers, head=kind.head)
      identity = str(steps.manifest.get("export", {}).get("identity", ""))
      calibrated = _calibrated_policy(thresholds_file, identity, cfg)
    artefact_window = getattr(steps, "window", None)   # a token artefact's TOKEE window, fixed at export
    for what, w in (("--window", window), ("the --thresholds_file setting's window",
                                           calibrated.window if isinstance(calibrated, tp.TokenPolicy) else None)):
      if w is not None and kind.token_level_exit and w != artefact_window:
        raise RomeFlaxError(f"{what} {w}: this artefact was exported " + (
            f"with TOKEE window {artefact_window}" if artefact_window else "without TOKEE") +
            " (python -m rome_flax export --criteria, --window)")
  else:
    from rome_flax.engine import calibration
    from rome_flax.model.pretrained import MultiExitBert
    model = MultiExitBert.from_pretrained(checkpoint)
    if thresholds_file:
      calibrated = _calibrated_policy(thresholds_file, calibration.export_identity(checkpoint), model.config)
    if isinstance(calibrated, tp.TokenPolicy):   # the calibrated window is the server's, unless one is given
      if window is not None and window != calibrated.window:
        raise RomeFlaxError(f"--window {window}: the --thresholds_file setting uses window {calibrated.window}")
      window = calibrated.window
    length = max_length or model.export_info.max_length or 128
    max_batch = max_batch or serving.DEFAULT_BATCH
    steps = serving.LocalSteps(model, slots=slots or 4 * max_batch, batch=max_batch, max_length=length,
                               window=window)   # (refuses a window for a sentence task: `token_policy.serving_window`)
    tokenizer, label_names, source, kind = model.tokenizer, model.export_info.label_names, checkpoint, steps.kind
  if window is not None and not kind.token_level_exit:   # an artefact's
    tp.serving_window(window, False, steps.num_layers)
  if calibrated is not None:
    named["calibrated"] = calibrated
    policy = policy or "calibrated"
  policy = policy or kind.serving_policy
  if policy is None:
    raise RomeFlaxError(f"this export is a {kind.name} model: it exits by patience with a tolerance in the label's "
                        "units; pass --policy '{\"criterion\": \"patience\", \"threshold\": 2, \"delta\": 0.1}' "
                        "or a calibrated --thresholds_file")
  metrics = Metrics(steps.num_layers)
  t0 = time.perf_counter()
  engine = serving.Engine(policy=policy, steps=steps, tokenizer=tokenizer, label_names=label_names,
                          max_queue=max_queue, timeout_ms=timeout_ms, full_model=full_model, named_policies=named,
                          metrics=metrics, warm_up=warm_up)
  mode = "full model" if full_model else f"early exit, {engine.policy.describe()}"
  info = {"mode": "full_model" if full_model else "early_exit", "policy": None if full_model else engine.policy.describe(),
          "slots": steps.slots, "max_batch": steps.batch, "max_length": steps.seq, "layers": steps.num_layers}
  cache = compilation_cache_in_use()
  say(f"{source}: {mode}; {steps.slots} slots, batches of {steps.batch} (cut to {', '.join(map(str, steps.sizes))}), "
      f"up to {steps.seq} tokens; compiled in {time.perf_counter() - t0:.1f} s "
      f"({'compilation cache ' + cache if cache else 'no compilation cache'})"
      + ("" if engine.warm else "; the other views and tiers compile in the background (GET /health: warm)"),
      flush=True)

  class Server(uvicorn.Server):
    @contextlib.contextmanager
    def capture_signals(self):
      """SIGTERM / SIGINT start the drain; unlike uvicorn's own, the signal is not raised again after it,
      so a drained server exits 0."""
      if threading.current_thread() is not threading.main_thread():
        yield
        return
      before = {sig: signal.signal(sig, self.handle_exit) for sig in (signal.SIGINT, signal.SIGTERM)}
      try:
        yield
      finally:
        for sig, handler in before.items():
          signal.signal(sig, handler)

    async def startup(self, sockets=None):
      await super().startup(sockets)
      bound = self.servers[0].sockets[0].getsockname()[1] if self.servers else port
      say(f"serving on http://{host}:{bound}", flush=True)

    async def shutdown(self, sockets=None):
      say("draining: no new requests; finishing the queued and running ones", flush=True)
      await super().shutdown(sockets)

  config = uvicorn.Config(build_app(engine, metrics, info), host=host, port=port, log_level="warning",
                          timeout_graceful_shutdown=grace_s, lifespan="off")
  try:
    Server(config).run(sockets=[sock])
  finally:
    engine.close(grace_s)
  say("stopped", flush=True)


def _listen(host: str, port: int):
  """The server's socket, bound now (uvicorn serves on it): a taken port or a foreign address is a
  RomeFlaxError, not uvicorn's log line and exit code 3."""
  import socket
  from rome_flax.errors import os_error_text
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  try:
    sock.bind((host, port))
  except OSError as e:
    sock.close()
    raise RomeFlaxError(f"--host {host} --port {port}: cannot listen there ({os_error_text(e)})") from None
  sock.set_inheritable(True)
  return sock


def _artefact_tokenizer(artefact: str):
  from rome_flax.model.pretrained import load_tokenizer
  from pathlib import Path
  return load_tokenizer(Path(artefact))


def _calibrated_policy(path: str, identity: str, cfg):
  """A thresholds.json written by `calibrate` for this export (or the export an artefact was made from,
  by the identity in its manifest), as the named policy 'calibrated' (read and checked by calibration.py,
  as infer.py --thresholds_file does): an ExitPolicy, or a TokenPolicy for a TOKEE setting."""
  from rome_flax.engine import calibration
  record = calibration.read_thresholds(path, identity)
  return calibration.policy_from_setting(record["setting"], cfg)[1]
