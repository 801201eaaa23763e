"""A Hugging Face BertForTokenClassification checkpoint loads with head='token': its classifier is the
final exit, its columns matched to the task's tag names through the checkpoint's id2label."""

from __future__ import annotations

import numpy as np
import pytest

from rome_flax.errors import RomeFlaxError
from rome_flax.model.pretrained import MultiExitBert

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

ID2LABEL = {0: "O", 1: "B-PER", 2: "I-PER", 3: "B-LOC", 4: "I-LOC"}
LABEL2ID = {name: i for i, name in ID2LABEL.items()}
VOCAB = 40
TOL = 1e-5


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  """A tiny token classifier, saved as safetensors; its classifier scaled up (and biased) so that
  a wrong column order or a random final head could not pass for the right one."""
  torch.manual_seed(0)
  cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                intermediate_size=64, max_position_embeddings=64, num_labels=5,
                                id2label=dict(ID2LABEL), label2id=dict(LABEL2ID))
  model = transformers.BertForTokenClassification(cfg).eval()
  with torch.no_grad():
    model.classifier.weight.normal_(0.0, 1.0)
    model.classifier.bias.normal_(0.0, 1.0)
  path = tmp_path_factory.mktemp("hf_token")
  model.save_pretrained(str(path))
  assert (path / "model.safetensors").is_file()
  rng = np.random.default_rng(0)
  ids = rng.integers(5, VOCAB, (3, 11)).astype(np.int64)
  mask = np.ones_like(ids)
  mask[1, 7:] = 0
  mask[2, 4:] = 0
  ids[mask == 0] = 0
  with torch.no_grad():
    ref = model(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).logits.numpy()
  return path, ids, mask, ref


def load(path, names, num_labels=5) -> MultiExitBert:
  model = MultiExitBert.from_pretrained(str(path), num_labels=num_labels, head="token", label_names=list(names),
                                        load_tokenizer_files=False)
  assert model.config.head == "token" and model.config.num_exits == 2
  return model


def exit_logits(model, ids, mask) -> np.ndarray:
  """[E, B, S, C]: every exit's logits on every piece."""
  return np.asarray(model(ids, attention_mask=mask).exit_logits)


def test_final_exit_is_the_token_classifier(checkpoint):
  path, ids, mask, ref = checkpoint
  logits = exit_logits(load(path, [ID2LABEL[i] for i in range(5)]), ids, mask)[-1]
  assert logits.shape == ref.shape == (3, 11, 5)
  np.testing.assert_allclose(logits[mask == 1], ref[mask == 1], atol=TOL, rtol=0)
  np.testing.assert_allclose(logits, ref, atol=TOL, rtol=0)   # padding positions too


def test_columns_follow_the_task_tag_order(checkpoint):
  path, ids, mask, ref = checkpoint
  names = ("O", "B-LOC", "B-PER", "I-LOC", "I-PER")   # token_data.tag_set's order, not the checkpoint's
  every = exit_logits(load(path, names), ids, mask)
  logits = every[-1]
  for j, name in enumerate(names):
    np.testing.assert_allclose(logits[..., j], ref[..., LABEL2ID[name]], atol=TOL, rtol=0, err_msg=name)
  assert not np.allclose(logits, ref, atol=1e-2)   # the permutation is not the identity
  # the highway exit is a fresh head, not a copy of the final one
  assert not np.allclose(every[0], logits, atol=1e-2)


def test_generic_names_keep_the_checkpoint_order(checkpoint):
  """Names id2label does not list (LABEL_k, another tag scheme): the rows are taken as they are."""
  path, ids, mask, ref = checkpoint
  logits = exit_logits(load(path, ["A", "B", "C", "D", "E"]), ids, mask)[-1]
  np.testing.assert_allclose(logits, ref, atol=TOL, rtol=0)


def test_label_count_mismatch_is_refused(checkpoint):
  path = checkpoint[0]
  with pytest.raises(RomeFlaxError, match="the checkpoint's token classifier has 5 labels, the task has 4"):
    MultiExitBert.from_pretrained(str(path), num_labels=4, head="token", label_names=["O", "B-PER", "I-PER", "B-LOC"],
                                  load_tokenizer_files=False)
