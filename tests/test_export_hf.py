"""`python -m rome_flax export-hf`: a rome_flax export -> a Hugging Face directory that PyTorch transformers loads.

Exports built from the real MiniLM (a sentence classifier, a token labeller, a regression head with mean pooling),
every exit made distinct (its own pooler, a sharp classifier) so that a mix-up of exits, rows or poolers shows.
One subprocess that imports torch and transformers only (checked) loads each directory through
AutoModelFor{Sequence,Token}Classification (trust_remote_code) and AutoModel: every exit's logits against
rome_flax's, early-exit decisions against rome_flax's entropy policy; the directory loads back bit for bit.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rome_flax.__main__ import main
from rome_flax.engine import exit_policy
from rome_flax.io import files
from rome_flax.kinds.kind import TOKEN
from rome_flax.model.config import ModelConfig
from rome_flax.model.export_hf import ENTRIES, KIND, export_hf
from rome_flax.model.pretrained import EXPORT_CONFIG, ExportInfo, MultiExitBert

pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

SENTENCES = [
    "The movie was a charming and often affecting journey.",
    "Unflinchingly bleak and desperate.",
    "A masterpiece four years in the making, with a cast that never once hits a false note.",
    "ok",
    "John Smith flew from Paris to New York on Monday.",
    "The results were neither good nor bad, just there.",
]
TAGS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
TOL = 1e-4

# Run with torch and transformers only: loads each directory, writes every exit's logits and the early exits.
SCRIPT = textwrap.dedent("""
    import json, sys
    import numpy as np, torch, transformers
    job = json.load(open(sys.argv[1]))
    out, info = {}, {}
    for name, spec in job["models"].items():
        model = getattr(transformers, spec["auto"]).from_pretrained(spec["dir"], trust_remote_code=True).eval()
        x = np.load(spec["inputs"])
        ids, mask, tt = (torch.from_numpy(x[k]) for k in ("input_ids", "attention_mask", "token_type_ids"))
        with torch.no_grad():
            res = model(input_ids=ids, attention_mask=mask, token_type_ids=tt, output_hidden_states=True)
        out[name + "/exit_logits"], out[name + "/logits"] = res.exit_logits.numpy(), res.logits.numpy()
        info[name] = type(model).__name__
        for k, tau in enumerate(spec["thresholds"]):
            d = model.early_exit(ids, mask, threshold=tau, token_type_ids=tt,
                                 word_mask=torch.from_numpy(x["word_mask"]))
            out[f"{name}/exit_layer/{k}"], out[f"{name}/ee_logits/{k}"] = d.exit_layer.numpy(), d.logits.numpy()
        if spec.get("backbone"):   # plain transformers, no remote code: the encoder alone
            bb = transformers.AutoModel.from_pretrained(spec["dir"]).eval()
            with torch.no_grad():
                last = bb(input_ids=ids, attention_mask=mask, token_type_ids=tt).last_hidden_state
            m = mask.bool()
            out[name + "/backbone_diff"] = (last - res.hidden_states[-1]).abs()[m].max().numpy()
            info[name + "/backbone"] = type(bb).__name__
    info["forbidden_modules"] = sorted(
        m for m in sys.modules if m.split(".")[0] in ("jax", "jaxlib", "flax", "rome_flax"))
    np.savez(job["out"], **out)
    json.dump(info, open(job["info"], "w"))
