"""Serving: the Engine's answers equal infer.py's offline decisions; the queue's rules (429 when full,
504 past a deadline, cancellation frees slots, bad requests refused alone); the HTTP app; SIGTERM
drains in-flight requests and exits 0 (a real server process on 127.0.0.1, bounded in time)."""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rome_flax.engine import exit_policy as ep
from rome_flax.engine import inference, serving
from rome_flax.errors import RomeFlaxError
from rome_flax.kinds.kind import TOKEN
from rome_flax.model.config import ModelConfig
from rome_flax.model.pretrained import ExportInfo, MultiExitBert, load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
TEXTS = ["a charming and moving film", "dull , plodding and far too long", "it is what it is",
         "an utter triumph of style and wit", "the plot makes no sense at all",
         # over 16 pieces: the engine's steps run under a wider view of the slots than for the others
         "the first hour is slow and the second is slower , but the last twenty minutes , with their storm and "
         "their quiet ending , almost make up for it",
         "not bad", "a mess from start to finish , with no redeeming features whatsoever"]


@pytest.fixture(scope="module")
def model(minilm_dir):
  """A tiny 3-layer model with MiniLM's tokenizer, its exits spread over the layers."""
  cfg = ModelConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                    intermediate_size=48, max_position_embeddings=64, num_labels=2)
  m = MultiExitBert.from_config(cfg, seed=3, tokenizer=load_tokenizer(minilm_dir))
  m.params["exits"]["classifier"]["kernel"] = m.params["exits"]["classifier"]["kernel"] * 400.0
  m.export_info = ExportInfo(task="sst2", label_names=("negative", "positive"), max_length=64)
  return m


def entropy_gap_policy(model, texts):
  """An entropy threshold in a gap of the first exit's entropies (no decision within rounding)."""
  enc = model.encode(texts, max_length=64)
  logits = np.asarray(model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]).exit_logits)
  h = np.asarray(ep.entropy(jnp.asarray(logits)))
  return ep.make_policy("entropy", ep.threshold_in_gap(h[0]), model.config.num_exits, num_labels=2)


@pytest.fixture(scope="module")
def engine(model):
  eng = serving.Engine(model, entropy_gap_policy(model, TEXTS), slots=8, batch=4, max_length=64, max_queue=16)
  yield eng
  eng.close(5)


def test_engine_answers_equal_the_offline_decisions(model, engine):
  policy = entropy_gap_policy(model, TEXTS)
  ref = inference.predict(model, TEXTS, policy, batch_size=4, max_length=64)
  assert 1 < len(set(ref.exit_layers.tolist()))             # exits spread over layers
  one_call = engine.predict(TEXTS)
  one_each = [f.result(30)[0] for f in [engine.submit([t]) for t in TEXTS]]   # arriving while others run
  for got in (one_call, one_each):
    assert [p.exit_layer for p in got] == ref.exit_layers.tolist()
    assert [p.label for p in got] == [("negative", "positive")[k] for k in ref.predictions]
    np.testing.assert_allclose([p.probabilities for p in got], jax.nn.softmax(ref.logits, -1), atol=1e-5)


