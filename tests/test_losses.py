"""Losses of every method against a direct NumPy computation (method.md)."""

import jax.numpy as jnp
import numpy as np
import pytest

from rome_flax.errors import RomeFlaxError
from rome_flax.train import losses, methods

E, B, C = 4, 5, 3


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_ce(z, y, w):
  nll = -np_log_softmax(z)[np.arange(len(y)), y]
  return (nll * w).sum() / w.sum()


def np_kl(teacher, student, w, T, reduction):
  logp, logq = np_log_softmax(teacher / T), np_log_softmax(student / T)
  kl = (np.exp(logp) * (logp - logq)).sum(-1)
  denom = w.sum() * (student.shape[-1] if reduction == "reference" else 1)
  return T * T * (kl * w).sum() / denom


@pytest.fixture
def batch():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(E, B, C)).astype(np.float32) * 2
  y = rng.integers(0, C, B)
  w = np.array([1, 1, 1, 1, 0], np.float32)   # the last row pads the batch
  return z, y, w


@pytest.mark.parametrize("reduction", ["reference", "batchmean"])
def test_romebert_matches_numpy(batch, reduction):
  z, y, w = batch
  g, T = 0.9, 3.0
  cfg = methods.LossConfig(gamma=g, temperature=T, kl_reduction=reduction)
  terms = methods.loss_terms(jnp.asarray(z), jnp.asarray(y), jnp.asarray(w), cfg)
  want_final = np_ce(z[-1], y, w)
  want_highway = sum((1 - g) * np_ce(z[i], y, w) + g * np_kl(z[-1], z[i], w, T, reduction) for i in range(E - 1))
  np.testing.assert_allclose(terms.final, want_final, rtol=1e-5)
  np.testing.assert_allclose(terms.highway, want_highway, rtol=1e-5)
  np.testing.assert_allclose(terms.total, want_final + want_highway, rtol=1e-5)


def test_reference_kl_is_batchmean_over_labels(batch):
  z, y, w = batch
  ref = losses.distillation_kl(z[-1], z[0], w, 3.0, "reference")
  bm = losses.distillation_kl(z[-1], z[0], w, 3.0, "batchmean")
  np.testing.assert_allclose(bm, C * ref, rtol=1e-6)


def test_padding_rows_do_not_count(batch):
  z, y, w = batch
  cfg = methods.LossConfig()
  full = methods.loss_terms(jnp.asarray(z), jnp.asarray(y), jnp.asarray(w), cfg).total
  cut = methods.loss_terms(jnp.asarray(z[:, :4]), jnp.asarray(y[:4]), jnp.ones(4), cfg).total
  np.testing.assert_allclose(full, cut, rtol=1e-6)


def test_baselines_match_numpy(batch):
  z, y, w = batch
  ce = [np_ce(z[i], y, w) for i in range(E)]
  run = lambda method, logits, stage=1: methods.loss_terms(jnp.asarray(logits), jnp.asarray(y), jnp.asarray(w),
                                                          methods.LossConfig(method=method), stage).total
  np.testing.assert_allclose(run("joint", z), sum(ce), rtol=1e-5)
  np.testing.assert_allclose(run("pabee", z), sum((i + 1) * ce[i] for i in range(E)) / (E * (E + 1) / 2), rtol=1e-5)
  np.testing.assert_allclose(run("final_only", z[-1:]), ce[-1], rtol=1e-5)
  np.testing.assert_allclose(run("deebert", z[-1:], 1), ce[-1], rtol=1e-5)
  np.testing.assert_allclose(run("deebert", z[:-1], 2), sum(ce[:-1]), rtol=1e-5)


def test_regression_distils_with_mse():
  rng = np.random.default_rng(1)
  z = rng.normal(size=(3, 4, 1)).astype(np.float32)
  y = rng.uniform(0, 5, 4).astype(np.float32)
  w = np.ones(4, np.float32)
  g = 0.9
  terms = methods.loss_terms(jnp.asarray(z), jnp.asarray(y), jnp.asarray(w), methods.LossConfig(gamma=g, regression=True))
  mse = lambda a, b: np.mean((a - b) ** 2)
  want = sum((1 - g) * mse(z[i, :, 0], y) + g * mse(z[i, :, 0], z[-1, :, 0]) for i in range(2))
  np.testing.assert_allclose(terms.final, mse(z[-1, :, 0], y), rtol=1e-5)
  np.testing.assert_allclose(terms.highway, want, rtol=1e-5)


def test_teacher_gets_no_distillation_gradient(batch):
  import jax
  z, y, w = batch
  cfg = methods.LossConfig(gamma=1.0)   # highway term = pure distillation
  grad = jax.grad(lambda zz: methods.loss_terms(zz, jnp.asarray(y), jnp.asarray(w), cfg).highway)(jnp.asarray(z))
  assert np.abs(grad[-1]).max() == 0.0
  assert np.abs(grad[0]).max() > 0.0


def test_bad_options_are_errors():
  with pytest.raises(RomeFlaxError, match="method"):
    methods.LossConfig(method="romebrt")
  with pytest.raises(RomeFlaxError, match="kl_reduction"):
    methods.LossConfig(kl_reduction="sum")
  with pytest.raises(RomeFlaxError, match="gamma"):
    methods.LossConfig(gamma=1.5)


def test_protect_rule():
  assert methods.protect_final(methods.LossConfig(), task_protects_final=True)
  assert not methods.protect_final(methods.LossConfig(), task_protects_final=False)
  assert methods.protect_final(methods.LossConfig(protect="final"), task_protects_final=False)
  assert not methods.protect_final(methods.LossConfig(protect="highways"), task_protects_final=True)