""")


def _distinct_exits(model: MultiExitBert, seed: int, scale: float) -> MultiExitBert:
  """Every exit its own pooler and a sharp random classifier (entropies spread over the range)."""
  rng = np.random.default_rng(seed)
  params = jax.tree.map(np.array, jax.device_get(model.params))
  ex = params["exits"]
  if "pooler" in ex:
    for k in ("kernel", "bias"):
      ex["pooler"][k] = ex["pooler"][k] + rng.normal(0, 0.05, ex["pooler"][k].shape).astype(np.float32)
  ex["classifier"]["kernel"] = rng.normal(0, scale, ex["classifier"]["kernel"].shape).astype(np.float32)
  ex["classifier"]["bias"] = rng.normal(0, 0.5, ex["classifier"]["bias"].shape).astype(np.float32)
  model.params = jax.tree.map(jnp.asarray, params)
  return model


def _random_batch(cfg, batch=5, seq=12):
  """RoBERTa-style ids: <s> ... </s>, then padding (pad_token_id) of varied lengths."""
  rng = np.random.default_rng(0)
  ids = rng.integers(3, cfg.vocab_size, (batch, seq))
  mask = (np.arange(seq)[None] < np.array([12, 9, 5, 12, 3])[:, None]).astype(np.int64)
  ids[:, 0] = 0
  ids[np.arange(batch), mask.sum(1) - 1] = 2
  ids[mask == 0] = cfg.pad_token_id
  return {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}


def _uncertainty(logits, word_mask, token: bool) -> np.ndarray:
  """What the entropy policy compares with tau: H per example, or a sentence's max normalised H over its words."""
  h = np.asarray(exit_policy.entropy(jnp.asarray(logits)))
  if not token:
    return h
  u = h / np.log(logits.shape[-1])
  return np.where(word_mask[None] > 0, u, -np.inf).max(-1)


