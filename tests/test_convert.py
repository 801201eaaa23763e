"""Hugging Face checkpoints -> rome_flax: numerical parity with transformers' PyTorch models, bad input."""

import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from rome_flax.errors import RomeFlaxError
from rome_flax.model.pretrained import MultiExitBert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SENTENCES = [
    "The movie was a charming and often affecting journey.",
    "Unflinchingly bleak and desperate.",
    "A masterpiece four years in the making, with a cast that never once hits a false note and a score that lingers.",
    "ok",
]
TOL = 1e-4


def _torch_inputs(enc):
  return {k: torch.from_numpy(np.asarray(v, np.int64)) for k, v in enc.items()}


def _assert_hidden_parity(flax_out, torch_out, mask, tol=TOL):
  """Every layer's hidden states on the real (non-padding) tokens."""
  m = np.asarray(mask, bool)
  assert len(torch_out.hidden_states) == flax_out.hidden_states.shape[0]
  for i, th in enumerate(torch_out.hidden_states):
    err = np.abs(np.asarray(flax_out.hidden_states[i]) - th.numpy())[m].max()
    assert err <= tol, f"layer {i}: max abs diff {err}"


def _pooled(model, i, h_BxSxD):
  """Exit i's pooler output (tanh of its Linear on token 0), what transformers calls pooler_output."""
  pooler = jax.tree.map(lambda x: np.asarray(x)[i], model.params["exits"]["pooler"])
  return np.tanh(np.asarray(h_BxSxD)[:, 0] @ pooler["kernel"].T + pooler["bias"])


def test_minilm_parity_all_layers_and_pooler(minilm_dir):
  model = MultiExitBert.from_pretrained(minilm_dir, num_labels=2)
  assert model.config.num_layers == 6 and model.config.hidden_size == 384
  assert model.load_report.missing == [] and model.load_report.unexpected == []
  enc = model.encode(SENTENCES, max_length=64)
  assert (enc["attention_mask"] == 0).any(), "the batch must contain padding"
  out = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], output_hidden_states=True)
  ref = transformers.BertModel.from_pretrained(str(minilm_dir)).eval()
  with torch.no_grad():
    tout = ref(**_torch_inputs(enc), output_hidden_states=True)
  _assert_hidden_parity(out, tout, enc["attention_mask"])
  pooled = _pooled(model, 5, out.hidden_states[-1])
  assert np.abs(np.asarray(pooled) - tout.pooler_output.numpy()).max() <= TOL
  # Every exit pooler starts as a copy of the pretrained pooler.
  pk = np.asarray(model.params["exits"]["pooler"]["kernel"])
  np.testing.assert_array_equal(pk[0], ref.pooler.dense.weight.detach().numpy())
  np.testing.assert_array_equal(pk[0], pk[-1])


def _tiny_hf(kind, num_labels=3, seed=0):
  torch.manual_seed(seed)
  common = dict(vocab_size=120, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48,
                max_position_embeddings=80, num_labels=num_labels, hidden_dropout_prob=0.1,
                attention_probs_dropout_prob=0.1)
  if kind.startswith("bert"):
    cfg = transformers.BertConfig(**common, type_vocab_size=2)
    cls = transformers.BertModel if kind == "bert" else transformers.BertForSequenceClassification
  else:
    cfg = transformers.RobertaConfig(**common, type_vocab_size=1, pad_token_id=1, bos_token_id=0, eos_token_id=2)
    cls = transformers.RobertaModel if kind == "roberta" else transformers.RobertaForSequenceClassification
  model = cls(cfg).eval()
  with torch.no_grad():  # non-trivial LayerNorm and biases so a mix-up shows
    for name, p in model.named_parameters():
      if "LayerNorm" in name or name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  return model


def _ids(kind, B=3, S=12, seed=0):
  rng = np.random.default_rng(seed)
  pad = 1 if kind.startswith("roberta") else 0
  ids = rng.integers(3, 120, size=(B, S))
  mask = np.ones((B, S), np.int64)
  mask[1, 8:] = 0
  mask[2, 4:] = 0
  ids[mask == 0] = pad
  types = np.zeros_like(ids)
  if kind.startswith("bert"):
    types[:, 6:] = 1
    types *= mask
  return {"input_ids": ids, "attention_mask": mask, "token_type_ids": types}


@pytest.mark.parametrize("kind", ["bert", "roberta"])
@pytest.mark.parametrize("fmt", ["safetensors", "bin"])
def test_random_model_parity(tmp_path, kind, fmt):
  ref = _tiny_hf(kind)
  if fmt == "safetensors":
    ref.save_pretrained(tmp_path)
  else:  # transformers 5 writes safetensors only; an older-style .bin is torch.save of the state dict
    ref.config.save_pretrained(tmp_path)
    torch.save(ref.state_dict(), tmp_path / "pytorch_model.bin")
  assert (tmp_path / ("model.safetensors" if fmt == "safetensors" else "pytorch_model.bin")).is_file()
  model = MultiExitBert.from_pretrained(tmp_path, num_labels=3, load_tokenizer_files=False)
  assert model.config.model_type == kind
  enc = _ids(kind)
  out = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], output_hidden_states=True)
  with torch.no_grad():
    tout = ref(**_torch_inputs(enc), output_hidden_states=True)
  _assert_hidden_parity(out, tout, enc["attention_mask"], tol=1e-5)
  if kind == "bert":
    pooled = _pooled(model, 1, out.hidden_states[-1])
    np.testing.assert_allclose(pooled, tout.pooler_output.numpy(), atol=1e-5)


