"""Exit criteria on hand-made logits: each rule, per-exit thresholds, minimum layer, bad input."""

import jax.numpy as jnp
import numpy as np
import pytest

from rome_flax.engine import exit_policy as ep
from rome_flax.errors import RomeFlaxError
from rome_flax.kinds.kind import TOKEN

CONFIDENT = [8.0, 0.0]    # class 0, entropy ~ 0.003
UNSURE = [0.1, 0.0]       # class 0, entropy ~ 0.69
CONFIDENT1 = [0.0, 8.0]   # class 1, confident


def logits(*rows_per_exit):
  """rows_per_exit[e][n] -> [E, N, C] float32."""
  return jnp.asarray(np.array(rows_per_exit, np.float32))


def test_entropy_matches_definition_and_is_stable():
  z = jnp.asarray([[1000.0, 0.0], [0.0, 0.0], [1.0, 2.0]])
  p = np.exp(np.array([[0, -1000.0], [0, 0], [1, 2]]) - np.log(np.exp([[0, -1000.0], [0, 0], [1, 2]]).sum(1, keepdims=True)))
  expected = -(p * np.log(np.maximum(p, 1e-300))).sum(1)
  np.testing.assert_allclose(np.asarray(ep.entropy(z)), expected, atol=1e-6)
  assert np.all(np.isfinite(np.asarray(ep.entropy(z))))


def test_entropy_first_confident_exit_and_never_exits_uses_last():
  z = logits([UNSURE, CONFIDENT, UNSURE], [CONFIDENT, UNSURE, UNSURE], [UNSURE, CONFIDENT1, UNSURE])
  d = ep.decide(ep.make_policy("entropy", 0.1, 3, num_labels=2), z)
  np.testing.assert_array_equal(np.asarray(d.exit_index_N), [1, 0, 2])
  np.testing.assert_allclose(np.asarray(d.logits_NxC), np.asarray(z)[[1, 0, 2], [0, 1, 2]])


def test_per_exit_thresholds_and_min_exit_layer():
  z = logits([CONFIDENT, UNSURE], [CONFIDENT, CONFIDENT], [UNSURE, UNSURE])
  # exit 1 needs entropy < 0 (impossible), exit 2 < 0.1
  d = ep.decide(ep.make_policy("entropy", [0.0, 0.1], 3, num_labels=2), z)
  np.testing.assert_array_equal(np.asarray(d.exit_index_N), [1, 1])
  d = ep.decide(ep.make_policy("entropy", 0.1, 3, num_labels=2, min_exit_layer=3), z)
  np.testing.assert_array_equal(np.asarray(d.exit_index_N), [2, 2])


def test_maxprob():
  z = logits([[2.0, 0.0]], [[3.0, 0.0]], [[0.0, 0.0]])  # p = 0.881, 0.953
  assert int(ep.decide(ep.make_policy("maxprob", 0.9, 3, num_labels=2), z).exit_index_N[0]) == 1
  assert int(ep.decide(ep.make_policy("maxprob", 0.8, 3, num_labels=2), z).exit_index_N[0]) == 0
  assert int(ep.decide(ep.make_policy("maxprob", 0.99, 3, num_labels=2), z).exit_index_N[0]) == 2


def test_patience_counts_unchanged_argmax():
  # example 0: argmax 0,0,0,0 -> with k=2 exits at exit 3 (index 2); example 1: 0,1,1,1 -> exit 4 (index 3)
  z = logits([CONFIDENT, CONFIDENT], [UNSURE, CONFIDENT1], [UNSURE, CONFIDENT1], [UNSURE, CONFIDENT1],
             [UNSURE, UNSURE])
  d = ep.decide(ep.make_policy("patience", 2, 5, num_labels=2), z)
  np.testing.assert_array_equal(np.asarray(d.exit_index_N), [2, 3])
  d = ep.decide(ep.make_policy("patience", 1, 5, num_labels=2), z)
  np.testing.assert_array_equal(np.asarray(d.exit_index_N), [1, 2])


def test_patience_regression_uses_delta():
  z = jnp.asarray(np.array([[1.0, 1.0], [1.05, 3.0], [1.5, 3.01], [1.52, 5.0]], np.float32)[:, :, None])
  d = ep.decide(ep.make_policy("patience", 1, 4, num_labels=1, delta=0.1), z)
  np.testing.assert_array_equal(np.asarray(d.exit_index_N), [1, 2])
  np.testing.assert_allclose(np.asarray(d.logits_NxC)[:, 0], [1.05, 3.01])


def test_step_forces_last_exit():
  policy = ep.make_policy("entropy", 0.0, 2, num_labels=2)
  _, now = ep.step(policy, ep.init_state((1,)), jnp.asarray([UNSURE]), 1)
  assert bool(now[0])


def test_threshold_change_does_not_retrace():
  z = logits([UNSURE], [CONFIDENT])
  before = ep.decide._cache_size()
  for tau in (0.1, 0.2, 0.3):
    ep.decide(ep.make_policy("entropy", tau, 2, num_labels=2), z)
  assert ep.decide._cache_size() - before <= 1