def test_background_warm_up_serves_the_same_answers_then_gets_warm(model, monkeypatch):
  """warm_up='background': the engine serves once its whole-slot run is compiled (every run of the worker
  takes it while the other views and tiers wait to compile), with the offline answers; then the thread
  compiles the rest, `warm` turns True, the worker takes the runs of their own view and tier, and nothing
  traces any more."""
  from jax import monitoring
  policy = entropy_gap_policy(model, TEXTS)
  ref = inference.predict(model, TEXTS, policy, batch_size=4, max_length=64)
  gate, taken = threading.Event(), []
  rest, run = serving.Engine._warm_up_rest, serving.Engine._run
  monkeypatch.setattr(serving.Engine, "_warm_up_rest", lambda self, shapes: gate.wait(120) and rest(self, shapes))

  def recording_run(self, state, min_free, max_steps, longest, busy):
    if threading.current_thread().name == "rome_flax-engine":
      taken.append(self._run_key(longest, busy))
    return run(self, state, min_free, max_steps, longest, busy)
  monkeypatch.setattr(serving.Engine, "_run", recording_run)
  traces = []

  def listener(event, duration, **kw):
    if event.startswith(("/jax/core/compile/", "/jax/compilation_cache/")):   # trace, lower, compile
      traces.append(event)
  monitoring.register_event_duration_secs_listener(listener)
  eng = serving.Engine(model, policy, slots=32, batch=16, max_length=64, warm_up="background")
  try:
    shapes = eng._run_shapes()
    assert shapes[-1] == (64, 16) and shapes[0] == (16, 4) and len(shapes) == 6   # 3 views x 2 tiers
    answers = [f.result(60)[0] for f in [eng.submit([t]) for t in TEXTS]]
    assert not eng.warm and taken and set(taken) == {(64, 16)}   # whole slots, full tier only
    gate.set()
    deadline = time.monotonic() + 300
    while not eng.warm and time.monotonic() < deadline:
      time.sleep(0.1)
    assert eng.warm and eng.warm_up_error is None
    taken.clear()
    before = len(traces)
    answers = [answers, [f.result(60)[0] for f in [eng.submit([t]) for t in TEXTS]]]
    eng.predict(["not bad"])   # alone and short: the smallest view and tier
    assert len(traces) == before, traces[before:]   # the background compiled what the worker now calls
    assert (16, 4) in taken and set(taken) - {(16, 4), (64, 16)}, taken
    for got in answers:
      assert [p.exit_layer for p in got] == ref.exit_layers.tolist()
      assert [p.label for p in got] == [("negative", "positive")[k] for k in ref.predictions]
  finally:
    gate.set()
    eng.close(5)
    monitoring.unregister_event_duration_listener(listener)
  with pytest.raises(RomeFlaxError, match="warm_up"):
    serving.Engine(model, policy, slots=8, batch=4, max_length=64, warm_up="later")
  one = serving.Engine(model, policy, slots=4, batch=4, max_length=16, warm_up="background")   # one view, one tier
  try:
    assert one.warm and one._run_shapes() == [(16, 4)]
  finally:
    one.close(5)


def test_a_run_not_compiled_yet_takes_the_whole_slots(model):
  """Until its own view and tier are compiled, a run goes over the whole slots at the full tier."""
  eng = serving.Engine(model, "entropy:0.3", slots=32, batch=16, max_length=64, warm_up=False)
  try:
    calls = []
    eng._run = lambda state, min_free, max_steps, longest, busy: calls.append((longest, busy)) or state
    eng._warm_runs = {eng._run_key(64, 32)}
    eng._run_slots(None, 1, 3, 10, 2)
    eng._warm_runs.add(eng._run_key(10, 2))
    assert eng._run_key(10, 2) == (16, 4) and eng._run_key(64, 32) == (64, 16)
    eng._run_slots(None, 1, 3, 12, 3)    # the same view and tier as (10, 2): compiled now
    eng._warm_runs = None
    eng._run_slots(None, 1, 3, 40, 20)   # all compiled
    assert calls == [(64, 16), (12, 3), (40, 20)]
  finally:
    eng.close(5)


def test_run_tiers():
  assert serving.default_sizes(64) == (1, 4, 16, 64) and serving.default_sizes(4) == (1, 4)
  assert serving.run_tiers((1, 4, 16, 64), 64) == ((4, (1, 4)), (64, (4, 16, 64)))
  assert serving.run_tiers((1, 4), 4) == ((4, (1, 4)),)


