"""bench/train_step.py's PyTorch RomeBERT GR step (the published algorithm: two backward passes, the projection
over flattened gradients) computes the gradients rome_flax's one-forward GR step computes: the like-for-like
contender of the benchmark is the same method, and the two implementations check each other."""

import jax
import numpy as np
import pytest

from bench.train_step import projected_parameter, torch_gr_grads, torch_multi_exit
from rome_flax.model.config import ModelConfig
from rome_flax.model.convert import hf_state_dict
from rome_flax.model.pretrained import MultiExitBert
from rome_flax.train import train_step as ts
from rome_flax.train.methods import LossConfig

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

L = 3


@pytest.fixture(scope="module")
def twins(tmp_path_factory):
  """A tiny random BERT (dropout off) with distinct exits, and its PyTorch twin through export-hf."""
  cfg = ModelConfig(vocab_size=50, hidden_size=16, num_hidden_layers=L, num_attention_heads=2, intermediate_size=24,
                    max_position_embeddings=16, num_labels=3, hidden_dropout_prob=0.0,
                    attention_probs_dropout_prob=0.0)
  model = MultiExitBert.from_config(cfg, seed=0)
  # Distinct exits; this key makes the two groups' gradients conflict (cos -0.32), so the projection acts.
  model.params["exits"] = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(7), x.shape),
                                       model.params["exits"])
  twin = torch_multi_exit(model, tmp_path_factory.mktemp("torch_gr")).train()   # train(): dropout is 0 anyway
  rng = np.random.default_rng(0)
  batch = {"input_ids": rng.integers(3, 50, (4, 8)).astype(np.int32),
           "attention_mask": np.array([[1] * 8, [1] * 6 + [0] * 2, [1] * 8, [1] * 5 + [0] * 3], np.int32),
           "token_type_ids": np.zeros((4, 8), np.int32), "labels": np.array([0, 2, 1, 0], np.int32),
           "example_ids": np.arange(4, dtype=np.int32)}
  return model, twin, batch


@pytest.mark.parametrize("protect_final", [False, True])
def test_torch_reference_gr_equals_rome_flax_gr(twins, protect_final):
  model, twin, batch = twins
  twin.zero_grad(set_to_none=True)
  inputs = {k: torch.as_tensor(batch[k]).long() for k in ("input_ids", "attention_mask", "token_type_ids")}
  torch_stats = torch_gr_grads(twin, inputs, torch.as_tensor(batch["labels"]).long(), protect_final=protect_final)
  grads_fn = ts.make_grads_fn(model.config, LossConfig(method="romebert", gr="projection"), protect_final=protect_final)
  grads, (_, stats) = jax.jit(grads_fn)(model.params, batch, jax.random.PRNGKey(0))
  assert torch_stats["gr_cos"] < -0.1, "the fixture should make the groups conflict"
  np.testing.assert_allclose(torch_stats["gr_cos"], float(stats["gr_cos"]), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(torch_stats["gr_norm_a"], float(stats["gr_norm_a"]), rtol=1e-4)
  np.testing.assert_allclose(torch_stats["gr_norm_b"], float(stats["gr_norm_b"]), rtol=1e-4)

  want = hf_state_dict(grads, model.config)   # rome_flax's gradients under transformers' names
  named = dict(twin.named_parameters())
  assert set(want) == set(named)               # every parameter compared, the projected ones among them
  for name, g in want.items():
    got = named[name].grad
    got = np.zeros(named[name].shape, np.float32) if got is None else got.numpy()
    np.testing.assert_allclose(got, g, rtol=2e-4, atol=2e-6, err_msg=name)
  assert sum(projected_parameter(name, L) for name in named) == 6 * (L - 1)
  # The projection moved the compared gradients well beyond the tolerance (no unprojected port passes).
  plain, _ = jax.jit(ts.make_grads_fn(model.config, LossConfig(method="romebert", gr="none")))(
      model.params, batch, jax.random.PRNGKey(0))
  plain = hf_state_dict(plain, model.config)
  moved = [name for name in named if projected_parameter(name, L)
           and not np.allclose(want[name], plain[name], rtol=2e-3, atol=2e-5)]
  assert len(moved) >= 3 * (L - 1), moved
