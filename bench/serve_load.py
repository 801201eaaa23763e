"""Serving under load: the early-exit server against the full-model server, both over HTTP on loopback.

Starts `python -m rome_flax serve` twice on 127.0.0.1, one after the other on the same export, options and
inputs: first with `--full_model` (no early exit, every layer: the baseline), then with early exit (the
server's default policy, or --policy). Against each it measures

  * saturation throughput: a closed loop of 2 x --max_batch requests in flight (after an unrecorded
    warm-up), requests answered 200 per second;
  * open-loop latency at three arrival rates, 30%, 70% and 120% of the FULL-MODEL server's saturation
    throughput (the same rates and the same seeded Poisson arrival times for both servers): each request
    is sent at its scheduled time whatever is outstanding, and its latency runs from that scheduled time
    (a late client or a queue in front of the server is counted, not hidden). 429 (queue full) and 504
    (deadline passed) answers are rejected: counted, left out of the percentiles.

--artefact DIR serves an artefact (`python -m rome_flax export`) instead of an export, both servers on it (its
full-model forwards and its engine's exported steps); their batch and slots are the artefact's.

Each phase is bounded: --requests per rate (or --saturation_requests), no request sent after --time_limit
seconds, none awaited longer than --request_timeout. Inputs: the texts of --data (a GLUE-style TSV, a pair
task's two columns, or a text file of one text per line), by default the dev split of the embedded synthetic
task that the README's default run (`python train.py` -> runs/default/export) trains on; for a token-task
export (sequence labelling), the sentences of a CoNLL file sent as `tokens` (mean exit: over words). The client is one
asyncio loop in this process (`bench/loopback_http.py`: keep-alive HTTP/1.1 on uvloop, a small fraction of a
server's cost per request); it shares the 2 cores with the server, alike for both servers.

Prints the CPU model, export and data, a table per server (P50/P95/P99 latency, throughput, rejected,
mean exit layer) and as its LAST line
`serve: p50 ratio = A p99 ratio = B throughput ratio = C`: early exit over full model, A and B at the 70%
rate, C of saturation throughput. Targets on 2 CPU cores with a real export: A <= 0.7, B <= 1.0, C >= 1.5.

  python bench/serve_load.py [--checkpoint runs/default/export | --artefact DIR] [--data ../shared/glue/SST-2/dev.tsv]
                             [--requests 400] [--time_limit 60] [--max_batch 64] [--policy entropy:0.3]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
from pathlib import Path
from typing import Callable, Iterator, NamedTuple, Optional, Sequence

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np

from bench import loopback_http
from bench._common import cpu_model
from rome_flax.engine.artefact_runtime import MANIFEST as ARTEFACT_MANIFEST
from rome_flax.engine.serving import DEFAULT_BATCH as DEFAULT_MAX_BATCH
from rome_flax.errors import RomeFlaxError
from rome_flax.model.pretrained import EXPORT_CONFIG

HOST = "127.0.0.1"                         # loopback only: the client never addresses anything else
DEFAULT_EXPORT = "runs/default/export"
RATES = ((0.3, "30%"), (0.7, "70%"), (1.2, "120%"))   # fractions of the full model's saturation throughput
RATIO_RATE = "70%"                         # the rate the latency ratios are read at
REJECTED = (429, 504)                      # queue full, deadline passed
FAILED = 0                                 # status of a request that got no usable answer


# ----------------------------------------------------------------------------- inputs


def export_task(checkpoint: Path) -> tuple[Optional[str], bool]:
  """The task an export was trained on (its metadata; None when it does not say) and whether it labels
  words (a token head); a missing export is the one user error this bench expects most, so it names both
  ways out."""
  config = checkpoint / EXPORT_CONFIG
  if not config.is_file():
    what = "has no " + EXPORT_CONFIG if checkpoint.is_dir() else "is missing"
    raise RomeFlaxError(f"export {checkpoint} {what}: run `python train.py` first (the README's default run "
                        "writes runs/default/export) or pass --checkpoint EXPORT_DIR")
  try:
    record = json.loads(config.read_text(encoding="utf-8"))
    task = (record.get("metadata") or {}).get("task")
    token_task = (record.get("model") or {}).get("head") == "token"
  except (OSError, UnicodeDecodeError, ValueError, AttributeError) as e:
    raise RomeFlaxError(f"{config} is malformed ({type(e).__name__})") from None
  return (str(task) if task else None), bool(token_task)


def artefact_task(artefact: Path) -> tuple[Optional[str], bool, int]:
  """An artefact's task (the export's metadata it was made from), whether it labels words, and its batch."""
  manifest = artefact / ARTEFACT_MANIFEST
  if not manifest.is_file():
    raise RomeFlaxError(f"{artefact} is not a rome_flax artefact (no {ARTEFACT_MANIFEST}): write one with "
                        "python -m rome_flax export --checkpoint EXPORT_DIR --out DIR")
  try:
    record = json.loads(manifest.read_text(encoding="utf-8"))
    task = ((record.get("export") or {}).get("metadata") or {}).get("task")
    token_task, batch = bool(record["model"]["is_token_task"]), int(record["batch"])
  except (OSError, UnicodeDecodeError, ValueError, AttributeError, KeyError, TypeError) as e:
    raise RomeFlaxError(f"{manifest} is malformed ({type(e).__name__})") from None
  return (str(task) if task else None), token_task, batch


def load_sentences(data: Optional[str]) -> tuple[list[list[str]], str]:
  """A token task's inputs: the sentences (word lists) of a CoNLL column file."""
  if data is None:
    raise RomeFlaxError("a token-task export needs --data, a CoNLL file such as ../shared/conll2003/dev.txt")
  from rome_flax.kinds import token_data
  split = token_data.read_conll(data, "dev")
  return split.words, f"{data} ({len(split.words)} sentences)"