def test_few_busy_slots_run_in_the_small_tier_with_the_same_answers(model):
  """With no more busy slots than the second-smallest size a run gathers that many rows (`run_tiers`); the
  answers, one request at a time (small tier) or all at once (full tier), are the offline decisions."""
  tiers = []   # (rows gathered, cut sizes) of each scheduler run

  class Spy:
    def __init__(self, scheduler):
      self.scheduler = scheduler

    def __getattr__(self, name):
      return getattr(self.scheduler, name)

    def run(self, *args):
      tiers.append((args[4], args[8]))
      return self.scheduler.run(*args)

  policy = entropy_gap_policy(model, TEXTS)
  ref = inference.predict(model, TEXTS, policy, batch_size=4, max_length=64)
  steps = serving.LocalSteps(model, slots=32, batch=16, max_length=64)
  steps._engine = Spy(steps._engine)
  assert steps.tiers == ((4, (1, 4)), (16, (4, 16)))
  assert steps.tier(1) == steps.tier(4) == (4, (1, 4)) and steps.tier(5) == steps.tier(None) == (16, (4, 16))
  assert serving.run_tiers((4, 16, 64), 64) == ((16, (4, 16)), (64, (4, 16, 64)))
  eng = serving.Engine(policy=policy, steps=steps, tokenizer=model.tokenizer)
  try:
    tiers.clear()
    one_each = [eng.predict([t])[0] for t in TEXTS]
    assert set(tiers) == {(4, (1, 4))}
    tiers.clear()
    at_once = eng.predict(TEXTS)
    assert (16, (4, 16)) in tiers
  finally:
    eng.close(5)
  for got in (one_each, at_once):
    assert [p.exit_layer for p in got] == ref.exit_layers.tolist()
    np.testing.assert_allclose([p.probabilities for p in got], jax.nn.softmax(ref.logits, -1), atol=1e-5)


def test_steps_whose_run_takes_no_longest_still_serve(model):
  """An artefact exported before the views runs with its own runtime, whose `run` has no `longest`: the
  engine then runs over the slots' whole length, with the same answers."""
  class StepsOfBefore(serving.LocalSteps):
    def run(self, state, criterion, min_free, max_steps, delta=0.0):
      return super().run(state, criterion, min_free, max_steps, delta)

  policy = entropy_gap_policy(model, TEXTS)
  ref = inference.predict(model, TEXTS, policy, batch_size=4, max_length=64)
  eng = serving.Engine(policy=policy, steps=StepsOfBefore(model, slots=8, batch=4, max_length=64),
                       tokenizer=model.tokenizer)
  try:
    assert not eng._run_takes_longest and not eng._run_takes_busy
    got = eng.predict(TEXTS)
  finally:
    eng.close(5)
  assert [p.exit_layer for p in got] == ref.exit_layers.tolist()
  np.testing.assert_allclose([p.probabilities for p in got], jax.nn.softmax(ref.logits, -1), atol=1e-5)


def test_engine_tokenizes_as_the_transformers_tokenizer(model, engine):
  """The engine encodes with the Rust tokenizer directly (serving.rust_tokenizer): same ids and token types
  as the wrapper's __call__, for texts, pairs and odd Unicode; a slow tokenizer falls back to the wrapper."""
  assert engine._rust_tokenizer is not None
  texts = TEXTS + ["  héllo   Wörld ", "naïve café\u00a0x", "emoji 🙂 ok", "中文字符", "tab\tand\nnewline"]
  pairs = list(reversed(texts))
  for a, b in ((texts[:8], None), (texts[8:], None), (texts[:8], pairs[:8])):   # the engine takes <= 8 per request
    enc = model.tokenizer(a, b, truncation=False, return_token_type_ids=True, return_attention_mask=False)
    rows = engine.encode(a, b)
    assert [r[0].tolist() for r in rows] == [list(x) for x in enc["input_ids"]]
    assert [r[1].tolist() for r in rows] == [list(x) for x in enc["token_type_ids"]]
  assert serving.rust_tokenizer(object()) is None


