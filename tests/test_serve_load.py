"""bench/serve_load.py without a model: its pure parts, and its client loops and server handling against a
fake HTTP server on 127.0.0.1 (one worker that sleeps a fixed time per request, so latency, queueing,
rejections and throughput have known values). Bounded: a few dozen requests, seconds in all.

Run as a script (`python tests/test_serve_load.py --fake_server PORT [--full_model]`) it is that fake
server as a process, with the real server's contract: the `serving on` line, /health, SIGTERM -> exit 0.
"""

from __future__ import annotations

import asyncio
import json
import math
import re
import signal
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np
import pytest

from bench import serve_load as sl
from rome_flax.errors import RomeFlaxError


# ----------------------------------------------------------------------------- the fake server


class FakeHandler(BaseHTTPRequestHandler):
  """/health; /predict: 429 when a text starts with 'reject', else one worker (a lock) sleeps
  `server.delay` seconds per request and answers exit layer 1 for texts starting 'short', else
  `server.exit_layer`."""
  protocol_version = "HTTP/1.1"   # keep-alive, as uvicorn

  def log_message(self, *args) -> None:
    pass

  def _send(self, code: int, obj: dict) -> None:
    body = json.dumps(obj).encode()
    self.send_response(code)
    self.send_header("content-type", "application/json")
    self.send_header("content-length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def do_GET(self) -> None:
    if self.path == "/health":
      self._send(200, {"status": "ok"})
    else:
      self._send(404, {"error": "not found"})

  def do_POST(self) -> None:
    texts = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))))["texts"]
    if any(t.startswith("reject") for t in texts):
      self._send(429, {"error": "overloaded"})
      return
    t0 = time.perf_counter()
    with self.server.lock:
      time.sleep(self.server.delay)
    self._send(200, {"predictions": [{"label": "positive", "probabilities": [0.5, 0.5],
                                      "exit_layer": 1 if t.startswith("short") else self.server.exit_layer}
                                     for t in texts], "server_ms": (time.perf_counter() - t0) * 1000})


def make_fake(port: int, delay: float, exit_layer: int) -> ThreadingHTTPServer:
  server = ThreadingHTTPServer((sl.HOST, port), FakeHandler)
  server.daemon_threads = True
  server.delay, server.exit_layer, server.lock = delay, exit_layer, threading.Lock()
  return server


@pytest.fixture
def fake():
  """A fake server in a thread; yields a function setting (delay, exit_layer) and returning the port."""
  server = make_fake(0, 0.0, 3)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()

  def configure(delay: float, exit_layer: int = 3) -> int:
    server.delay, server.exit_layer = delay, exit_layer
    return server.server_address[1]
  yield configure
  server.shutdown()
  server.server_close()


def serve_fake_process(port: int, full_model: bool) -> None:
  """The fake as a server process: full model 20 ms a request at exit layer 4, early exit 5 ms at 2."""
  server = make_fake(port, 0.02 if full_model else 0.005, 4 if full_model else 2)
  stop = threading.Event()
  signal.signal(signal.SIGTERM, lambda *_: stop.set())
  threading.Thread(target=server.serve_forever, daemon=True).start()
  print(f"serving on http://{sl.HOST}:{port}", flush=True)
  stop.wait(120)   # bounded even if nobody stops it
  server.shutdown()
  server.server_close()


def fake_command(args, port: int, full_model: bool) -> list[str]:
  return [sys.executable, str(Path(__file__).resolve()), "--fake_server", str(port)] + (["--full_model"] if full_model else [])


def bodies_of(texts: list[str]) -> list[bytes]:
  return sl.request_bodies(texts, None, 1)


# ----------------------------------------------------------------------------- pure parts