def _glue_text_columns() -> list[tuple[str, Optional[str]]]:
  """The (text_a, text_b) header names of every GLUE TSV layout in the task registry (one source of truth
  for which columns hold text), pairs first so a QNLI file is read as a pair, not by its 'sentence'."""
  from rome_flax.kinds import tasks
  out: list[tuple[str, Optional[str]]] = []
  for name in tasks.GLUE_TASKS:
    for _, layout in tasks.get_task(name).tsv:
      a, b = layout.text_a, layout.text_b
      if layout.header and isinstance(a, str) and (b is None or isinstance(b, str)) and (a, b) not in out:
        out.append((a, b))
  return sorted(out, key=lambda ab: ab[1] is None)


def read_texts(path: Path) -> tuple[list[str], Optional[list[str]]]:
  """Texts (and a pair task's second texts) of a data file: a GLUE-style TSV with a header naming its
  text column(s) ('sentence'; 'sentence1' + 'sentence2', 'question' + 'sentence', ...), or a .txt file
  of one text per line. Labels and other columns are ignored; blank lines are skipped."""
  from rome_flax.kinds.data import text_lines
  lines = [line.rstrip("\r\n") for line in text_lines(path)]
  if path.suffix.lower() in (".txt", ".text"):
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
      raise RomeFlaxError(f"{path} holds no text")
    return texts, None
  if not lines:
    raise RomeFlaxError(f"{path} is empty (expected a GLUE-style TSV header line)")
  header = lines[0].split("\t")
  known = _glue_text_columns()
  match = next(((a, b) for a, b in known if a in header and (b is None or b in header)), None)
  if match is None:
    names = ", ".join(f"{a}+{b}" if b else a for a, b in known)
    raise RomeFlaxError(f"{path}:1: no text column in the header ({', '.join(header)}); expected a GLUE-style "
                        f"TSV with one of {names}, or a .txt file with one text per line")
  ia, ib = header.index(match[0]), (header.index(match[1]) if match[1] else None)
  need = max(ia, ib or 0) + 1
  texts_a: list[str] = []
  texts_b: list[str] = []
  for n, line in enumerate(lines[1:], start=2):
    if not line.strip():
      continue
    row = line.split("\t")
    if len(row) < need:
      raise RomeFlaxError(f"{path}:{n}: expected at least {need} columns, found {len(row)}")
    texts_a.append(row[ia].strip())
    if ib is not None:
      texts_b.append(row[ib].strip())
  if not texts_a:
    raise RomeFlaxError(f"{path} has a header but no rows")
  return texts_a, (texts_b if ib is not None else None)