def test_per_request_thresholds(model, engine):
  never = engine.predict(TEXTS, policy={"criterion": "entropy", "threshold": 0.0})
  always = engine.predict(TEXTS, policy="entropy:9")
  late = engine.predict(TEXTS, policy={"criterion": "entropy", "threshold": 9, "min_layer": 2})
  L = model.config.num_layers
  assert [p.exit_layer for p in never] == [L] * len(TEXTS)
  assert [p.exit_layer for p in always] == [1] * len(TEXTS)
  assert [p.exit_layer for p in late] == [2] * len(TEXTS)
  with pytest.raises(serving.RequestError, match="criterion"):
    engine.submit(TEXTS[:1], policy="maxprob:0.9")


@pytest.mark.parametrize("texts, kw, message", [
    ([], {}, "non-empty list"), (["ok", ""], {}, "non-empty string"), ("just a string", {}, "non-empty list"),
    (["word " * 80], {}, "at most 64"), (["ok"], {"policy": "entropy"}, "CRITERION:THRESHOLD"),
    (["ok"], {"policy": {"criterion": "nope", "threshold": 1}}, "unknown criterion"),
    (["ok"], {"policy": "entropy:-1"}, ">= 0"), (["ok"], {"timeout_ms": -5}, "positive"),
    (["ok"], {"text_pairs": ["a", "b"]}, "one per text")])
def test_bad_requests_are_refused_alone(engine, texts, kw, message):
  with pytest.raises(serving.RequestError, match=message):
    engine.submit(texts, **kw)
  assert engine.predict(TEXTS[:2])   # the engine goes on serving


def test_queue_full_deadline_and_cancel(model):
  eng = serving.Engine(model, "entropy:0.0", slots=4, batch=2, max_length=64, max_queue=3)
  try:
    with pytest.raises(serving.Overloaded):
      eng.submit(TEXTS[:4])                                   # 4 examples > a queue of 3: refused at once
    late = eng.submit(TEXTS[:2], timeout_ms=1e-3)             # its deadline passes before it is admitted
    with pytest.raises(serving.DeadlineExceeded):
      late.result(30)
    gone = eng.submit(TEXTS[:3])
    gone.cancel()                                             # a client that went away
    assert [p.exit_layer for p in eng.predict(TEXTS[:3])] == [model.config.num_layers] * 3
  finally:
    eng.close(5)
  with pytest.raises(serving.ShuttingDown):
    eng.submit(TEXTS[:1])


def test_a_cancelled_request_gives_its_queue_places_back(model):
  eng = serving.Engine(model, "entropy:0.0", slots=4, batch=2, max_length=64, max_queue=3)
  try:
    with eng._cond:   # the worker cannot take rows meanwhile: the queue stays full until the cancellation
      gone = eng.submit(TEXTS[:3])
      with pytest.raises(serving.Overloaded):
        eng.submit(TEXTS[:1])
      gone.cancel()
      kept = eng.submit(TEXTS[3:6])
    assert [p.exit_layer for p in kept.result(30)] == [model.config.num_layers] * 3
  finally:
    eng.close(5)


def test_full_model_baseline_answers_with_the_final_exit(model):
  eng = serving.Engine(model, slots=8, batch=4, max_length=64, full_model=True)
  try:
    got = eng.predict(TEXTS)
  finally:
    eng.close(5)
  enc = model.encode(TEXTS, max_length=64)
  final = np.asarray(model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]).exit_logits)[-1]
  assert [p.exit_layer for p in got] == [model.config.num_layers] * len(TEXTS)
  np.testing.assert_allclose([p.probabilities for p in got], jax.nn.softmax(final, -1), atol=1e-5)