def test_poisson_schedule_is_seeded_bounded_and_at_the_rate():
  a = sl.poisson_schedule(50.0, 20000, [0, 1])
  assert len(a) == 20000 and np.all(np.diff(a) > 0) and a[0] > 0
  np.testing.assert_array_equal(a, sl.poisson_schedule(50.0, 20000, [0, 1]))
  assert not np.array_equal(a[:10], sl.poisson_schedule(50.0, 10, [0, 2]))
  assert abs(np.diff(a).mean() - 1 / 50) < 0.03 / 50                 # mean gap 1/rate
  assert abs(np.diff(a).std() / np.diff(a).mean() - 1) < 0.05        # exponential: cv 1
  cut = sl.poisson_schedule(50.0, 20000, [0, 1], time_limit=10.0)
  np.testing.assert_array_equal(cut, a[a < 10.0])
  assert 400 < len(cut) < 600
  with pytest.raises(RomeFlaxError):
    sl.poisson_schedule(0.0, 10, 0)


def test_summarize_keeps_rejected_out_of_the_percentiles():
  lat = [0.010, 0.020, 0.030, 0.040, 0.100]
  outcomes = [sl.Outcome(200, t, (2,) if i % 2 else (4, 1)) for i, t in enumerate(lat)]
  outcomes += [sl.Outcome(429, 0.001, ()), sl.Outcome(504, 5.0, ()), sl.Outcome(sl.FAILED, 30.0, ()),
               sl.Outcome(500, 0.002, ())]
  s = sl.summarize(outcomes, duration_s=2.0)
  assert (s.sent, s.ok, s.rejected, s.failed) == (9, 5, 2, 2)
  np.testing.assert_allclose([s.p50_ms, s.p95_ms, s.p99_ms], np.percentile(np.array(lat) * 1000, [50, 95, 99]))
  assert s.p50_ms == pytest.approx(30.0)
  assert s.throughput == pytest.approx(2.5)
  assert s.mean_exit == pytest.approx(np.mean([4, 1, 2, 4, 1, 2, 4, 1]))
  none = sl.summarize([sl.Outcome(429, 0.001, ())], 1.0)
  assert none.ok == 0 and math.isnan(none.p50_ms) and math.isnan(none.mean_exit) and none.throughput == 0


def _summary(p50: float, p99: float, throughput: float) -> sl.Summary:
  return sl.Summary(10, 9, 1, 0, p50, p50 * 1.5, p99, throughput, 2.5, 4.0)


def test_table_and_last_line():
  rows = [("saturation", None, _summary(50.0, 90.0, 120.0)), ("30%", 36.0, _summary(20.0, 40.0, 35.9)),
          ("70%", 84.0, sl.summarize([sl.Outcome(429, 0.1, ())], 1.0))]
  table = sl.format_table("full model (--full_model)", rows).splitlines()
  assert table[0] == "full model (--full_model)"
  assert table[1].split() == ["phase", "offered/s", "sent", "ok", "rejected", "failed", "p50", "ms", "p95", "ms",
                              "p99", "ms", "req/s", "mean", "exit"]
  assert table[2].split() == ["saturation", "-", "10", "9", "1", "0", "50.0", "75.0", "90.0", "120.0", "2.50"]
  assert table[4].split()[:6] == ["70%", "84.0", "1", "0", "1", "0"] and table[4].split()[6:] == ["-", "-", "-", "0.0", "-"]
  assert len({len(line) for line in table[1:]}) == 1                 # aligned
  full = {"saturation": _summary(50, 90, 100.0), "70%": _summary(40.0, 200.0, 70.0)}
  early = {"saturation": _summary(20, 30, 170.0), "70%": _summary(22.0, 150.0, 70.0)}
  assert sl.ratio_line(full, early) == "serve: p50 ratio = 0.55 p99 ratio = 0.75 throughput ratio = 1.70"
  early["70%"] = sl.summarize([], 1.0)
  assert sl.ratio_line(full, early) == "serve: p50 ratio = nan p99 ratio = nan throughput ratio = 1.70"