def _thresholds(u_ExN) -> list[float]:
  """Two thresholds between the non-final exits' uncertainties, far (> 1e-3) from every one of them."""
  v = np.unique(u_ExN[:-1].ravel())
  gaps = [(v[k] + v[k + 1]) / 2 for k in range(len(v) - 1) if v[k + 1] - v[k] > 2e-3]
  assert len(gaps) >= 2, v
  return [float(gaps[len(gaps) // 3]), float(gaps[(2 * len(gaps)) // 3])]


@pytest.fixture(scope="module")
def exported(minilm_dir, tmp_path_factory):
  """Three exports and their export-hf directories, with rome_flax's logits and the subprocess's results."""
  root = tmp_path_factory.mktemp("export_hf")
  cases = {}
  builds = {
      "sentence": dict(kw=dict(num_labels=3), info=ExportInfo(task="sst3", label_names=("neg", "neu", "pos")),
                       scale=0.5, auto="AutoModelForSequenceClassification"),
      "token": dict(kw=dict(num_labels=len(TAGS), head="token", label_names=list(TAGS)),
                    info=ExportInfo(task="ner", label_names=TAGS), scale=0.2, auto="AutoModelForTokenClassification"),
      "regression": dict(kw=dict(num_labels=1, exit_pooling="mean"), info=ExportInfo(task="stsb", is_regression=True),
                         scale=0.3, auto="AutoModelForSequenceClassification", stats=(2.5, 1.7)),
      # A tiny random RoBERTa (no tokenizer): the `roberta.` names, its position ids from the padding.
      "roberta": dict(config=ModelConfig(model_type="roberta", vocab_size=99, hidden_size=32, num_hidden_layers=3,
                                         num_attention_heads=4, intermediate_size=37, max_position_embeddings=64,
                                         type_vocab_size=1, pad_token_id=1, num_labels=3, exit_pooling="mean"),
                      info=ExportInfo(), scale=1.0, auto="AutoModelForSequenceClassification"),
  }
  job = {"models": {}, "out": str(root / "torch.npz"), "info": str(root / "torch.json")}
  for k, (name, b) in enumerate(builds.items()):
    model = (MultiExitBert.from_config(b["config"], seed=k) if "config" in b
             else MultiExitBert.from_pretrained(minilm_dir, **b["kw"]))
    if model.load_report is not None:   # the loader's name table, HF -> rome_flax: every MiniLM tensor used
      assert model.load_report.missing == []   # (a token head leaves the checkpoint's pooler unused)
      assert model.load_report.unexpected == ([] if b["kw"].get("head") != "token" else
                                              ["pooler.dense.bias", "pooler.dense.weight"])
    if "stats" in b:
      model.config = model.config.replace(regression_mean=b["stats"][0], regression_std=b["stats"][1])
    _distinct_exits(model, k, b["scale"])
    src = root / f"{name}_export"
    model.save_pretrained(src, b["info"])
    hf_dir = root / f"{name}_hf"
    if name == "sentence":   # through the command line
      assert main(["export-hf", "--checkpoint", str(src), "--out", str(hf_dir)]) == 0
    else:
      export_hf(src, hf_dir)
    enc = model.encode(SENTENCES, max_length=32) if model.tokenizer is not None else _random_batch(model.config)
    word_mask = enc["attention_mask"].copy()
    word_mask[:, 0] = 0                                       # [CLS]
    word_mask[np.arange(len(word_mask)), enc["attention_mask"].sum(1) - 1] = 0   # [SEP]
    logits = np.asarray(model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]).exit_logits)
    token = name == "token"
    taus = [] if name == "regression" else _thresholds(_uncertainty(logits, word_mask, token))
    np.savez(root / f"{name}_inputs.npz", word_mask=word_mask.astype(np.int64),
             **{k: np.asarray(v, np.int64) for k, v in enc.items()})
    job["models"][name] = dict(auto=b["auto"], dir=str(hf_dir), inputs=str(root / f"{name}_inputs.npz"),
                               thresholds=taus, backbone=name == "sentence")
    cases[name] = dict(model=model, info=b["info"], src=src, hf=hf_dir, logits=logits, word_mask=word_mask, taus=taus)
  (root / "job.json").write_text(json.dumps(job))
  (root / "check.py").write_text(SCRIPT)
  env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH",)}
  env.update(HF_MODULES_CACHE=str(root / "hf_modules"), HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")
  proc = subprocess.run([sys.executable, str(root / "check.py"), str(root / "job.json")], cwd=root, env=env,
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  torch_out = dict(np.load(job["out"]))
  info = json.loads((root / "torch.json").read_text())
  return cases, torch_out, info


def test_the_torch_process_imports_neither_jax_nor_rome_flax(exported):
  _, _, info = exported
  assert info["forbidden_modules"] == []
  assert info["sentence"] == "RomeFlaxBertForSequenceClassification"
  assert info["token"] == "RomeFlaxBertForTokenClassification"
  assert info["roberta"] == "RomeFlaxRobertaForSequenceClassification"


@pytest.mark.parametrize("name", ["sentence", "token", "regression", "roberta"])
def test_every_exit_matches_rome_flax(exported, name):
  cases, torch_out, _ = exported
  ours, theirs = cases[name]["logits"], torch_out[name + "/exit_logits"]
  assert theirs.shape == ours.shape   # [exits, batch, labels] ([exits, batch, seq, labels] for tokens)
  diffs = np.abs(theirs - ours).reshape(ours.shape[0], -1).max(1)
  print(f"{name}: max abs diff per exit {np.array2string(diffs, precision=2)}")
  assert diffs.max() <= TOL, diffs
  np.testing.assert_array_equal(torch_out[name + "/logits"], theirs[-1])   # plain logits: the final exit's
  if name == "regression":   # outputs in the labels' units: std * z + mean, around the mean
    assert abs(float(np.mean(ours)) - 2.5) < 2.0 and np.std(ours) > 0.1


@pytest.mark.parametrize("name", ["sentence", "token", "roberta"])
def test_early_exit_decides_as_rome_flax(exported, name):
  cases, torch_out, _ = exported
  case = cases[name]
  logits, E = case["logits"], case["logits"].shape[0]
  token = name == "token"
  early = 0
  for k, tau in enumerate(case["taus"]):
    policy = exit_policy.make_policy("entropy", tau, E, num_labels=logits.shape[-1],
                                         kind=TOKEN if token else None)
    decision = exit_policy.decide(policy, jnp.asarray(logits), jnp.asarray(case["word_mask"]) if token else None)
    layers = np.asarray(decision.exit_index_N) + 1
    np.testing.assert_array_equal(torch_out[f"{name}/exit_layer/{k}"], layers, err_msg=f"tau={tau}")
    np.testing.assert_allclose(torch_out[f"{name}/ee_logits/{k}"], np.asarray(decision.logits_NxC), atol=TOL, rtol=0)
    early += int((layers < E).sum())
  assert early > 0, "no example exited early: the thresholds test nothing"


@pytest.mark.parametrize("name", ["sentence", "token", "regression", "roberta"])
def test_round_trip_is_bit_equal(exported, name):
  case = exported[0][name]
  src, back = case["model"], MultiExitBert.from_pretrained(case["hf"], load_tokenizer_files=False)
  assert back.config == src.config   # head, pooling, labels, regression statistics
  assert back.load_report.missing == [] and back.load_report.unexpected == []
  flat_src = jax.tree_util.tree_flatten_with_path(jax.device_get(src.params))[0]
  flat_back = dict(jax.tree_util.tree_flatten_with_path(jax.device_get(back.params))[0])
  assert len(flat_src) == len(flat_back)
  for path, value in flat_src:
    np.testing.assert_array_equal(np.asarray(flat_back[path]), np.asarray(value), err_msg=str(path))
  assert back.export_info.replace(source=None) == case["info"]   # the export's metadata comes back too


def test_directory_contents_and_backbone(exported):
  cases, torch_out, info = exported
  hf = cases["sentence"]["hf"]
  config = json.loads((hf / "config.json").read_text())
  auto_map = config["auto_map"]
  assert auto_map["AutoModelForSequenceClassification"] == "modeling_rome_flax.RomeFlaxBertForSequenceClassification"
  assert config["id2label"] == {"0": "neg", "1": "neu", "2": "pos"} and config["exit_pooling"] == "cls"
  assert json.loads((cases["regression"]["hf"] / "config.json").read_text())["problem_type"] == "regression"
  assert (hf / "modeling_rome_flax.py").is_file()
  tokenizer_files = sorted(p.name for p in cases["sentence"]["src"].glob("tokenizer*"))
  assert "tokenizer.json" in tokenizer_files   # the export's tokenizer files, copied as they are
  assert all((hf / n).read_bytes() == (cases["sentence"]["src"] / n).read_bytes() for n in tokenizer_files)
  assert files.output_kind(hf) == KIND and not (hf / "rome_flax.lock").exists()
  assert info["sentence/backbone"] == "BertModel"
  assert float(torch_out["sentence/backbone_diff"]) <= 1e-6


def _one_error(capsys) -> str:
  err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
  assert len(err) == 1 and err[0].startswith("error:"), err
  return err[0]


def test_bad_input_is_one_error_line(exported, minilm_dir, tmp_path, capsys):
  src = exported[0]["sentence"]["src"]
  out = tmp_path / "out"
  assert main(["export-hf", "--checkpoint", str(minilm_dir), "--out", str(out)]) == 2
  assert "not a rome_flax export" in _one_error(capsys) and not out.exists()
  assert main(["export-hf", "--checkpoint", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
  assert "does not exist" in _one_error(capsys)
  with pytest.raises(SystemExit) as e:
    main(["export-hf", "--checkpoint", str(src)])
  assert e.value.code == 2 and "--out" in _one_error(capsys)
  out.mkdir()
  (out / "notes.txt").write_text("mine")
  assert main(["export-hf", "--checkpoint", str(src), "--out", str(out)]) == 2
  assert "--overwrite" in _one_error(capsys)
  assert main(["export-hf", "--checkpoint", str(src), "--out", str(out), "--overwrite"]) == 2
  assert "not written by rome_flax" in _one_error(capsys)
  assert (out / "notes.txt").read_text() == "mine" and sorted(p.name for p in out.iterdir()) == ["notes.txt"]


def test_overwrite_replaces_an_export_hf_directory_only(exported, tmp_path, capsys):
  cases = exported[0]
  src, other = cases["sentence"]["src"], cases["token"]["src"]
  hf = shutil.copytree(cases["token"]["hf"], tmp_path / "hf")
  assert main(["export-hf", "--checkpoint", str(src), "--out", str(hf)]) == 2
  assert "--overwrite" in _one_error(capsys)
  assert main(["export-hf", "--checkpoint", str(src), "--out", str(other), "--overwrite"]) == 2
  _one_error(capsys)
  assert (other / EXPORT_CONFIG).is_file()   # a rome_flax export is not an export-hf directory: left alone
  # The token directory replaced by the sentence model: the whole directory is the new one.
  assert main(["export-hf", "--checkpoint", str(src), "--out", str(hf), "--overwrite"]) == 0
  assert json.loads((hf / "config.json").read_text())["exit_head"] == "sequence"
  assert all(any(fnmatch.fnmatch(p.name, g) for g in ENTRIES + (files.OUTPUT_MARKER,)) for p in hf.iterdir())