def test_http_app(model, engine):
  from starlette.testclient import TestClient
  from rome_flax import server
  metrics = server.Metrics(model.config.num_layers)
  app = server.build_app(engine, metrics, {"slots": 8})
  with TestClient(app) as client:
    r = client.post("/predict", json={"texts": TEXTS[:2]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["predictions"]) == 2 and body["server_ms"] > 0
    assert set(body["predictions"][0]) == {"label", "probabilities", "exit_layer"}
    for payload, status in ((b"{not json", 400), (b"[1, 2]", 400), (json.dumps({"texts": [""]}).encode(), 400),
                            (json.dumps({"texts": ["a"], "colour": 1}).encode(), 400),
                            (json.dumps({"texts": ["a"] * 20}).encode(), 400),
                            (json.dumps({"texts": ["a"] * 8 + ["b"] * 0, "timeout_ms": 1e-3}).encode(), 504)):
      r = client.post("/predict", content=payload)
      assert r.status_code == status, (payload, r.text)
      assert "error" in r.json()
    assert client.get("/health").json()["status"] == "ok"
    text = client.get("/metrics").text
    for name in ("rome_flax_request_duration_seconds", "rome_flax_queue_duration_seconds", "rome_flax_queue_size",
                 "rome_flax_slot_occupancy", "rome_flax_exit_layer_bucket", "rome_flax_rejected_total"):
      assert name in text


def _post(port: int, texts, timeout: float = 60.0):
  req = urllib.request.Request(f"http://127.0.0.1:{port}/predict", data=json.dumps({"texts": texts}).encode(),
                               headers={"Content-Type": "application/json"})
  with urllib.request.urlopen(req, timeout=timeout) as r:
    return r.status, json.loads(r.read())


def test_server_process_drains_on_sigterm(model, tmp_path):
  """`python -m rome_flax serve --port 0` on 127.0.0.1 (`--warm_up background`): answers, /health says
  when every shape is compiled, then SIGTERM while a request is in flight: that request is answered, the
  server exits 0."""
  export = tmp_path / "export"
  model.save_pretrained(export)
  env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
  proc = subprocess.Popen([sys.executable, "-m", "rome_flax", "serve", "--checkpoint", str(export), "--port", "0",
                           "--max_batch", "4", "--slots", "8", "--warm_up", "background"], stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, env=env, cwd=tmp_path)
  try:
    port, lines, deadline = None, [], time.monotonic() + 120
    while port is None and time.monotonic() < deadline:
      line = proc.stdout.readline()
      if not line:
        break
      lines.append(line)
      if line.startswith("serving on http://127.0.0.1:"):
        port = int(line.rsplit(":", 1)[1])
    assert port, "".join(lines)
    cache = os.environ["JAX_COMPILATION_CACHE_DIR"]   # the suite's (conftest): the start line names it
    assert any(f"s (compilation cache {cache})" in line for line in lines), "".join(lines)
    assert any("compile in the background" in line for line in lines), "".join(lines)
    status, body = _post(port, TEXTS[:3])
    assert status == 200 and len(body["predictions"]) == 3
    deadline, health = time.monotonic() + 120, {}
    while not health.get("warm") and time.monotonic() < deadline:
      with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=30) as r:
        health = json.loads(r.read())
      time.sleep(0.2)
    assert health["status"] == "ok" and health["warm"] is True, health
    results = []
    flights = [threading.Thread(target=lambda: results.append(_post(port, TEXTS))) for _ in range(3)]
    for t in flights:
      t.start()
    time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    for t in flights:
      t.join(60)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, "".join(lines) + out
    assert [s for s, _ in results] == [200] * 3
    assert "draining" in out and "stopped" in out
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.wait(10)


