"""`python -m rome_flax export`: the engine's steps and the bucketed forwards as a jax.export artefact.

Tiny random models (a classifier with exits made decisive, a regressor) are exported; one `python -I`
subprocess in which rome_flax cannot be imported loads each artefact through its own artefact_runtime.py,
drives the engine (two admission waves, an eviction, runs cut by max_steps / min_free) and the forwards of
every bucket, and writes every result; the same calls in-process (engine.*, early_exit.*) must give the
same bits: logits, exit layers and the whole engine state.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rome_flax.__main__ import main
from rome_flax.engine import artefact, scheduler as engine, serving
from rome_flax.engine import early_exit as ee
from rome_flax.engine import exit_policy as ep
from rome_flax.model.config import ModelConfig
from rome_flax.model.pretrained import ExportInfo, MultiExitBert

SLOTS, BATCH, LENGTH = 8, 4, 24
CLS = ModelConfig(vocab_size=99, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=37,
                  max_position_embeddings=64, num_labels=3)
REG = CLS.replace(num_labels=1)
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "movie", "was", "good", "bad", "not"]

# Runs with jax, numpy and the artefact's own runtime; rome_flax is made unimportable.
SCRIPT = textwrap.dedent("""
    import json, sys
    sys.modules["rome_flax"] = None
    job = json.load(open(sys.argv[1]))
    import numpy as np
    out = {}
    for name, spec in job["artefacts"].items():
        sys.path.insert(0, spec["dir"])
        import artefact_runtime
        sys.path.remove(spec["dir"])
        steps = artefact_runtime.load(spec["dir"])
        del sys.modules["artefact_runtime"]
        x = np.load(spec["inputs"])
        for c in spec["criteria"]:
            th = x["threshold_" + c]
            state = steps.init()
            state = steps.admit(state, np.arange(4), x["ids"][:4], x["mask"][:4], x["types"][:4], x["priority"][:4],
                                th[:4])
            state = steps.run(state, c, min_free=1 << 30, max_steps=2, delta=spec["delta"])
            # fewer rows than the batch: padded with dropped rows
            state = steps.admit(state, [5, 6], x["ids"][4:6], x["mask"][4:6], x["types"][4:6], x["priority"][4:6],
                                th[4:6])
            state = steps.evict(state, np.arange(steps.slots) == 2)
            state = steps.run(state, c, min_free=steps.slots - 1, max_steps=1 << 30, delta=spec["delta"])
            running, exits, logits = steps.read(state)
            out[f"{name}/{c}/running"], out[f"{name}/{c}/exit"], out[f"{name}/{c}/out"] = running, exits, logits
            state = steps.run(state, c, delta=spec["delta"])
            for k, v in state.items():
                out[f"{name}/{c}/state/{k}"] = np.asarray(v)
            # rows that fit 16 positions, given 24 wide: admitted at that bucket, run under a view of it
            r, fresh = [1, 3], steps.init()
            state = steps.admit(fresh, [0, 1], x["ids"][r], x["mask"][r], x["types"][r], x["priority"][r], th[r])
            out[f"{name}/{c}/admit_donated"] = np.array([v.is_deleted() for v in fresh.values()])
            state = steps.run(state, c, delta=spec["delta"], longest=int(x["mask"][r].sum(1).max()))
            for k, v in state.items():
                out[f"{name}/{c}/view/{k}"] = np.asarray(v)
        for b, s in spec["buckets"]:
            args = (x["ids"][:b, :s], x["mask"][:b, :s], x["types"][:b, :s])
            out[f"{name}/full_model/{b}/{s}"] = steps.full_model(*args)
            out[f"{name}/all_exits/{b}/{s}"] = steps.all_exits(*args)
        if spec["texts"]:
            ids, types = steps.tokenize(spec["texts"], spec["pairs"], max_length=6)
            out[name + "/tokenize"] = json.dumps([ids, types])
        out[name + "/called"] = json.dumps(sorted(steps._jitted))   # the exported functions the calls above took
        out[name + "/attributes"] = json.dumps([steps.num_layers, steps.num_exits, steps.num_labels,
                                                steps.is_token_task, steps.is_regression, steps.label_names,
                                                steps.slots, steps.seq, steps.batch, list(steps.sizes),
                                                list(steps.lengths), list(steps.criteria)])
    out["modules"] = json.dumps(sorted({m.split(".")[0] for m in sys.modules if sys.modules[m] is not None}))
    np.savez(job["out"], **out)