def test_read_texts(tmp_path):
  sst = tmp_path / "dev.tsv"
  sst.write_bytes(b"\xef\xbb\xbfsentence\tlabel\nit 's a charming journey . \t1\n\nbleak and desperate \t0\n")
  assert sl.read_texts(sst) == (["it 's a charming journey .", "bleak and desperate"], None)
  qnli = tmp_path / "qnli.tsv"   # has 'sentence' too: read as the pair (question, sentence)
  qnli.write_text("index\tquestion\tsentence\tlabel\n0\tWhat came?\tThe constitution came.\tentailment\n")
  assert sl.read_texts(qnli) == (["What came?"], ["The constitution came."])
  txt = tmp_path / "texts.txt"
  txt.write_text("a good film\n\n  a dull plot\n")
  assert sl.read_texts(txt) == (["a good film", "a dull plot"], None)
  bad = tmp_path / "bad.tsv"
  bad.write_text("text\tlabel\nhello\t1\n")
  with pytest.raises(RomeFlaxError, match=r"no text column.*sentence1\+sentence2"):
    sl.read_texts(bad)
  short = tmp_path / "short.tsv"
  short.write_text("label\tsentence\n1\tfine\n0\n")
  with pytest.raises(RomeFlaxError, match=r"short.tsv:3: expected at least 2 columns"):
    sl.read_texts(short)
  with pytest.raises(RomeFlaxError, match="missing"):
    sl.read_texts(tmp_path / "none.tsv")
  glue = ROOT.parent / "shared" / "glue" / "SST-2" / "dev.tsv"
  if glue.is_file():
    a, b = sl.read_texts(glue)
    assert len(a) == 872 and b is None


def test_inputs_of_an_export(tmp_path):
  from rome_flax.kinds import synthetic
  with pytest.raises(RomeFlaxError, match=r"python train.py.*--checkpoint"):
    sl.export_task(tmp_path / "export")
  (tmp_path / sl.EXPORT_CONFIG).write_text(json.dumps({"model": {}, "metadata": {"task": "synthetic"}}))
  assert sl.export_task(tmp_path) == ("synthetic", False)
  (tmp_path / sl.EXPORT_CONFIG).write_text(json.dumps({"model": {"head": "token"}, "metadata": {"task": "ner"}}))
  assert sl.export_task(tmp_path) == ("ner", True)
  with pytest.raises(RomeFlaxError, match="CoNLL"):
    sl.load_sentences(None)
  conll = tmp_path / "dev.txt"
  conll.write_text("EU B-ORG\nrejects O\n\nPeter B-PER\n")
  sentences, described = sl.load_sentences(str(conll))
  assert sentences == [["EU", "rejects"], ["Peter"]] and "2 sentences" in described
  assert json.loads(sl.request_bodies(sentences, None, 2, "tokens")[0]) == {"tokens": [["EU", "rejects"], ["Peter"]]}
  a, b, described = sl.load_texts(None, "synthetic")
  assert a == synthetic.make_split("dev")[0] and b is None and "1000 texts" in described
  with pytest.raises(RomeFlaxError, match=r"\(its task is sst-2\): pass --data"):
    sl.load_texts(None, "sst-2")
  bodies = sl.request_bodies(["a", "b", "c", "d", "e"], ["A", "B", "C", "D", "E"], 2)
  assert [json.loads(x) for x in bodies] == [{"texts": ["a", "b"], "text_pairs": ["A", "B"]},
                                             {"texts": ["c", "d"], "text_pairs": ["C", "D"]}]
  assert [json.loads(x) for x in sl.request_bodies(["a", "b"], None, 3)] == [{"texts": ["a", "b", "a"]}]


# ----------------------------------------------------------------------------- client loops


def test_open_loop_counts_rejected_and_measures_from_the_schedule(fake):
  port = fake(0.010, exit_layer=3)
  texts = ["reject me" if i % 3 == 0 else ("short one" if i % 3 == 1 else "a long one") for i in range(30)]
  schedule = np.arange(30) * 0.02                                   # 50/s, 33/s of it served: no queue
  outcomes, duration = asyncio.run(sl.open_loop(sl.url_of(port, "/predict"), bodies_of(texts), schedule,
                                                request_timeout=5.0, max_connections=64))
  s = sl.summarize(outcomes, duration)
  assert (s.sent, s.ok, s.rejected, s.failed) == (30, 20, 10, 0)
  assert schedule[-1] < duration < schedule[-1] + 1.0
  assert s.throughput == pytest.approx(20 / duration)
  assert s.mean_exit == pytest.approx(2.0)                          # half exit 1, half exit 3
  assert min(o.latency_s for o in outcomes if o.status == 200) >= 0.010
  assert s.p50_ms < 200