@pytest.mark.parametrize("kind", ["bert-cls", "roberta-cls"])
def test_sequence_classifier_keeps_head_and_matches_logits(tmp_path, kind):
  ref = _tiny_hf(kind, num_labels=3)
  ref.save_pretrained(tmp_path)
  model = MultiExitBert.from_pretrained(tmp_path, num_labels=3, load_tokenizer_files=False)
  assert model.load_report.classifier_from_checkpoint
  enc = _ids(kind)
  with torch.no_grad():
    want = ref(**_torch_inputs(enc)).logits.numpy()
  got = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"]).exit_logits[-1]
  np.testing.assert_allclose(got, want, atol=1e-5)
  # With another label count the head is new, and the summary says so.
  other = MultiExitBert.from_pretrained(tmp_path, num_labels=5, load_tokenizer_files=False)
  assert not other.load_report.classifier_from_checkpoint
  assert "classifier.weight" in other.load_report.summary() or "out_proj" in other.load_report.summary()


def test_sharded_safetensors_and_prefixless(tmp_path):
  ref = _tiny_hf("bert")
  ref.save_pretrained(tmp_path, max_shard_size="20KB")
  assert (tmp_path / "model.safetensors.index.json").is_file()
  model = MultiExitBert.from_pretrained(tmp_path, num_labels=2, load_tokenizer_files=False)
  enc = _ids("bert")
  with torch.no_grad():
    tout = ref(**_torch_inputs(enc), output_hidden_states=True)
  out = model(enc["input_ids"], enc["attention_mask"], enc["token_type_ids"], output_hidden_states=True)
  _assert_hidden_parity(out, tout, enc["attention_mask"], tol=1e-5)


def test_missing_weights_are_reported(tmp_path):
  from safetensors.numpy import save_file
  ref = _tiny_hf("bert")
  ref.save_pretrained(tmp_path)
  sd = {k: v.numpy() for k, v in ref.state_dict().items() if not k.startswith("pooler")}
  sd["cls.predictions.bias"] = np.zeros(120, np.float32)
  save_file(sd, str(tmp_path / "model.safetensors"))
  model = MultiExitBert.from_pretrained(tmp_path, num_labels=2, load_tokenizer_files=False)
  assert "pooler.dense.weight" in model.load_report.missing
  assert model.load_report.unexpected == ["cls.predictions.bias"]
  assert "missing (random init): pooler.dense.weight" in model.load_report.summary()


def test_bad_input(tmp_path, monkeypatch):
  with pytest.raises(RomeFlaxError, match="does not exist"):
    MultiExitBert.from_pretrained(tmp_path / "nope")
  (tmp_path / "empty").mkdir()
  with pytest.raises(RomeFlaxError, match="no config.json"):
    MultiExitBert.from_pretrained(tmp_path / "empty")
  gpt = tmp_path / "gpt"
  gpt.mkdir()
  (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
  with pytest.raises(RomeFlaxError, match="model_type 'gpt2'"):
    MultiExitBert.from_pretrained(gpt)
  # Weights whose shapes do not match the config.
  ref = _tiny_hf("bert")
  bad = tmp_path / "bad"
  ref.save_pretrained(bad)
  cfg = json.loads((bad / "config.json").read_text())
  cfg["intermediate_size"] = 64
  (bad / "config.json").write_text(json.dumps(cfg))
  with pytest.raises(RomeFlaxError, match="do not match"):
    MultiExitBert.from_pretrained(bad, load_tokenizer_files=False)
  # No weights at all.
  (tmp_path / "noweights").mkdir()
  (tmp_path / "noweights" / "config.json").write_text((bad / "config.json").read_text())
  with pytest.raises(RomeFlaxError, match="holds no weights"):
    MultiExitBert.from_pretrained(tmp_path / "noweights")
  # A hub id while offline.
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  with pytest.raises(RomeFlaxError, match="could not be downloaded"):
    MultiExitBert.from_pretrained("some-user/some-model-that-is-not-cached")


def test_convert_cli(tmp_path):
  ref = _tiny_hf("bert")
  ref.save_pretrained(tmp_path / "hf")
  cmd = [sys.executable, "-m", "rome_flax", "convert", str(tmp_path / "hf"), str(tmp_path / "out"), "--num_labels", "3"]
  done = subprocess.run(cmd, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
  assert "converted" in done.stdout and (tmp_path / "out" / "rome_flax_config.json").is_file()
  again = subprocess.run(cmd, capture_output=True, text=True)  # refuses to replace earlier output
  assert again.returncode == 2 and again.stderr.startswith("error: ") and "--overwrite" in again.stderr
  assert (tmp_path / "out" / "rome_flax_config.json").is_file()
  missing = subprocess.run([sys.executable, "-m", "rome_flax", "convert", str(tmp_path / "nope"), str(tmp_path / "o2")],
                           capture_output=True, text=True)
  assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
  assert not (tmp_path / "o2").exists()