""")


# A token task's artefact served alone: words -> pieces by the runtime, TOKEE, each word's exit and tag.
TOKEN_SCRIPT = textwrap.dedent("""
    import json, sys
    sys.modules["rome_flax"] = None
    art, job = sys.argv[1], json.loads(sys.argv[2])
    sys.path.insert(0, art)
    import artefact_runtime
    import numpy as np
    steps = artefact_runtime.load(art)
    ids, types, words = steps.tokenize_words(job["sentences"])
    S, n = max(map(len, ids)), len(ids)
    pad = lambda rows, fill: np.array([list(r) + [fill] * (S - len(r)) for r in rows], np.int32)
    state = steps.admit(steps.init(tokee=True), np.arange(n), pad(ids, steps.pad_token_id),
                        pad([[1] * len(r) for r in ids], 0), pad(types, 0), np.zeros(n), np.array(job["tau"]),
                        pad(words, 0))
    running, exits, logits = steps.read(steps.run(state, "tokee"))
    W = [len(s) for s in job["sentences"]]
    answers = [([steps.label_names[k] for k in logits[i, :w].argmax(-1)], (exits[i, :w] + 1).tolist())
               for i, w in enumerate(W)]
    refused = []
    for bad in ([["the"] * (steps.seq - 1)], "the movie", [["the", "movie"], "was good"]):
        try:
            steps.tokenize_words(bad)
            refused.append(None)
        except artefact_runtime.ArtefactError as e:
            refused.append(str(e))
    print(json.dumps({"encoded": [ids, types, words], "answers": answers, "running": bool(running.any()),
                      "refused": refused}))