def test_engine_serves_from_an_exported_artefact(model, engine, tmp_path):
  """`serve --artefact`: the same engine driven by the jax.export'ed steps answers as the in-process one."""
  import importlib.util
  from rome_flax.engine import artefact
  export = tmp_path / "export"
  model.save_pretrained(export)
  out = tmp_path / "artefact"
  artefact.export_artefact(export, out, slots=8, batch=4, max_length=64, criteria=["entropy"], say=lambda *a, **k: None)
  spec = importlib.util.spec_from_file_location("artefact_runtime_copy", out / "artefact_runtime.py")
  runtime = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(runtime)
  steps = runtime.load(out)
  served = serving.Engine(policy=engine.policy, steps=steps, tokenizer=model.tokenizer,
                          label_names=model.export_info.label_names, warm_up="background")
  try:
    answers = [served.predict(TEXTS)]   # (most likely) while the other views compile
    deadline = time.monotonic() + 120
    while not served.warm and time.monotonic() < deadline:
      time.sleep(0.1)
    assert served.warm
    from jax import monitoring
    traces = []

    def listener(event, duration, **kw):
      if event.startswith(("/jax/core/compile/", "/jax/compilation_cache/")):   # trace, lower, compile
        traces.append(event)
    monitoring.register_event_duration_secs_listener(listener)
    try:   # the background compiled the runs the worker calls (its state committed to the device, as theirs)
      answers.append(served.predict(TEXTS))
      answers.append([served.predict([t])[0] for t in TEXTS])
    finally:
      monitoring.unregister_event_duration_listener(listener)
    assert not traces, traces
  finally:
    served.close(5)
  want = engine.predict(TEXTS)
  for got in answers:
    assert [p.exit_layer for p in got] == [p.exit_layer for p in want]
    assert [p.label for p in got] == [p.label for p in want]
    np.testing.assert_allclose([p.probabilities for p in got], [p.probabilities for p in want], atol=1e-5)


def test_a_taken_port_is_one_error_line_before_loading(tmp_path):
  import socket
  taken = socket.socket()
  taken.bind(("127.0.0.1", 0))
  taken.listen()
  try:
    port = taken.getsockname()[1]
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    r = subprocess.run([sys.executable, "-m", "rome_flax", "serve", "--checkpoint", str(tmp_path / "nothing_here"),
                        "--port", str(port)], capture_output=True, text=True, env=env, timeout=120)
  finally:
    taken.close()
  assert r.returncode == 2
  assert r.stderr.strip().splitlines() == [f"error: --host 127.0.0.1 --port {port}: cannot listen there "
                                           "(Address already in use)"]


def test_serve_options_an_artefact_fixes_are_refused(tmp_path, capsys):
  """An artefact's batch, slots and length were fixed at export: asking for others is one error line, not
  a server that silently runs with the artefact's."""
  from rome_flax.__main__ import main
  art = str(tmp_path / "artefact")
  for argv, message in ((["--slots", "8"], "--slots: an artefact's batch, slots and length are fixed at export"),
                        (["--max_batch", "4", "--max_length", "32"], "--max_batch, --max_length: an artefact's"),
                        (["--checkpoint", str(tmp_path)], "not both")):
    assert main(["serve", "--artefact", art, "--port", "0"] + argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


# ----------------------------------------------------------------------------- token tasks (TOKEE, SENTEE)

SENTENCES = [["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."], ["Peter", "Blackburn"],
             ["BRUSSELS", "1996-08-22"], ["The", "European", "Commission", "said", "on", "Thursday", "it",
                                          "disagreed", "with", "German", "advice", "."],
             ["Germany", "'s", "representative"], ["He", "said", "further", "scientific", "study", "was", "required"],
             "It said consumers should shun British lamb until scientists determine whether mad cow disease can be "
             "transmitted to sheep , the Commission 's spokesman told reporters .".split()]   # over 32 pieces
TAGS = ("O", "B-PER", "I-PER", "B-ORG", "I-ORG")


@pytest.fixture(scope="module")
def token_model(minilm_dir):
  """A tiny 4-layer token-task model (sequence labelling) with MiniLM's tokenizer, words halting at
  different layers."""
  cfg = ModelConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=4, num_attention_heads=4,
                    intermediate_size=48, max_position_embeddings=64, num_labels=len(TAGS), head="token")
  m = MultiExitBert.from_config(cfg, seed=5, tokenizer=load_tokenizer(minilm_dir))
  m.params["exits"]["classifier"]["kernel"] = m.params["exits"]["classifier"]["kernel"] * 60.0
  m.export_info = ExportInfo(task="ner", label_names=TAGS, max_length=64)
  return m