def test_open_loop_does_not_wait_for_answers(fake):
  """Five requests due at once at a server that serves one per 50 ms: all are sent at once, so the
  k-th answer's latency (from the schedule) includes the k-1 requests served before it."""
  port = fake(0.050)
  outcomes, duration = asyncio.run(sl.open_loop(sl.url_of(port, "/predict"), bodies_of(["x"]), np.zeros(5),
                                                request_timeout=5.0, max_connections=64))
  lat = sorted(o.latency_s for o in outcomes)
  assert [o.status for o in outcomes] == [200] * 5
  for k, t in enumerate(lat, start=1):
    assert t >= k * 0.050 - 0.002
  assert lat[-1] < 1.0 and duration >= lat[-1]


def test_closed_loop_saturation_and_limits(fake):
  port = fake(0.010)
  outcomes, duration = asyncio.run(sl.closed_loop(sl.url_of(port, "/predict"), bodies_of(["x"]), concurrency=3,
                                                  count=12, time_limit=10.0, request_timeout=5.0))
  s = sl.summarize(outcomes, duration)
  assert (s.sent, s.ok) == (12, 12) and duration >= 0.12
  assert s.throughput <= 100.5 and s.throughput > 20                # one worker, 10 ms each
  outcomes, duration = asyncio.run(sl.closed_loop(sl.url_of(port, "/predict"), bodies_of(["x"]), concurrency=2,
                                                  count=10_000, time_limit=0.3, request_timeout=5.0))
  assert 5 < len(outcomes) < 40 and duration < 1.0                  # stopped by the time limit


def test_no_server_is_failed_not_rejected():
  outcomes, _ = asyncio.run(sl.open_loop(sl.url_of(sl.free_port(), "/predict"), bodies_of(["x"]), np.zeros(3),
                                         request_timeout=5.0, max_connections=8))
  s = sl.summarize(outcomes, 1.0)
  assert (s.sent, s.ok, s.rejected, s.failed) == (3, 0, 0, 3)


# ----------------------------------------------------------------------------- server processes


def test_a_server_that_dies_or_never_gets_ready_is_an_error_and_is_stopped(tmp_path):
  codes: list = []
  dies = [sys.executable, "-c", "print('no export here', flush=True); raise SystemExit(3)"]
  with pytest.raises(RomeFlaxError, match=r"(?s)exited with code 3 before it was ready.*no export here"):
    with sl.running_server(dies, sl.free_port(), tmp_path / "dies.log", ready_timeout=30, stop_timeout=5,
                           exit_codes=codes):
      pass
  hangs = [sys.executable, "-c", "import time; time.sleep(60)"]
  t0 = time.monotonic()
  with pytest.raises(RomeFlaxError, match="did not answer GET /health with status ok within 1 s"):
    with sl.running_server(hangs, sl.free_port(), tmp_path / "hangs.log", ready_timeout=1, stop_timeout=5,
                           exit_codes=codes):
      pass
  assert codes == [3, -signal.SIGTERM] and time.monotonic() - t0 < 10