""")


def _tokenizer(path) -> None:
  """A tiny BERT-style tokenizer.json ([CLS] a [SEP] b [SEP], token types 0 / 1)."""
  from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
  tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
  tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=False, strip_accents=False,
                                              lowercase=False)   # as BERT's: a control character is no piece
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                     special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  tok.save(str(path / "tokenizer.json"))


def _inputs(cfg, rng) -> dict:
  lengths = np.array([24, 7, 16, 3, 20, 11])
  ids = rng.integers(4, cfg.vocab_size, (6, LENGTH)).astype(np.int32)
  mask = (np.arange(LENGTH)[None] < lengths[:, None]).astype(np.int32)
  ids[mask == 0] = 0
  types = (np.arange(LENGTH)[None] >= lengths[:, None] // 2).astype(np.int32) * mask
  x = {"ids": ids, "mask": mask, "types": types, "priority": lengths.astype(np.int32)}
  E = cfg.num_exits
  x["threshold_entropy"] = rng.uniform(0, 1.1, (6, E)).astype(np.float32)
  x["threshold_maxprob"] = rng.uniform(0.3, 1.0, (6, E)).astype(np.float32)
  x["threshold_patience"] = np.repeat(np.array([1, 1, 2, 1, 2, 1], np.float32)[:, None], E, 1)
  return x


def _model(cfg, seed) -> MultiExitBert:
  """Random weights, exits made decisive (a sharp classifier) so that examples leave at different layers."""
  model = MultiExitBert.from_config(cfg, seed=seed)
  params = jax.tree.map(np.array, jax.device_get(model.params))
  params["exits"]["classifier"]["kernel"] = params["exits"]["classifier"]["kernel"] * 150.0
  model.params = jax.tree.map(jnp.asarray, params)
  return model


def _in_process(model, x, criteria, delta, buckets) -> dict:
  """The same calls as SCRIPT through engine.* and early_exit.* on the export's parameters."""
  cfg, out = model.config, {}
  prepared = ee.prepare_params(model.params)
  sizes, lengths = serving.default_sizes(BATCH), engine.trim_lengths(LENGTH)
  pad = lambda a, n: np.concatenate([a, np.zeros((n,) + a.shape[1:], a.dtype)])
  for c in criteria:
    policy = ep.make_policy(c, 1.0, cfg.num_exits, num_labels=cfg.num_labels,
                            delta=delta if c == "patience" and cfg.is_regression else None)
    th = x["threshold_" + c]
    state = engine.init(cfg, SLOTS, LENGTH)
    state = engine.admit(prepared, cfg, state, np.arange(4, dtype=np.int32), x["ids"][:4], x["mask"][:4],
                         x["types"][:4], x["priority"][:4], th[:4])
    def run(state, min_free=engine.NEVER, max_steps=engine.NEVER, view=None):   # both passed: one compilation
      return engine.run(prepared, cfg, policy, state, BATCH, lengths=lengths, sizes=sizes, min_free=min_free,
                        max_steps=max_steps, pick="oldest", view=view)

    state = run(state, max_steps=2)
    state = engine.admit(prepared, cfg, state, np.array([5, 6, SLOTS, SLOTS], np.int32), pad(x["ids"][4:6], 2),
                         pad(x["mask"][4:6], 2), pad(x["types"][4:6], 2), pad(x["priority"][4:6], 2),
                         pad(th[4:6], 2))
    state = engine.evict(state, np.arange(SLOTS) == 2)
    state = run(state, min_free=SLOTS - 1)
    out[f"{c}/running"], out[f"{c}/exit"], out[f"{c}/out"] = (np.asarray(state.running_N), np.asarray(state.exit_N),
                                                              np.asarray(state.out_NxC))
    state = run(state)
    for k, v in artefact.state_dict(state).items():
      out[f"{c}/state/{k}"] = np.asarray(v)
    r, cut = [1, 3], lambda a: pad(a[[1, 3], :16], 2)   # lengths 7 and 3: the 16 bucket, the view of 16
    state = engine.admit(prepared, cfg, engine.init(cfg, SLOTS, LENGTH), np.array([0, 1, SLOTS, SLOTS], np.int32),
                         cut(x["ids"]), cut(x["mask"]), cut(x["types"]), pad(x["priority"][r], 2), pad(th[r], 2))
    for k, v in artefact.state_dict(run(state, view=16)).items():
      out[f"{c}/view/{k}"] = np.asarray(v)
  for b, s in buckets:
    args = (x["ids"][:b, :s], x["mask"][:b, :s], x["types"][:b, :s])
    out[f"full_model/{b}/{s}"] = np.asarray(ee.full_model(prepared, cfg, *args))
    out[f"all_exits/{b}/{s}"] = np.asarray(ee.all_exits(prepared, cfg, *args))
  return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """Both artefacts exported and run in the isolated subprocess; the in-process results beside them."""
  tmp = tmp_path_factory.mktemp("artefact")
  rng = np.random.default_rng(0)
  specs, expected, models = {}, {}, {}
  for name, cfg, criteria, info in (
      ("cls", CLS, ep.CRITERIA, ExportInfo(task="sst2", label_names=("neg", "mid", "pos"), max_length=LENGTH)),
      ("reg", REG, ("patience",), ExportInfo(task="stsb", is_regression=True))):
    model = _model(cfg, seed=len(specs))
    src, out = tmp / f"{name}_export", tmp / f"{name}_artefact"
    model.save_pretrained(src, info)
    if name == "cls":
      _tokenizer(src)
    argv = ["export", "--checkpoint", str(src), "--out", str(out), "--slots", str(SLOTS), "--batch", str(BATCH)]
    assert main(argv + ([] if info.max_length else ["--max_length", str(LENGTH)])) == 0
    x = _inputs(cfg, rng)
    # regression patience: a tolerance amid the changes between exits, so that examples leave at different layers
    z = np.asarray(ee.all_exits(ee.prepare_params(model.params), cfg, x["ids"], x["mask"], x["types"]))
    delta = float(np.quantile(np.abs(z[1, :, 0] - z[0, :, 0]), 0.6)) if cfg.is_regression else 0.0
    np.savez(tmp / f"{name}_inputs.npz", **x)
    # every bucket of the classifier; the regressor's largest (its head is what differs)
    buckets = [(b, s) for b in serving.default_sizes(BATCH) for s in engine.trim_lengths(LENGTH)]
    buckets = buckets if name == "cls" else buckets[-1:]
    specs[name] = {"dir": str(out), "inputs": str(tmp / f"{name}_inputs.npz"), "criteria": list(criteria),
                   "buckets": buckets,
                   "delta": delta, "texts": ["the movie was good", "not bad at all"] if name == "cls" else None,
                   "pairs": ["bad", "the the the the the"] if name == "cls" else None}
    expected[name] = _in_process(model, x, criteria, delta, buckets)
    models[name] = (model, src, out)
  job = tmp / "job.json"
  job.write_text(json.dumps({"artefacts": specs, "out": str(tmp / "got.npz")}))
  proc = subprocess.run([sys.executable, "-I", "-c", SCRIPT, str(job)], cwd=tmp, capture_output=True, text=True,
                        timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  got = dict(np.load(tmp / "got.npz"))
  return got, expected, models


def test_the_runtime_process_never_imports_rome_flax(runs):
  modules = json.loads(str(runs[0]["modules"]))
  assert "rome_flax" not in modules and "flax" not in modules and "jax" in modules
  assert not {"torch", "transformers", "orbax"} & set(modules)


@pytest.mark.parametrize("name", ["cls", "reg"])
def test_engine_steps_and_forwards_are_bit_identical(runs, name):
  got, expected, _ = runs
  want = expected[name]
  assert {k.split("/", 1)[1] for k in got if k.startswith(name + "/") and "/" in k[len(name) + 1:]} >= set(want)
  for key, value in want.items():
    have = got[f"{name}/{key}"]
    assert have.dtype == value.dtype and have.shape == value.shape, key
    assert have.tobytes() == value.tobytes(), key   # bit for bit (NaN included: the policy's "no prediction yet")
  # the cut runs left work behind, the last one none; exits spread over the layers
  criteria = {k.split("/")[0] for k in want if k.endswith("/exit")}
  for c in criteria:
    assert not want[f"{c}/state/running_N"].any()
    assert want[f"{c}/running"].sum() <= 1   # min_free = N - 1
  for c in criteria:   # slots 2 (evicted) and 4, 7 (never admitted) aside
    assert len(set(want[f"{c}/state/exit_N"][[0, 1, 3, 5, 6]].tolist())) > 1, c


def test_attributes_tokenizer_and_manifest(runs):
  got, _, models = runs
  assert json.loads(str(got["cls/attributes"])) == [3, 3, 3, False, False, ["neg", "mid", "pos"], SLOTS, LENGTH,
                                                    BATCH, [1, 4], [16, 24], ["entropy", "maxprob", "patience"]]
  assert json.loads(str(got["reg/attributes"]))[3:5] == [False, True]
  from transformers import PreTrainedTokenizerFast
  tok = PreTrainedTokenizerFast(tokenizer_file=str(models["cls"][1] / "tokenizer.json"))
  enc = tok(["the movie was good", "not bad at all"], ["bad", "the the the the the"], truncation=True, max_length=6,
            return_token_type_ids=True)
  assert json.loads(str(got["cls/tokenize"])) == [enc["input_ids"], enc["token_type_ids"]]
  from rome_flax.engine import calibration
  _, src, out = models["cls"]
  manifest = json.loads((out / "manifest.json").read_text())
  assert manifest["export"]["identity"] == calibration.export_identity(src)
  assert manifest["jax_version"] == jax.__version__ and "cpu" in manifest["platforms"]
  assert {f"admit_b{b}_s{s}" for b in (1, BATCH) for s in (16, LENGTH)} | {"run_entropy", "run_entropy_v16"} <= set(
      manifest["functions"])
  # the short rows took the 16 bucket and the run its view; the others the whole slots; admit updates the
  # slots in place (the state it was given is donated)
  assert got["cls/entropy/admit_donated"].all()
  called = set(json.loads(str(got["cls/called"])))
  assert {"admit_b4_s16", "admit_b4_s24", "run_entropy_v16", "run_entropy", "run_patience_v16"} <= called
  assert (out / "artefact_runtime.py").read_bytes() == (artefact.Path(artefact.runtime.__file__)).read_bytes()
  assert sorted(manifest["files"]) == sorted(
      str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() and p.name not in (
          "manifest.json", "rome_flax_output.json") and p.parent.name != "__pycache__")   # the subprocess's import


def test_a_damaged_artefact_is_refused(runs, tmp_path):
  import shutil
  from rome_flax.engine import artefact_runtime
  out = tmp_path / "copy"
  shutil.copytree(runs[2]["reg"][2], out)
  params = out / "params.npz"
  data = bytearray(params.read_bytes())
  data[len(data) // 2] ^= 1
  params.write_bytes(bytes(data))
  with pytest.raises(artefact_runtime.ArtefactError, match="damaged"):
    artefact_runtime.load(out)


def _one_error(capsys) -> str:
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: "), err
  return err[0]


def test_bad_input_is_one_error_line(runs, tmp_path, capsys):
  _, src, out = runs[2]["cls"]
  _, reg_src, _ = runs[2]["reg"]
  before = sorted(p.name for p in out.rglob("*"))
  new = tmp_path / "new"
  rows = [
      (["--checkpoint", str(tmp_path / "nowhere"), "--out", str(new)], "does not exist"),
      (["--checkpoint", str(tmp_path), "--out", str(new)], "not a rome_flax export"),
      (["--checkpoint", str(src), "--out", str(out)], "already exists and is not empty"),
      (["--checkpoint", str(src), "--out", str(src)], "the export itself"),
      (["--checkpoint", str(src), "--out", str(new), "--batch", "16", "--slots", "8"], "batch <= slots"),
      (["--checkpoint", str(src), "--out", str(new), "--sizes", "2,x"], "comma list of integers"),
      (["--checkpoint", str(reg_src), "--out", str(new), "--max_length", "24", "--criteria", "entropy"], "patience"),
      (["--checkpoint", str(src), "--out", str(new), "--max_length", "1000"], "--max_length 1000"),
  ]
  for argv, message in rows:
    assert main(["export"] + argv) == 2, argv
    assert message in _one_error(capsys), argv
  assert not new.exists()
  assert sorted(p.name for p in out.rglob("*")) == before
  other = tmp_path / "other"
  other.mkdir()
  (other / "notes.txt").write_text("mine")
  assert main(["export", "--checkpoint", str(src), "--out", str(other), "--overwrite"]) == 2
  assert "not written by rome_flax" in _one_error(capsys)
  assert (other / "notes.txt").read_text() == "mine"


def test_a_token_task_serves_tokee_and_sentee_bit_for_bit(tmp_path, capsys):
  """A token task's artefact: TOKEE (the window given at export) on its own slots and a sentence criterion
  (SENTEE) on the plain ones, admitted with the word mask, give the in-process engine's bits; an Engine over
  the artefact answers word lists as one over the export does."""
  from rome_flax.engine import artefact_runtime
  from rome_flax.engine import token_policy as tp
  from rome_flax.model.pretrained import load_tokenizer
  cfg = CLS.replace(head="token", num_labels=5)
  model = _model(cfg, seed=7)
  src, out = tmp_path / "token_export", tmp_path / "token_artefact"
  labels = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
  model.save_pretrained(src, ExportInfo(task="conll2003", label_names=labels, max_length=LENGTH))
  _tokenizer(src)
  bad = [(["--window", "4"], "odd"), (["--criteria", "tokee,bogus"], "bogus")]
  for argv, message in bad:
    assert main(["export", "--checkpoint", str(src), "--out", str(out)] + argv) == 2
    assert message in _one_error(capsys)
  assert not out.exists()
  assert main(["export", "--checkpoint", str(src), "--out", str(out), "--slots", str(SLOTS), "--batch", str(BATCH),
               "--criteria", "tokee,entropy", "--window", "3"]) == 0
  steps = artefact_runtime.load(out)
  assert (steps.is_token_task, steps.window, steps.criteria) == (True, 3, ("tokee", "entropy"))
  assert {"init", "init_tokee", "evict", "evict_tokee", "admit_tokee_b4_s16", "run_tokee_v16"} <= set(steps._exported)
  assert artefact.default_criteria(cfg) == ("tokee", "entropy", "maxprob")   # what an export without --criteria takes
  artefact.check_criteria(cfg, artefact.default_criteria(cfg))

  x = _inputs(cfg, np.random.default_rng(2))
  lengths_B = x["mask"].sum(1)
  words = ((np.arange(LENGTH)[None] >= 1) & (np.arange(LENGTH)[None] < lengths_B[:, None] - 1)).astype(np.int32)
  prepared, L = ee.prepare_params(model.params), cfg.num_layers
  sizes, lengths = serving.default_sizes(BATCH), engine.trim_lengths(LENGTH)
  tau = np.random.default_rng(3).uniform(0.05, 0.6, (6, cfg.num_exits)).astype(np.float32)
  for criterion, policy, tokee in (("tokee", tp.make_token_policy(1.0, 3, L), True),
                                   ("entropy", ep.policy_for(cfg, "entropy", 1.0), False)):
    # four rows: one admission at the (4, 24) bucket in both (the runtime admits `batch` rows at a time)
    state = steps.admit(steps.init(tokee), np.arange(4), *(v[:4] for v in (x["ids"], x["mask"], x["types"],
                                                                           x["priority"], tau, words)))
    with pytest.raises(artefact_runtime.ArtefactError, match="init"):   # the other criterion's slots
      steps.run(state, "entropy" if tokee else "tokee")
    got = steps.run(state, criterion)
    want = engine.admit(prepared, cfg, engine.init(cfg, SLOTS, LENGTH, tokee), np.arange(4, dtype=np.int32),
                        *(v[:4] for v in (x["ids"], x["mask"], x["types"], x["priority"], tau, words)))
    want = engine.run(prepared, cfg, policy, want, BATCH, lengths=lengths, sizes=sizes, pick="oldest")
    want = artefact.state_dict(want)
    assert set(got) == set(want) and ("tokee_word_exit_NxW" in got) == tokee
    for k, v in want.items():
      assert np.asarray(got[k]).tobytes() == np.asarray(v).tobytes(), (criterion, k)
    running, exits, _ = steps.read(got)
    assert not running.any() and exits.shape == ((SLOTS, LENGTH) if tokee else (SLOTS,))
    if tokee:   # words of one sentence leave at different layers
      assert any(len(set(exits[i, :lengths_B[i] - 2].tolist())) > 1 for i in range(4))

  # TOKEE's slots evicted and run under a view: short rows (7 and 3 pieces) at the 16 bucket, slot 0 evicted
  r = [1, 3]
  state = steps.admit(steps.init(True), [0, 1], *(v[r] for v in (x["ids"], x["mask"], x["types"], x["priority"],
                                                                 tau, words)))
  state = steps.run(steps.evict(state, np.arange(SLOTS) == 0), "tokee", longest=7, busy=1)
  running, exits, _ = steps.read(state)
  assert not running.any() and (exits[0] == -1).all() and (exits[1, :1] >= 0).all()
  assert {"admit_tokee_b4_s16", "evict_tokee", "run_tokee_v16"} <= set(steps._jitted)

  sentences = [["the", "movie", "was", "good"], ["not", "bad"], ["the", "the", "good", "movie", "was", "not", "bad"]]
  answers = []
  for engine_steps in (steps, serving.LocalSteps(model, slots=SLOTS, batch=BATCH, max_length=LENGTH, window=3)):
    server = serving.Engine(policy="tokee:0.3", steps=engine_steps, tokenizer=load_tokenizer(out), label_names=labels)
    try:
      answers.append([(p.tags, p.exit_layers) for p in server.submit(tokens=sentences).result(timeout=120)])
    finally:
      server.close()
  assert answers[0] == answers[1] and [len(tags) for tags, _ in answers[0]] == [4, 2, 7]

  # the artefact alone (`python -I`, rome_flax unimportable): the runtime splits words into pieces as rome_flax
  # does (a word of two pieces, a word of none read as [UNK]) and answers as the Engine did
  from rome_flax.kinds import data
  sentences[0][1], sentences[2][3] = "movie!!", "\x00"
  want = data.encode_token_split(load_tokenizer(out), sentences, None, LENGTH)
  tau_L = tp.make_token_policy(0.3, 3, L).threshold_L
  server = serving.Engine(policy="tokee:0.3", steps=steps, tokenizer=load_tokenizer(out), label_names=labels)
  try:
    engine_answers = [[p.tags, p.exit_layers] for p in server.submit(tokens=sentences).result(timeout=120)]
  finally:
    server.close()
  proc = subprocess.run([sys.executable, "-I", "-c", TOKEN_SCRIPT, str(out),
                         json.dumps({"sentences": sentences, "tau": np.asarray(tau_L).tolist()})],
                        cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]
  alone = json.loads(proc.stdout.strip().splitlines()[-1])
  ids, types, words = alone["encoded"]
  assert ids == [r.tolist() for r in want.input_ids] and types == [r.tolist() for r in want.token_type_ids]
  assert [np.flatnonzero(w).tolist() for w in words] == [r.tolist() for r in want.word_starts]
  assert len(ids[0]) == 7 and ids[2][4] == WORDS.index("[UNK]")   # [CLS] the movie !! was good [SEP]
  assert alone["answers"] == engine_answers and not alone["running"]
  too_long, string, one_string = alone["refused"]
  assert f"most {LENGTH}" in too_long and "not strings" in string and "not strings" in one_string


def test_the_runtime_splits_words_as_rome_flax_does_with_a_bert_tokenizer(minilm_dir):
  """MiniLM's tokenizer (uncased WordPiece; transformers builds it from its config, the runtime reads
  tokenizer.json as written): the same pieces, token types and first pieces as `encode_token_split`, on
  accents, case, hyphens, digits, a control character, wide and CJK characters and an emoji."""
  from pathlib import Path
  from rome_flax.engine import artefact_runtime
  from rome_flax.kinds import data
  from rome_flax.model.pretrained import load_tokenizer
  steps = object.__new__(artefact_runtime.ArtefactSteps)   # only what tokenize_words reads: the tokenizer files
  steps.path, steps.seq, steps._tokenizer, steps._word_tokenizer = Path(minilm_dir), 64, None, None
  sentences = [["EU", "rejects", "German", "call", "to", "boycott", "British", "lamb", "."],
               ["BRUSSELS", "1996-08-22"], ["Café", "Zürich", "naïve", "\x00", "co-operate", "U.S.", "don't"],
               ["Germany", "'s", "representative", "to", "the", "European", "Union", "'s", "veterinary"],
               ["ＡＢＣ", "日本語", "😀", "\u200b", "x"]]
  want = data.encode_token_split(load_tokenizer(minilm_dir), sentences, None, 64)
  ids, types, words = steps.tokenize_words(sentences)
  assert ids == [r.tolist() for r in want.input_ids] and types == [r.tolist() for r in want.token_type_ids]
  assert [np.flatnonzero(w).tolist() for w in words] == [r.tolist() for r in want.word_starts]
  assert ids[2][4] == 100   # "\x00": no piece, read as [UNK]


def test_the_runtime_reads_the_unknown_token_as_transformers_does(tmp_path):
  """A word of no piece is read as the unknown token the tokenizer's config names (transformers' `unk_token`),
  else the vocabulary model's: the rule `kinds.data.encode_token_split` follows."""
  from rome_flax.engine import artefact_runtime
  assert artefact_runtime._configured_unk(tmp_path) is None
  (tmp_path / "special_tokens_map.json").write_text(json.dumps({"unk_token": {"content": "<unk>", "lstrip": False}}))
  assert artefact_runtime._configured_unk(tmp_path) == "<unk>"
  (tmp_path / "tokenizer_config.json").write_text(json.dumps({"unk_token": "[UNK]"}))
  assert artefact_runtime._configured_unk(tmp_path) == "[UNK]"
  (tmp_path / "tokenizer_config.json").write_text("{not json")
  assert artefact_runtime._configured_unk(tmp_path) == "<unk>"


def test_export_options_that_need_a_token_task(runs, tmp_path, capsys):
  _, src, _ = runs[2]["cls"]
  for argv, message in ((["--criteria", "tokee"], "token tasks"), (["--window", "3"], "--window")):
    assert main(["export", "--checkpoint", str(src), "--out", str(tmp_path / "out")] + argv) == 2
    assert message in _one_error(capsys)
  assert not (tmp_path / "out").exists()


def test_overwrite_replaces_an_artefact(runs, tmp_path, capsys):
  """An artefact (with the __pycache__ its runtime left) is replaced whole; nothing else is."""
  import shutil
  _, src, out = runs[2]["reg"]
  copy = tmp_path / "artefact"
  shutil.copytree(out, copy)
  assert (copy / "__pycache__").is_dir()
  argv = ["export", "--checkpoint", str(src), "--out", str(copy), "--slots", "4", "--batch", "2", "--max_length", "16"]
  assert main(argv) == 2 and "--overwrite" in _one_error(capsys)
  assert main(argv + ["--overwrite"]) == 0
  manifest = json.loads((copy / "manifest.json").read_text())
  assert (manifest["slots"], manifest["batch"], manifest["sizes"], manifest["lengths"]) == (4, 2, [1, 2], [16])
  assert not (copy / "__pycache__").exists()


def test_a_run_with_few_busy_slots_takes_the_small_tier_bit_for_bit(runs, tmp_path):
  """Exported with sizes 1,2,4: a run with at most 2 busy slots gathers 2 rows (`serving.run_tiers`), as the
  in-process engine's small tier does, and gives the same bits; more busy slots or none said: the full tier.
  The serving engine hands the artefact's run the busy count (its signature takes it)."""
  from rome_flax.engine import artefact_runtime
  model, src, _ = runs[2]["cls"]
  out = tmp_path / "tiered"
  assert main(["export", "--checkpoint", str(src), "--out", str(out), "--slots", str(SLOTS), "--batch", str(BATCH),
               "--sizes", "1,2", "--criteria", "entropy"]) == 0
  steps = artefact_runtime.load(out)
  tiers = serving.run_tiers((1, 2, 4), BATCH)
  assert steps.tiers == tiers == ((2, (1, 2)), (4, (2, 4)))
  assert json.loads((out / "manifest.json").read_text())["tiers"] == [[2, [1, 2]], [4, [2, 4]]]
  assert [steps.tier(b)[0] for b in (None, 1, 2, 3, 8)] == [4, 2, 2, 4, 4]
  assert {"run_entropy_r2", "run_entropy_v16_r2", "run_entropy", "run_entropy_v16"} <= set(steps._exported)

  cfg = model.config
  x = _inputs(cfg, np.random.default_rng(1))
  prepared = ee.prepare_params(model.params)
  policy = ep.make_policy("entropy", 1.0, cfg.num_exits, num_labels=cfg.num_labels)
  lengths = engine.trim_lengths(LENGTH)
  th, r = x["threshold_entropy"], np.array([1, 3])
  for busy, (rows, cuts) in ((2, tiers[0]), (None, tiers[1])):
    state = steps.admit(steps.init(), r, x["ids"][r], x["mask"][r], x["types"][r], x["priority"][r], th[r])
    got = steps.run(state, "entropy", busy=busy)
    short = lambda a: a[r, :16]   # lengths 7 and 3: admitted at the (2 rows, 16 pieces) bucket
    want = engine.admit(prepared, cfg, engine.init(cfg, SLOTS, LENGTH), r.astype(np.int32), short(x["ids"]),
                        short(x["mask"]), short(x["types"]), x["priority"][r], th[r])
    want = engine.run(prepared, cfg, policy, want, rows, lengths=lengths, sizes=cuts, pick="oldest")
    for k, v in artefact.state_dict(want).items():
      assert np.asarray(got[k]).tobytes() == np.asarray(v).tobytes(), (busy, k)
    assert ("run_entropy_r2" if busy else "run_entropy") in steps._jitted   # each tier's own function ran
    assert ("run_entropy" in steps._jitted) == (busy is None)

  import functools
  from rome_flax.model.pretrained import load_tokenizer
  calls, real_run = [], steps.run

  @functools.wraps(real_run)   # the engine reads the signature: it takes `busy`
  def spy(*args, **kwargs):
    calls.append(kwargs.get("busy"))
    return real_run(*args, **kwargs)

  steps.run = spy
  server = serving.Engine(policy="entropy:0.5", steps=steps, tokenizer=load_tokenizer(out),
                          label_names=("neg", "mid", "pos"), warm_up=False)   # (warm-up runs every tier)
  try:
    calls.clear()
    assert len(server.submit(["the movie was good"]).result(timeout=60)) == 1
    assert calls and set(calls) == {1}   # one busy slot: the small tier, under the view of its length
    assert "run_entropy_v16_r2" in steps._jitted and "run_entropy_v16" not in steps._jitted
  finally:
    server.close()