def test_token_task_engine_refills_and_equals_offline_tokee_and_sentee(token_model):
  """A token task served with TOKEE (each word its own exit; a sentence's slot refilled once all its
  words halted) and with a sentence criterion (SENTEE): the offline `predict_tags` answers, for one call
  and for one sentence per request arriving while others run."""
  from rome_flax.engine import token_exit as te
  L = token_model.config.num_layers
  tokee = te.make_token_policy(0.02, 3, L)
  sentee = ep.make_policy("entropy", 0.02, L, num_labels=len(TAGS), kind=TOKEN)
  for policy in (tokee, sentee):
    ref = te.predict_tags(token_model, SENTENCES, policy, batch_size=4, max_length=64)
    eng = serving.Engine(token_model, policy, slots=4, batch=2, max_length=64)
    try:
      one_call = eng.predict(tokens=SENTENCES[:4]) + eng.predict(tokens=SENTENCES[4:])   # 4 slots
      one_each = [f.result(30)[0] for f in [eng.submit(tokens=[s]) for s in SENTENCES]]
    finally:
      eng.close(5)
    for got in (one_call, one_each):
      assert [p.tags for p in got] == ref.tags
      assert [p.exit_layers for p in got] == ref.exit_layers
      assert all(len(p.probabilities) == len(s) and abs(sum(p.probabilities[0]) - 1) < 1e-5
                 for p, s in zip(got, SENTENCES))
    layers = sum(ref.exit_layers, [])
    assert 1 < len(set(layers)), f"{policy}: exits do not spread over layers"


def test_token_task_requests_full_model_and_http(token_model):
  from starlette.testclient import TestClient
  from rome_flax import server
  L = token_model.config.num_layers
  full = serving.Engine(token_model, slots=4, batch=2, max_length=64, full_model=True)
  try:
    got = full.predict(tokens=SENTENCES[:3])
  finally:
    full.close(5)
  from rome_flax.engine import token_exit as te
  ref = te.predict_tags(token_model, SENTENCES[:3], te.make_token_policy(0.0, 3, L), batch_size=4, max_length=64)
  assert [p.tags for p in got] == ref.tags and all(set(p.exit_layers) == {L} for p in got)

  eng = serving.Engine(token_model, "tokee:0.02", slots=4, batch=2, max_length=64)
  try:
    with pytest.raises(serving.RequestError, match="send 'tokens'"):
      eng.submit(["a text"])
    for bad, message in (([], "non-empty list"), ([["ok", ""]], "non-empty words"), ([[]], "non-empty list"),
                         ([["word"] * 80], "max_length"), ("EU rejects", "non-empty list")):
      with pytest.raises(serving.RequestError, match=message):
        eng.submit(tokens=bad)
    with pytest.raises(serving.RequestError, match="window is 3"):
      eng.submit(tokens=SENTENCES[:1], policy={"criterion": "tokee", "threshold": 0.1, "window": 5})
    late = eng.predict(tokens=SENTENCES[:2], policy="tokee:0")          # tau 0: every word runs every layer
    assert all(set(p.exit_layers) == {L} for p in late)
    app = server.build_app(eng, server.Metrics(L), {"slots": 4})
    with TestClient(app) as client:
      r = client.post("/predict", json={"tokens": SENTENCES[:2], "policy": "tokee:0.02"})
      assert r.status_code == 200, r.text
      body = r.json()["predictions"]
      assert set(body[0]) == {"tags", "probabilities", "exit_layers"} and len(body[0]["tags"]) == len(SENTENCES[0])
      assert client.post("/predict", json={"texts": ["a text"]}).status_code == 400
  finally:
    eng.close(5)


