"""Latency and throughput paths take exactly the decisions of the offline all-exits pass + policy."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rome_flax import early_exit as ee
from rome_flax import inference
from rome_flax import exit_policy as ep
from rome_flax import model as model_lib
from rome_flax.config import ModelConfig

CFG = ModelConfig(vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64, num_labels=3)


@pytest.fixture(scope="module")
def params():
  p = model_lib.init_params(CFG, jax.random.PRNGKey(0))
  # Confident-ish exits so that examples spread over layers.
  p["exits"]["classifier"]["kernel"] = p["exits"]["classifier"]["kernel"] * 150.0
  return p


@pytest.fixture(scope="module")
def encoded():
  rng = np.random.default_rng(0)
  N, S = 29, 16
  lengths = rng.integers(3, S + 1, N)
  mask = (np.arange(S)[None] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(1, CFG.vocab_size, (N, S)).astype(np.int32) * mask
  types = ((np.arange(S)[None] >= lengths[:, None] // 2) * mask).astype(np.int32)
  return inference.Encoded(ids, mask, types)


@pytest.fixture(scope="module")
def exit_logits(params, encoded):
  return np.asarray(model_lib.forward(params, CFG, encoded.input_ids, encoded.attention_mask,
                                      encoded.token_type_ids).exit_logits)


def gap_median(values):
  """A threshold halfway between two neighbouring values near the median: no example sits on it."""
  v = np.sort(np.ravel(values))
  k = len(v) // 2
  return float((v[k - 1] + v[k]) / 2)


def policies(exit_logits):
  h = np.asarray(ep.entropy(jnp.asarray(exit_logits)))
  return [ep.make_policy("entropy", gap_median(h[:-1]), CFG.num_exits, num_labels=3),
          ep.make_policy("entropy", [gap_median(h[k]) for k in range(3)], CFG.num_exits, num_labels=3,
                         min_exit_layer=2),
          ep.make_policy("maxprob", 0.6, CFG.num_exits, num_labels=3),
          ep.make_policy("patience", 1, CFG.num_exits, num_labels=3)]


def test_all_exits_matches_forward(params, encoded, exit_logits):
  for dispatch in ee.DISPATCHES:
    got = inference.run_all_exits(ee.prepare_params(params, dispatch), CFG, encoded, batch_size=8)
    np.testing.assert_allclose(got, exit_logits, atol=1e-5)


def test_full_model_is_final_exit(params, encoded, exit_logits):
  res = inference.run_full_model(ee.prepare_params(params), CFG, encoded, batch_size=8)
  np.testing.assert_allclose(res.logits_NxC, exit_logits[-1], atol=1e-5)
  assert res.seconds > 0 and res.warmup_seconds > 0


@pytest.mark.parametrize("dispatch", ee.DISPATCHES)
def test_paths_equal_offline_decisions(params, encoded, exit_logits, dispatch):
  prepared = ee.prepare_params(params, dispatch)
  spread = set()
  # every criterion on the default dispatch; one on the other (compiles are the cost here)
  for n, policy in enumerate(policies(exit_logits)[:4 if dispatch == "switch" else 1]):
    want = ep.decide(policy, jnp.asarray(exit_logits))
    want_exit, want_logits = np.asarray(want.exit_index_N), np.asarray(want.logits_NxC)
    spread |= set(want_exit.tolist())
    runs = [inference.run_latency(prepared, CFG, policy, encoded, batch_size=1),
            inference.run_throughput(prepared, CFG, policy, encoded, batch_size=4, chunk_size=16)]
    if n == 0:
      runs.append(inference.run_latency(prepared, CFG, policy, encoded, batch_size=5))
    for res in runs:
      np.testing.assert_array_equal(res.exit_index_N, want_exit, err_msg=policy.describe())
      np.testing.assert_array_equal(res.logits_NxC.argmax(-1), want_logits.argmax(-1))
      np.testing.assert_allclose(res.logits_NxC, want_logits, atol=1e-5)
  assert len(spread) >= 3 or dispatch == "slice", "test data should exercise several exits"


def test_latency_stops_early_and_throughput_skips_work(params, encoded, exit_logits):
  prepared = ee.prepare_params(params)
  policy = policies(exit_logits)[0]
  lat = inference.run_latency(prepared, CFG, policy, encoded, batch_size=1)
  # batch 1: layers run = sum of (exit index + 1)
  assert lat.layer_runs == int((lat.exit_index_N + 1).sum())
  thr = inference.run_throughput(prepared, CFG, policy, encoded, batch_size=4, chunk_size=32)
  example_layers = int((thr.exit_index_N + 1).sum())
  # each layer batch runs at most 4 examples, and at most one partial batch per layer
  assert -(-example_layers // 4) <= thr.layer_runs <= example_layers // 4 + CFG.num_layers
  assert thr.layer_runs < -(-encoded.num_examples // 4) * CFG.num_layers


def test_latency_exit_does_not_retrace_for_new_thresholds(params, encoded, exit_logits):
  prepared = ee.prepare_params(params)
  ids, mask, types = (jnp.asarray(a[:1, :16]) for a in encoded)
  ee.latency_exit(prepared, CFG, policies(exit_logits)[0], ids, mask, types)
  before = ee.latency_exit._cache_size()
  for tau in (0.1, 0.5, 0.9):
    ee.latency_exit(prepared, CFG, ep.make_policy("entropy", tau, CFG.num_exits, num_labels=3), ids, mask, types)
  assert ee.latency_exit._cache_size() == before


def test_plan_pads_and_buckets(encoded):
  pieces = inference.plan(encoded, 8)
  rows = np.concatenate([p.rows for p in pieces])
  assert sorted(rows[rows >= 0].tolist()) == list(range(encoded.num_examples))
  assert all(p.arrays[0].shape == (8, 16) for p in pieces)
  mask = np.ones((3, 40), np.int32)
  mask[:, 20:] = 0
  short = inference.Encoded(mask.copy(), mask, np.zeros_like(mask))
  assert inference.plan(short, 2)[0].arrays[0].shape == (2, 32)


def test_throughput_trims_batches_of_short_examples_exactly(params):
  """A chunk padded to 40 tokens runs batches of short examples at 16 or 32 tokens: same decisions."""
  rng = np.random.default_rng(1)
  N, S = 24, 40
  lengths = np.concatenate([rng.integers(3, 16, 12), rng.integers(17, S + 1, 12)])
  mask = (np.arange(S)[None] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(1, CFG.vocab_size, (N, S)).astype(np.int32) * mask
  encoded = inference.Encoded(ids, mask, np.zeros_like(ids))
  assert ee.trim_lengths(S) == (16, 32, 40)
  logits = np.asarray(model_lib.forward(params, CFG, ids, mask).exit_logits)
  policy = policies(logits)[0]
  want = ep.decide(policy, jnp.asarray(logits))
  res = inference.run_throughput(ee.prepare_params(params), CFG, policy, encoded, batch_size=4, chunk_size=24)
  np.testing.assert_array_equal(res.exit_index_N, np.asarray(want.exit_index_N))
  np.testing.assert_allclose(res.logits_NxC, np.asarray(want.logits_NxC), atol=1e-5)


def test_predict_texts_with_both_paths():
  from rome_flax import synthetic
  from rome_flax.errors import RomeFlaxError
  from rome_flax.pretrained import MultiExitBert
  cfg = CFG.replace(vocab_size=len(synthetic.VOCAB), num_labels=2, num_hidden_layers=2)
  model = MultiExitBert.from_config(cfg, tokenizer=synthetic.build_tokenizer())
  model.params["exits"]["classifier"]["kernel"] = model.params["exits"]["classifier"]["kernel"] * 150.0
  texts = synthetic.make_split("dev", size=12)[0]
  all_z = model(**{k: v for k, v in model.encode(texts).items()}).exit_logits
  policy = ep.make_policy("maxprob", 0.7, 2, num_labels=2)
  want = ep.decide(policy, all_z)
  for path in ("throughput", "latency"):
    got = inference.predict(model, texts, policy, batch_size=4, path=path)
    np.testing.assert_array_equal(got.exit_layers, np.asarray(want.exit_index_N) + 1)
    np.testing.assert_array_equal(got.predictions, np.asarray(want.logits_NxC).argmax(-1))
  with pytest.raises(RomeFlaxError, match="exits"):
    inference.predict(model, texts, ep.make_policy("maxprob", 0.7, 4, num_labels=2))