def load_texts(data: Optional[str], task: Optional[str]) -> tuple[list[str], Optional[list[str]], str]:
  """--data's texts, else the synthetic task's dev split (what the default run is evaluated on, produced
  by rome_flax.kinds.data itself); returns (texts_a, texts_b, a description for the header)."""
  if data is not None:
    a, b = read_texts(Path(data))
    return a, b, f"{data} ({len(a)} {'pairs' if b is not None else 'texts'})"
  if task != "synthetic":
    said = f"its task is {task}" if task else "it does not name its task"
    raise RomeFlaxError(f"the export's inputs are not built in ({said}): pass --data FILE (a GLUE-style TSV such "
                        "as ../shared/glue/SST-2/dev.tsv, or a text file of one text per line)")
  from rome_flax.kinds import data as data_lib
  from rome_flax.kinds import tasks
  split = data_lib.load_split(tasks.get_task("synthetic"), "dev")
  return list(split.texts_a), None, f"synthetic dev split ({len(split)} texts)"


def request_bodies(texts_a: Sequence, texts_b: Optional[Sequence[str]], per_request: int,
                   field: str = "texts") -> list[bytes]:
  """JSON bodies of `per_request` consecutive texts (or, field 'tokens', sentences as word lists) each
  (wrapping around), encoded once up front so the client spends its share of the 2 cores on sending, not
  on json.dumps; request i sends body i % len."""
  if per_request < 1:
    raise RomeFlaxError(f"--texts_per_request must be >= 1, got {per_request}")
  n = len(texts_a)
  bodies = []
  for j in range(max(1, n // per_request)):
    rows = [(j * per_request + m) % n for m in range(per_request)]
    body = {field: [texts_a[r] for r in rows]}
    if texts_b is not None:
      body["text_pairs"] = [texts_b[r] for r in rows]
    bodies.append(json.dumps(body).encode())
  return bodies


# ----------------------------------------------------------------------------- schedule and figures


def poisson_schedule(rate: float, count: int, seed, time_limit: float = math.inf) -> np.ndarray:
  """Send times (seconds from the phase's start) of at most `count` Poisson arrivals at `rate` per
  second, those before `time_limit`; exponential gaps from a seeded generator, so both servers see
  the very same arrivals."""
  if not (rate > 0 and math.isfinite(rate)):
    raise RomeFlaxError(f"arrival rate must be a positive number, got {rate}")
  times = np.cumsum(np.random.default_rng(seed).exponential(1.0 / rate, size=int(count)))
  return times[times < time_limit]


class Outcome(NamedTuple):
  status: int              # the HTTP status, FAILED (0) when no usable answer came
  latency_s: float         # open loop: from the scheduled send time; closed loop: from the send
  exit_layers: tuple       # exit_layer of each prediction of a 200 answer


@dataclasses.dataclass(frozen=True)
class Summary:
  sent: int
  ok: int                  # answered 200
  rejected: int            # answered 429 or 504
  failed: int              # any other answer, a client-side timeout, a broken connection
  p50_ms: float            # latency percentiles of the 200 answers (NaN without any)
  p95_ms: float
  p99_ms: float
  throughput: float        # 200 answers per second of the phase
  mean_exit: float         # mean exit layer over the texts of the 200 answers
  duration_s: float


def summarize(outcomes: Sequence[Outcome], duration_s: float) -> Summary:
  """A phase's figures; rejected requests are counted but kept out of the latency percentiles (an
  overloaded server that refuses fast must not look fast)."""
  ok = [o for o in outcomes if o.status == 200]
  rejected = sum(o.status in REJECTED for o in outcomes)
  if ok:
    p50, p95, p99 = np.percentile(np.array([o.latency_s for o in ok]) * 1000.0, [50, 95, 99])
  else:
    p50 = p95 = p99 = math.nan
  exits = [e for o in ok for e in o.exit_layers]
  return Summary(sent=len(outcomes), ok=len(ok), rejected=int(rejected), failed=len(outcomes) - len(ok) - rejected,
                 p50_ms=float(p50), p95_ms=float(p95), p99_ms=float(p99),
                 throughput=len(ok) / duration_s if duration_s > 0 else math.nan,
                 mean_exit=float(np.mean(exits)) if exits else math.nan, duration_s=float(duration_s))


TABLE_COLUMNS = ("phase", "offered/s", "sent", "ok", "rejected", "failed", "p50 ms", "p95 ms", "p99 ms",
                 "req/s", "mean exit")


def _num(x: Optional[float], digits: int) -> str:
  return "-" if x is None or not math.isfinite(x) else f"{x:.{digits}f}"


def format_table(title: str, rows: Sequence[tuple[str, Optional[float], Summary]]) -> str:
  """A server's phases as an aligned text table: (phase name, offered rate or None, figures) per row."""
  cells = [TABLE_COLUMNS]
  for name, offered, s in rows:
    cells.append((name, _num(offered, 1), str(s.sent), str(s.ok), str(s.rejected), str(s.failed),
                  _num(s.p50_ms, 1), _num(s.p95_ms, 1), _num(s.p99_ms, 1), _num(s.throughput, 1),
                  _num(s.mean_exit, 2)))
  widths = [max(len(r[i]) for r in cells) for i in range(len(TABLE_COLUMNS))]
  lines = [title]
  for r in cells:
    lines.append("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))))
  return "\n".join(lines)


def _ratio(a: float, b: float) -> float:
  return a / b if b > 0 and math.isfinite(a) and math.isfinite(b) else math.nan


def ratio_line(full: dict[str, Summary], early: dict[str, Summary]) -> str:
  """The bench's last line: early exit over full model, latency at the 70% rate, saturation throughput."""
  a = _ratio(early[RATIO_RATE].p50_ms, full[RATIO_RATE].p50_ms)
  b = _ratio(early[RATIO_RATE].p99_ms, full[RATIO_RATE].p99_ms)
  c = _ratio(early["saturation"].throughput, full["saturation"].throughput)
  return f"serve: p50 ratio = {a:.2f} p99 ratio = {b:.2f} throughput ratio = {c:.2f}"


# ----------------------------------------------------------------------------- the client


def url_of(port: int, path: str) -> str:
  return f"http://{HOST}:{port}{path}"


def _client(url: str, max_connections: int):
  """The load client for url's host (loopback only) and its path: `loopback_http.LoopbackClient`, whose cost
  per request is a small fraction of the server's (httpx's was not: see loopback_http's docstring)."""
  parts = urllib.parse.urlsplit(url)
  return loopback_http.LoopbackClient(parts.hostname, parts.port, max_connections), parts.path or "/"


def read_outcome(status: int, body: bytes) -> tuple[int, tuple]:
  """(status, exit layers) of an answer; FAILED for a 200 whose body is not the contract's."""
  if status != 200:
    return status, ()
  try:
    predictions = json.loads(body)["predictions"]
    if predictions and "exit_layers" in predictions[0]:   # a token task: each word's exit layer
      return 200, tuple(int(v) for p in predictions for v in p["exit_layers"])
    return 200, tuple(int(p["exit_layer"]) for p in predictions if p.get("exit_layer") is not None)
  except (ValueError, KeyError, TypeError, AttributeError, IndexError):
    return FAILED, ()


async def _post(client, path: str, body: bytes, timeout: float) -> tuple[int, tuple]:
  """(status, exit layers) of one request; FAILED for a timeout, a broken connection or a 200 whose body
  is not the contract's."""
  try:
    status, data = await asyncio.wait_for(client.request("POST", path, body), timeout)
  except (asyncio.TimeoutError, OSError, EOFError):
    return FAILED, ()
  return read_outcome(status, data)


async def open_loop(url: str, bodies: Sequence[bytes], schedule: np.ndarray, *, request_timeout: float,
                    max_connections: int) -> tuple[list[Outcome], float]:
  """Request i sent at start + schedule[i] as its own task, never waiting for earlier answers (open
  loop: arrivals do not slow down when the server does); latency from the scheduled time. Returns the
  outcomes and the phase's duration (start to the last answer)."""
  outcomes: list[Outcome] = []
  client, path = _client(url, max_connections)
  async with client:
    loop = asyncio.get_running_loop()
    start = loop.time()

    async def one(i: int, due: float) -> None:
      status, exits = await _post(client, path, bodies[i % len(bodies)], request_timeout)
      outcomes.append(Outcome(status, loop.time() - due, exits))

    tasks = []
    for i, at in enumerate(schedule):
      due = start + float(at)
      if due > loop.time():
        await asyncio.sleep(due - loop.time())
      tasks.append(asyncio.create_task(one(i, due)))
    await asyncio.gather(*tasks)
    return outcomes, loop.time() - start


async def closed_loop(url: str, bodies: Sequence[bytes], *, concurrency: int, count: int, time_limit: float,
                      request_timeout: float) -> tuple[list[Outcome], float]:
  """`concurrency` requests in flight until `count` are sent or `time_limit` seconds pass: the rate at
  which the server answers when it is never idle (saturation). Returns the outcomes and the duration."""
  outcomes: list[Outcome] = []
  client, path = _client(url, concurrency)
  async with client:
    loop = asyncio.get_running_loop()
    start = loop.time()
    deadline = start + time_limit
    sent = 0

    async def worker() -> None:
      nonlocal sent
      while sent < count and loop.time() < deadline:
        i, sent = sent, sent + 1
        t = loop.time()
        status, exits = await _post(client, path, bodies[i % len(bodies)], request_timeout)
        outcomes.append(Outcome(status, loop.time() - t, exits))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return outcomes, loop.time() - start


# ----------------------------------------------------------------------------- the server


def free_port() -> int:
  """A port nothing listens on now (the server takes no --port 0): bound, read, released."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind((HOST, 0))
    return s.getsockname()[1]


def server_command(args, port: int, full_model: bool) -> list[str]:
  """`python -m rome_flax serve` on loopback with the bench's options; both servers get the same ones
  except --full_model (the baseline) and --policy and --window (early exit only). An artefact fixes the batch."""
  source = ["--artefact", str(args.artefact)] if args.artefact else [
      "--checkpoint", str(args.checkpoint), "--max_batch", str(args.max_batch)]
  cmd = [sys.executable, "-m", "rome_flax", "serve"] + source + ["--host", HOST, "--port", str(port)]
  for name in ("max_queue", "timeout_ms"):
    if getattr(args, name) is not None:
      cmd += [f"--{name}", str(getattr(args, name))]
  if full_model:
    cmd.append("--full_model")
  else:
    if args.policy:
      cmd += ["--policy", args.policy]
    if args.window is not None:
      cmd += ["--window", str(args.window)]
  return cmd


def _tail(path: Path, lines: int = 20) -> str:
  try:
    text = path.read_text(encoding="utf-8", errors="replace").splitlines()[-lines:]
  except OSError:
    return "  (no log)"
  return "\n".join("  | " + line for line in text) or "  (empty log)"


def stop_server(proc: subprocess.Popen, timeout: float) -> Optional[int]:
  """SIGTERM (the server drains and exits 0), SIGKILL after `timeout` seconds; its exit code."""
  if proc.poll() is None:
    proc.send_signal(signal.SIGTERM)
    try:
      proc.wait(timeout)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()
  return proc.returncode


def wait_ready(proc: subprocess.Popen, port: int, timeout: float, log: Path) -> None:
  """Polls GET /health until it answers 200 {"status": "ok"}; a server that exits or is not ready within
  `timeout` seconds is an error carrying the end of its log (the caller stops it)."""
  deadline = time.monotonic() + timeout
  while True:
    if proc.poll() is not None:
      raise RomeFlaxError(f"the server exited with code {proc.returncode} before it was ready; the end of its "
                          f"log ({log}):\n{_tail(log)}")
    try:
      status, body = loopback_http.get(HOST, port, "/health")
      if status == 200 and json.loads(body).get("status") == "ok":
        return
    except (OSError, EOFError, asyncio.TimeoutError, ValueError, AttributeError):
      pass
    if time.monotonic() > deadline:
      raise RomeFlaxError(f"the server did not answer GET /health with status ok within {timeout:g} s; the "
                          f"end of its log ({log}):\n{_tail(log)}")
    time.sleep(0.25)


@contextlib.contextmanager
def running_server(command: list[str], port: int, log: Path, *, ready_timeout: float,
                   stop_timeout: float, exit_codes: Optional[list] = None) -> Iterator[subprocess.Popen]:
  """A server process, ready, stopped on the way out whatever happens (its output goes to `log`, never
  to this bench's stdout, whose last line is the result). Appends its exit code to `exit_codes`."""
  env = dict(os.environ)
  env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
  with open(log, "wb") as out:
    proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            cwd=str(ROOT), env=env)
  try:
    wait_ready(proc, port, ready_timeout, log)
    yield proc
  finally:
    code = stop_server(proc, stop_timeout)
    if exit_codes is not None:
      exit_codes.append(code)


# ----------------------------------------------------------------------------- the bench


def _say(message: str) -> None:
  print(message, file=sys.stderr, flush=True)   # progress; stdout holds the result only


def measure_server(args, bodies: list[bytes], port: int, full_model: bool, rates: Optional[list[float]],
                   log: Path, command: Callable, exit_codes: list) -> tuple[dict[str, Summary], list[float]]:
  """One server: warm-up, saturation, then the open-loop rates (the full model's run sets them from its
  saturation throughput). Returns {phase: figures} and the rates used."""
  name = "full model" if full_model else "early exit"
  url = url_of(port, "/predict")
  concurrency = 2 * args.max_batch
  common = dict(request_timeout=args.request_timeout)
  out: dict[str, Summary] = {}
  _say(f"{name}: starting the server on port {port} (log {log})")
  started = time.monotonic()
  with running_server(command(args, port, full_model), port, log, ready_timeout=args.ready_timeout,
                      stop_timeout=args.stop_timeout, exit_codes=exit_codes):
    _say(f"{name}: ready in {time.monotonic() - started:.1f} s (load, compile, listen)")
    warmup = args.warmup if args.warmup is not None else 2 * concurrency
    if warmup > 0:
      _say(f"{name}: warm-up, {warmup} requests")
      loopback_http.run(closed_loop(url, bodies, concurrency=concurrency, count=warmup, time_limit=args.time_limit,
                              **common))
    _say(f"{name}: saturation, {concurrency} in flight, up to {args.saturation_requests} requests")
    out["saturation"] = summarize(*loopback_http.run(closed_loop(
        url, bodies, concurrency=concurrency, count=args.saturation_requests, time_limit=args.time_limit, **common)))
    if rates is None:
      if not out["saturation"].ok:
        raise RomeFlaxError(f"the {name} server answered no request with 200 at saturation "
                            f"({out['saturation'].rejected} rejected, {out['saturation'].failed} failed); log {log}")
      rates = [f * out["saturation"].throughput for f, _ in RATES]
    for k, ((_, label), rate) in enumerate(zip(RATES, rates)):
      schedule = poisson_schedule(rate, args.requests, [args.seed, k], args.time_limit)
      _say(f"{name}: open loop at {label} ({rate:.1f} requests/s), {len(schedule)} requests")
      out[label] = summarize(*loopback_http.run(open_loop(url, bodies, schedule, max_connections=args.max_connections,
                                                    **common)))
  return out, rates


def build_parser() -> argparse.ArgumentParser:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
  ap.add_argument("--checkpoint", default=None, help=f"rome_flax export to serve (default: {DEFAULT_EXPORT})")
  ap.add_argument("--artefact", default=None,
                  help="serve this artefact (python -m rome_flax export) instead: both servers, its batch and slots")
  ap.add_argument("--data", default=None,
                  help="input texts: a GLUE-style TSV (e.g. ../shared/glue/SST-2/dev.tsv; a pair task's two "
                       "columns) or a .txt file, one text per line (default: the synthetic task's dev split, "
                       "for the default run's export)")
  ap.add_argument("--requests", type=int, default=400, help="requests per open-loop rate")
  ap.add_argument("--saturation_requests", type=int, default=1000, help="requests of the saturation measurement")
  ap.add_argument("--warmup", type=int, default=None, help="unrecorded requests first (default: 2 x in flight)")
  ap.add_argument("--time_limit", type=float, default=60.0, help="seconds per phase after which nothing is sent")
  ap.add_argument("--request_timeout", type=float, default=30.0,
                  help="seconds a request is awaited before it counts as failed")
  ap.add_argument("--texts_per_request", type=int, default=1)
  ap.add_argument("--max_batch", type=int, default=None,
                  help=f"the servers' --max_batch (default: {DEFAULT_MAX_BATCH}, an artefact's batch); saturation keeps "
                       "2 x this many requests in flight")
  ap.add_argument("--max_queue", type=int, default=None, help="the servers' --max_queue (default: theirs)")
  ap.add_argument("--timeout_ms", type=int, default=None, help="the servers' --timeout_ms (default: theirs)")
  ap.add_argument("--policy", default=None, help="the early-exit server's --policy (default: its own)")
  ap.add_argument("--window", type=int, default=None, help="token tasks: the early-exit server's TOKEE --window")
  ap.add_argument("--max_connections", type=int, default=1024, help="the open-loop client's connection limit")
  ap.add_argument("--port_base", type=int, default=None,
                  help="ports PORT_BASE (full model) and PORT_BASE+1 (early exit); default: free ports")
  ap.add_argument("--ready_timeout", type=float, default=180.0, help="seconds a server may take to be ready")
  ap.add_argument("--stop_timeout", type=float, default=60.0, help="seconds a server may drain after SIGTERM")
  ap.add_argument("--seed", type=int, default=0, help="seed of the Poisson arrival times")
  return ap


def _check_args(args) -> None:
  for name in ("requests", "saturation_requests", "max_batch", "max_connections"):
    if getattr(args, name) is not None and getattr(args, name) < 1:
      raise RomeFlaxError(f"--{name} must be >= 1, got {getattr(args, name)}")
  for name in ("time_limit", "request_timeout", "ready_timeout", "stop_timeout"):
    if not getattr(args, name) > 0:
      raise RomeFlaxError(f"--{name} must be > 0, got {getattr(args, name)}")
  if args.port_base is not None and not 1024 <= args.port_base < 65535:
    raise RomeFlaxError(f"--port_base must be in 1024..65534, got {args.port_base}")


def _served(args) -> tuple[Optional[str], bool, str]:
  """Resolves --checkpoint / --artefact (absolute paths: the servers run in the repo root) and --max_batch;
  the task, whether it labels words, and what the header calls the source."""
  if args.artefact:
    if args.checkpoint:
      raise RomeFlaxError("give --checkpoint or --artefact, not both")
    args.artefact = Path(os.path.expanduser(str(args.artefact))).absolute()
    task, token_task, batch = artefact_task(args.artefact)
    if args.max_batch not in (None, batch):
      raise RomeFlaxError(f"--max_batch {args.max_batch}: the artefact's batch is {batch}, fixed at export")
    args.max_batch = batch
    return task, token_task, f"artefact: {args.artefact}"
  args.checkpoint = Path(os.path.expanduser(str(args.checkpoint or DEFAULT_EXPORT))).absolute()
  args.max_batch = args.max_batch or DEFAULT_MAX_BATCH
  task, token_task = export_task(args.checkpoint)
  return task, token_task, f"export: {args.checkpoint}"


def run(args, command: Callable = server_command) -> str:
  """The whole bench; prints the header and tables and returns the ratio line (printed last by main)."""
  _check_args(args)
  task, token_task, source = _served(args)
  if token_task:
    sentences, described = load_sentences(args.data)
    bodies = request_bodies(sentences, None, args.texts_per_request, "tokens")
  else:
    texts_a, texts_b, described = load_texts(args.data, task)
    bodies = request_bodies(texts_a, texts_b, args.texts_per_request)
  print(f"serve_load: cpu = {cpu_model()}")
  print(f"{source} (task {task or '?'}); data: {described}; {args.texts_per_request} text(s) per "
        f"request; max_batch {args.max_batch}; early-exit policy {args.policy or 'the server default'}"
        + (f", TOKEE window {args.window}" if args.window is not None else ""))
  print(f"phases: saturation ({2 * args.max_batch} in flight, <= {args.saturation_requests} requests), then open-loop "
        f"Poisson at {', '.join(l for _, l in RATES)} of the full model's saturation (<= {args.requests} requests, "
        f"<= {args.time_limit:g} s each, seed {args.seed}); latency from the scheduled send, 429/504 = rejected",
        flush=True)
  logs = Path(tempfile.mkdtemp(prefix="serve_load_"))
  exit_codes: list = []
  results: dict[str, dict[str, Summary]] = {}
  rates = None
  for full_model in (True, False):
    port = free_port() if args.port_base is None else args.port_base + (0 if full_model else 1)
    key = "full" if full_model else "early"
    results[key], rates = measure_server(args, bodies, port, full_model, rates, logs / f"{key}.log", command,
                                         exit_codes)
    title = "full model (--full_model)" if full_model else f"early exit ({args.policy or 'default policy'})"
    rows = [("saturation", None, results[key]["saturation"])]
    rows += [(label, rate, results[key][label]) for (_, label), rate in zip(RATES, rates)]
    print(format_table(title, rows), flush=True)
  unclean = [(k, c) for k, c in zip(("full", "early"), exit_codes) if c != 0]
  for key, code in unclean:
    _say(f"warning: the {key} server exited with code {code} after SIGTERM (expected 0); log {logs / (key + '.log')}")
  if not unclean:
    shutil.rmtree(logs, ignore_errors=True)
  return ratio_line(results["full"], results["early"])


def _interrupt(signum, frame) -> None:
  raise KeyboardInterrupt


def main(argv: Optional[Sequence[str]] = None, command: Callable = server_command) -> int:
  args = build_parser().parse_args(argv)
  # SIGTERM to the bench unwinds like Ctrl-C, so the servers it started are stopped too.
  previous = signal.signal(signal.SIGTERM, _interrupt)
  try:
    line = run(args, command)
  except RomeFlaxError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  finally:
    signal.signal(signal.SIGTERM, previous)
  print(line, flush=True)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