def test_a_client_that_disconnects_frees_its_slots(model):
  """Through the HTTP app: a client that goes away while its request waits gets no answer (499 in the
  log), its request is cancelled and its slots freed; the engine answers the next request."""
  import asyncio
  from rome_flax import server
  steps = serving.LocalSteps(model, slots=4, batch=2, max_length=64)
  gate = threading.Event()

  class HeldSteps:   # the worker's first run waits until the client has gone
    def __getattr__(self, name):
      return getattr(steps, name)

    def run(self, *a, **kw):
      gate.wait(30)
      return steps.run(*a, **kw)

  metrics = server.Metrics(model.config.num_layers)
  eng = serving.Engine(policy="entropy:0.0", steps=HeldSteps(), tokenizer=model.tokenizer, metrics=metrics,
                       warm_up=False)
  app = server.build_app(eng, metrics, {})
  body = json.dumps({"texts": TEXTS[:4]}).encode()
  sent = []

  async def receive():
    if not sent:
      sent.append(1)
      return {"type": "http.request", "body": body, "more_body": False}
    return {"type": "http.disconnect"}   # the client has gone

  async def send(message):
    sent.append(message)

  scope = {"type": "http", "method": "POST", "path": "/predict", "headers": [(b"content-type", b"application/json")],
           "query_string": b"", "http_version": "1.1", "scheme": "http", "server": ("127.0.0.1", 80),
           "client": ("127.0.0.1", 1), "root_path": "", "app": app}
  try:
    asyncio.run(asyncio.wait_for(app(scope, receive, send), 30))
    start = next(m for m in sent[1:] if m["type"] == "http.response.start")
    assert start["status"] == 499
    gate.set()
    assert [p.exit_layer for p in eng.predict(TEXTS[:4], timeout_ms=30_000)] == [model.config.num_layers] * 4
    assert 'reason="disconnected"} 1.0' in metrics.text().decode()
  finally:
    gate.set()
    eng.close(5)


def test_a_regression_export_serves_patience_given_as_a_json_policy(minilm_dir, tmp_path):
  """A regression model answers its value at the exit regression patience picks (the policy as the request
  body's JSON object, the form --policy takes for it); a server of a regression export without a policy is
  one error line before compiling (patience needs a tolerance in the label's units: no default fits)."""
  from rome_flax import server
  from rome_flax.errors import RomeFlaxError
  cfg = ModelConfig(vocab_size=30522, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                    intermediate_size=48, max_position_embeddings=64, num_labels=1)
  model = MultiExitBert.from_config(cfg, seed=5, tokenizer=load_tokenizer(minilm_dir))
  model.params["exits"]["classifier"]["kernel"] = model.params["exits"]["classifier"]["kernel"] * 50.0
  model.export_info = ExportInfo(task="stsb", is_regression=True, max_length=64)
  enc = model.encode(TEXTS, max_length=64)
  z = np.asarray(model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]).exit_logits)   # [E, N, 1]
  # a tolerance in a gap of the first two exits' changes: some examples agree early, some not, none within rounding
  delta = float(ep.threshold_in_gap(np.abs(z[1, :, 0] - z[0, :, 0])))
  want = np.asarray(ep.decide(ep.make_policy("patience", 1, cfg.num_exits, num_labels=1, delta=delta),
                              jnp.asarray(z)).exit_index_N)
  assert 1 < len(set(want.tolist()))
  spec = json.dumps({"criterion": "patience", "threshold": 1, "delta": delta})
  eng = serving.Engine(model, spec, slots=8, batch=4, max_length=64)
  try:
    got = eng.predict(TEXTS)
  finally:
    eng.close(5)
  assert [p.exit_layer for p in got] == (want + 1).tolist()
  assert all(p.probabilities is None for p in got)
  np.testing.assert_allclose([p.label for p in got], z[want, np.arange(len(TEXTS)), 0], atol=1e-5)
  with pytest.raises(serving.RequestError, match="not a JSON object"):
    serving.make_policy("{criterion: patience}", cfg.num_exits, 1)
  with pytest.raises(RomeFlaxError, match=r"needs a tolerance .* a served policy as JSON"):   # the request's own form
    serving.make_policy("patience:2", cfg.num_exits, 1)
  model.save_pretrained(tmp_path / "reg")
  with pytest.raises(RomeFlaxError, match="regression model: it exits by patience"):
    server.serve(str(tmp_path / "reg"), port=0, say=lambda *a, **k: None)