def test_bench_end_to_end_on_fake_servers(tmp_path, capsys):
  """The whole bench against two fake server processes (full model 20 ms a request, early exit 5 ms):
  tables, the last line, and both servers stopped cleanly."""
  (tmp_path / sl.EXPORT_CONFIG).write_text(json.dumps({"model": {}, "metadata": {"task": "synthetic"}}))
  argv = ["--checkpoint", str(tmp_path), "--requests", "15", "--saturation_requests", "30", "--warmup", "4",
          "--max_batch", "2", "--time_limit", "5", "--request_timeout", "5", "--ready_timeout", "30"]
  assert sl.main(argv, command=fake_command) == 0
  out, err = capsys.readouterr()
  lines = out.strip().splitlines()
  assert lines[0].startswith("serve_load: cpu = ")
  assert "synthetic dev split (1000 texts)" in lines[1]
  assert "full model (--full_model)" in lines and "early exit (default policy)" in lines
  rows = [line.split() for line in lines if line.strip().split()[:1] in (["saturation"], ["70%"])]
  assert len(rows) == 4 and all(r[4] == "0" and r[5] == "0" for r in rows)   # nothing rejected or failed
  assert [r[-1] for r in rows] == ["4.00", "4.00", "2.00", "2.00"]             # mean exit layers
  m = re.fullmatch(r"serve: p50 ratio = (\d+\.\d\d) p99 ratio = (\d+\.\d\d) throughput ratio = (\d+\.\d\d)",
                   lines[-1])
  assert m, lines[-1]
  assert float(m.group(1)) < 1.0 and float(m.group(3)) > 1.0
  assert "warning" not in err


def test_server_commands_differ_in_the_early_exit_options_alone():
  import argparse
  args = argparse.Namespace(checkpoint="ck", artefact=None, max_batch=8, max_queue=None, timeout_ms=50,
                            policy="tokee:0.2", window=1)
  full, early = sl.server_command(args, 1234, True), sl.server_command(args, 1234, False)
  assert full[-1] == "--full_model" and "--policy" not in full and "--window" not in full
  assert early[-4:] == ["--policy", "tokee:0.2", "--window", "1"] and early[:-4] == full[:-1]
  assert ["--host", "127.0.0.1"] == full[full.index("--host"):full.index("--host") + 2]
  assert full[full.index("--checkpoint"):][:2] == ["--checkpoint", "ck"] and "--max_batch" in full
  args.checkpoint, args.artefact = None, "art"   # an artefact fixes the batch: no --max_batch
  full, early = sl.server_command(args, 1234, True), sl.server_command(args, 1234, False)
  assert full[full.index("--artefact"):][:2] == ["--artefact", "art"] and "--max_batch" not in full
  assert "--checkpoint" not in full and early[:-4] == full[:-1]


def test_an_artefact_is_served_with_its_batch(tmp_path, capsys):
  """--artefact: the task and batch from its manifest (both servers on it); a clash is one error line."""
  art = tmp_path / "artefact"
  with pytest.raises(RomeFlaxError, match="no manifest.json.*rome_flax export"):
    sl.artefact_task(art)
  art.mkdir()
  (art / sl.ARTEFACT_MANIFEST).write_text(json.dumps({"model": {"is_token_task": False}, "batch": 2,
                                                      "export": {"metadata": {"task": "synthetic"}}}))
  assert sl.artefact_task(art) == ("synthetic", False, 2)
  argv = ["--artefact", str(art), "--requests", "6", "--saturation_requests", "8", "--warmup", "2",
          "--time_limit", "5", "--request_timeout", "5", "--ready_timeout", "30"]
  assert sl.main(argv, command=fake_command) == 0
  out = capsys.readouterr().out.splitlines()
  assert out[1].startswith(f"artefact: {art} (task synthetic)") and "max_batch 2" in out[1]
  assert "saturation (4 in flight" in out[2]
  for extra, message in ((["--max_batch", "8"], "the artefact's batch is 2"),
                         (["--checkpoint", str(tmp_path)], "not both")):
    assert sl.main(argv + extra, command=fake_command) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
  (art / sl.ARTEFACT_MANIFEST).write_text("{}")
  with pytest.raises(RomeFlaxError, match="malformed"):
    sl.artefact_task(art)


def test_missing_export_is_one_error_line(tmp_path, capsys):
  assert sl.main(["--checkpoint", str(tmp_path / "nothing")], command=fake_command) == 2
  out, err = capsys.readouterr()
  assert out == "" and err.count("\n") == 1 and err.startswith("error: export ") and "python train.py" in err


if __name__ == "__main__":
  if len(sys.argv) >= 3 and sys.argv[1] == "--fake_server":
    serve_fake_process(int(sys.argv[2]), "--full_model" in sys.argv[3:])