@pytest.mark.parametrize("kwargs, match", [
    (dict(criterion="nope", threshold=0.1), "unknown criterion"),
    (dict(criterion="entropy", threshold=0.1, num_labels=1), "regression"),
    (dict(criterion="patience", threshold=2, num_labels=1), "delta"),
    (dict(criterion="patience", threshold=1.5), "whole number"),
    (dict(criterion="maxprob", threshold=1.5), r"\[0, 1\]"),
    (dict(criterion="entropy", threshold=[0.1, 0.2]), "one per exit"),
    (dict(criterion="entropy", threshold=0.1, min_exit_layer=9), "min_exit_layer"),
])
def test_bad_policies(kwargs, match):
  kwargs = {"num_labels": 2, **kwargs}
  with pytest.raises(RomeFlaxError, match=match):
    ep.make_policy(kwargs.pop("criterion"), kwargs.pop("threshold"), 4, **kwargs)


def test_parse_thresholds():
  assert ep.parse_thresholds("0.05, 0.1,0.2") == [[0.05], [0.1], [0.2]]
  assert ep.parse_thresholds("0.1:0.2:0.3") == [[0.1, 0.2, 0.3]]
  for bad in ("0.1,,0.2", "abc", "0.1;0.2"):
    with pytest.raises(RomeFlaxError, match="threshold list"):
      ep.parse_thresholds(bad)


def test_describe():
  assert ep.make_policy("entropy", 0.1, 3, num_labels=2).describe() == "entropy<0.1"
  assert ep.make_policy("patience", 2, 3, num_labels=1, delta=0.05).describe() == "patience=2,delta=0.05"
  assert ep.make_policy("maxprob", [0.8, 0.9], 3, num_labels=2).describe() == "maxprob>=0.8/0.9"


def test_threshold_in_gap_keeps_away_from_values_and_near_ties_count_them():
  """Issue 23: a median threshold sat within rounding of a value; the gap threshold does not."""
  v = np.array([0.1, 0.2, 0.3, 0.3 + 1e-7, 0.31, 0.6, 0.9, 1.0])
  tau = ep.threshold_in_gap(v)
  assert not ep.near_ties(v, tau, 1e-2).any() and 0.3 < tau < 0.9
  u = np.random.default_rng(0).random(1001)
  tau = ep.threshold_in_gap(u)
  assert abs((u < tau).mean() - 0.5) <= 0.06 and np.abs(u - tau).min() > 0
  assert ep.near_ties(v, 0.3, 1e-3).sum() == 2
  logits = np.array([[[2.0, 0.0], [0.0, 0.0]], [[0.0, 0.0], [0.0, 0.0]]], np.float32)   # [E=2, N=2, C=2]
  h = float(ep.entropy(jnp.asarray(logits[0, 0])))
  policy = ep.make_policy("entropy", h + 1e-4, 2, num_labels=2)
  np.testing.assert_array_equal(ep.near_tie_examples(policy, logits), [True, False])
  assert not ep.near_tie_examples(ep.make_policy("entropy", 0.0, 2, num_labels=2), logits).any()
  assert not ep.near_tie_examples(ep.make_policy("patience", 1, 2, num_labels=2), logits).any()


def test_every_criterion_implements_the_one_policy_protocol():
  """Entropy, maxprob, patience, SENTEE and TOKEE are all `ep.Policy`; one step and `record_exit`
  drive each, on examples or on words, and give the criterion's own decisions."""
  from rome_flax.engine import token_policy as tp
  z_ExNxC = logits([UNSURE, CONFIDENT], [CONFIDENT, CONFIDENT], [UNSURE, UNSURE])
  words_NxS = jnp.asarray([[1, 1, 0], [1, 0, 0]], jnp.int32)
  z_ExNxSxC = jnp.repeat(z_ExNxC[:, :, None], 3, axis=2)
  policies = [(ep.make_policy("entropy", 0.1, 3, num_labels=2), z_ExNxC, None),
              (ep.make_policy("maxprob", 0.9, 3, num_labels=2), z_ExNxC, None),
              (ep.make_policy("patience", 1, 3, num_labels=2), z_ExNxC, None),
              (ep.make_policy("entropy", 0.1, 3, num_labels=2, kind=TOKEN), z_ExNxSxC, words_NxS),
              (tp.make_token_policy(0.1, 1, 3), z_ExNxSxC, words_NxS > 0)]
  for policy, z, units in policies:
    assert isinstance(policy, ep.Policy), policy.describe()
    mask = jnp.ones(z.shape[1:2], bool) if units is None or not isinstance(policy, tp.TokenPolicy) else units
    state = policy.init_state(mask)
    done, exit_, out = jnp.zeros(mask.shape, bool), jnp.zeros(mask.shape, jnp.int32), jnp.zeros(z.shape[1:])
    for i in range(3):
      state, now = policy.step(state, z[i], i, units)
      assert now.shape == mask.shape
      done, exit_, out = ep.record_exit(now, i, z[i], done, exit_, out)
    assert bool(jnp.all(done | ~mask))
    if isinstance(policy, tp.TokenPolicy):
      # Each word's own exit, as `halt_step` gives it layer by layer.
      halted = ~mask
      expected = np.full(mask.shape, 0)
      for i in range(3):
        now = np.asarray(tp.halt_step(policy, halted, z[i], mask, i))
        expected[now] = i
        halted = halted | now
      np.testing.assert_array_equal(np.asarray(exit_)[np.asarray(mask)], expected[np.asarray(mask)])
    else:
      np.testing.assert_array_equal(np.asarray(exit_), np.asarray(ep.decide(policy, z, units).exit_index_N))
