"""Latency and throughput paths take exactly the decisions of the offline all-exits pass + policy;
the host side (`inference`) feeds them pieces padded by `data.pad_batch`."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import plain_exit_logits

from rome_flax.engine import early_exit as ee
from rome_flax.engine import exit_policy as ep
from rome_flax.engine import inference
from rome_flax.kinds import data
from rome_flax.model import encoder as model_lib
from rome_flax.model.config import ModelConfig

CFG = ModelConfig(vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64, num_labels=3)


@pytest.fixture(scope="module")
def params():
  p = model_lib.init_params(CFG, jax.random.PRNGKey(0))
  # Confident-ish exits so that examples spread over layers.
  p["exits"]["classifier"]["kernel"] = p["exits"]["classifier"]["kernel"] * 150.0
  return p


def padded_arrays(seed: int, N: int, S: int, lengths=None):
  """(input_ids, attention_mask, token_type_ids) [N, S], right-padded, of random lengths."""
  rng = np.random.default_rng(seed)
  lengths = rng.integers(3, S + 1, N) if lengths is None else lengths
  mask = (np.arange(S)[None] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(1, CFG.vocab_size, (N, S)).astype(np.int32) * mask
  types = ((np.arange(S)[None] >= lengths[:, None] // 2) * mask).astype(np.int32)
  return ids, mask, types


@pytest.fixture(scope="module")
def arrays():
  return padded_arrays(0, 29, 16)


@pytest.fixture(scope="module")
def encoded(arrays):
  return data.EncodedSplit.from_padded(*arrays)


@pytest.fixture(scope="module")
def exit_logits(params, arrays):
  return np.asarray(plain_exit_logits(params, CFG, *arrays))


def gap_median(values):
  """A threshold in the widest gap between values near the median: no example sits within rounding of it."""
  return ep.threshold_in_gap(values)


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
  res = inference.full_model_pass(ee.prepare_params(params), CFG, encoded, batch_size=8).run()
  np.testing.assert_allclose(res.logits_NxC, exit_logits[-1], atol=1e-5)
  assert res.layer_runs == 4 * CFG.num_layers   # 29 examples: 4 batches of 8


@pytest.mark.parametrize("dispatch", ee.DISPATCHES)
def test_paths_equal_offline_decisions(params, encoded, exit_logits, dispatch):
  prepared = ee.prepare_params(params, dispatch)
  spread = set()
  # every criterion on the default dispatch; one on the other (compiles are the cost here)
  for n, policy in enumerate(policies(exit_logits)[:4 if dispatch == "switch" else 1]):
    want = ep.decide(policy, jnp.asarray(exit_logits))
    want_exit, want_logits = np.asarray(want.exit_index_N), np.asarray(want.logits_NxC)
    spread |= set(want_exit.tolist())
    runs = [inference.latency_pass(prepared, CFG, policy, encoded, batch_size=1).run(),
            inference.throughput_pass(prepared, CFG, policy, encoded, batch_size=4, chunk_size=16).run()]
    if n == 0:
      runs.append(inference.latency_pass(prepared, CFG, policy, encoded, batch_size=5).run())
    # Decisions within rounding of a threshold may differ between paths (issue 23): compare the others.
    far = ~ep.near_tie_examples(policy, exit_logits)
    assert far.sum() >= len(far) - 1, f"{(~far).sum()} near-ties: {policy.describe()}"
    for res in runs:
      np.testing.assert_array_equal(res.exit_index_N[far], want_exit[far], err_msg=policy.describe())
      np.testing.assert_array_equal(res.logits_NxC[far].argmax(-1), want_logits[far].argmax(-1))
      np.testing.assert_allclose(res.logits_NxC[far], want_logits[far], atol=1e-5)
  assert len(spread) >= 3 or dispatch == "slice", "test data should exercise several exits"


def test_latency_stops_early_and_throughput_skips_work(params, encoded, exit_logits):
  prepared = ee.prepare_params(params)
  policy = policies(exit_logits)[0]
  lat = inference.latency_pass(prepared, CFG, policy, encoded, batch_size=1).run()
  # batch 1: layers run = sum of (exit index + 1)
  assert lat.layer_runs == int((lat.exit_index_N + 1).sum())
  thr = inference.throughput_pass(prepared, CFG, policy, encoded, batch_size=4, chunk_size=32).run()
  example_layers = int((thr.exit_index_N + 1).sum())
  # each layer batch runs at most 4 examples, and at most one partial batch per layer
  assert -(-example_layers // 4) <= thr.layer_runs <= example_layers // 4 + CFG.num_layers
  assert thr.layer_runs < -(-len(encoded) // 4) * CFG.num_layers


def test_latency_exit_does_not_retrace_for_new_thresholds(params, arrays, exit_logits):
  prepared = ee.prepare_params(params)
  ids, mask, types = (jnp.asarray(a[:1, :16]) for a in arrays)
  ee.latency_exit(prepared, CFG, policies(exit_logits)[0], ids, mask, types)
  before = ee.latency_exit._cache_size()
  for tau in (0.1, 0.5, 0.9):
    ee.latency_exit(prepared, CFG, ep.make_policy("entropy", tau, CFG.num_exits, num_labels=3), ids, mask, types)
  assert ee.latency_exit._cache_size() == before


def test_plan_pads_and_buckets(encoded):
  pieces = inference.plan(encoded, 8)
  rows = np.concatenate([p["example_ids"] for p in pieces])
  assert sorted(rows[rows >= 0].tolist()) == list(range(len(encoded)))
  assert all(p["input_ids"].shape == (8, 16) for p in pieces)
  lengths = [p["attention_mask"].sum(1).max() for p in pieces]
  assert lengths == sorted(lengths, reverse=True)   # longest first
  # padding rows repeat the piece's first example (a batch-wide stopping rule waits for no padding row)
  last = pieces[-1]
  pad = last["example_ids"] < 0
  assert pad.sum() == 4 * 8 - 29 and (last["input_ids"][pad] == last["input_ids"][0]).all()
  mask = np.ones((3, 40), np.int32)
  mask[:, 20:] = 0
  short = data.EncodedSplit.from_padded(mask.copy(), mask)
  assert inference.plan(short, 2)[0]["input_ids"].shape == (2, 32)
  assert set(ee.trim_lengths(512)) == set(data.BUCKETS)   # the throughput path trims to the same buckets


@pytest.fixture(scope="module")
def wide(params):
  """24 examples padded to 40 tokens: 12 short (3..15 tokens), 12 long (17..40), and their exit logits."""
  rng = np.random.default_rng(1)
  lengths = np.concatenate([rng.integers(3, 16, 12), rng.integers(17, 41, 12)])
  ids, mask, types = padded_arrays(1, 24, 40, lengths)
  logits = np.asarray(plain_exit_logits(params, CFG, ids, mask, types))
  return data.EncodedSplit.from_padded(ids, mask, types), logits


def test_results_do_not_depend_on_padding(params, wide):
  """Pieces pad the examples to 16, 32 or 40 tokens: the same results as all padded to 40."""
  encoded, logits = wide
  assert {p["input_ids"].shape[1] for p in inference.plan(encoded, 4)} == {16, 32, 40}
  np.testing.assert_allclose(inference.run_all_exits(ee.prepare_params(params), CFG, encoded, 4), logits, atol=1e-5)


def test_throughput_trims_batches_of_short_examples_exactly(params, wide):
  """A chunk padded to 40 tokens runs batches of short examples at 16 or 32 tokens: same decisions."""
  encoded, logits = wide
  assert ee.trim_lengths(40) == (16, 32, 40)
  policy = policies(logits)[0]
  want = ep.decide(policy, jnp.asarray(logits))
  res = inference.throughput_pass(ee.prepare_params(params), CFG, policy, encoded, batch_size=4, chunk_size=24).run()
  np.testing.assert_array_equal(res.exit_index_N, np.asarray(want.exit_index_N))
  np.testing.assert_allclose(res.logits_NxC, np.asarray(want.logits_NxC), atol=1e-5)


def test_predict_texts_with_both_paths():
  from rome_flax.errors import RomeFlaxError
  from rome_flax.kinds import synthetic
  from rome_flax.model.pretrained import MultiExitBert
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


def test_speed_compare_interleaves_after_warm_up():
  from rome_flax.engine import speed
  calls = []

  class WithWarmUp:
    def warm_up(self):
      calls.append("A-warm")

    def __call__(self):
      calls.append("A")
      return len(calls)

  timed = speed.compare({"a": WithWarmUp(), "b": lambda: calls.append("B")}, rounds=2, warmup=2)
  assert calls == ["A-warm", "B", "B", "A", "B", "A", "B"]
  assert len(timed["a"].seconds) == 2 and timed["a"].result == 6 and timed["b"].warmup_seconds >= 0
  assert timed["a"].fastest <= timed["a"].median


def test_early_exit_speed_measures_both_paths(params, encoded, exit_logits):
  from rome_flax.engine import speed
  policy = policies(exit_logits)[0]
  got = speed.early_exit_speed(ee.prepare_params(params), CFG, policy, encoded, 8, latency_examples=5, repeats=1)
  want = np.asarray(ep.decide(policy, jnp.asarray(exit_logits)).exit_index_N)
  np.testing.assert_array_equal(got.throughput.run.exit_index_N, want)
  np.testing.assert_array_equal(got.latency.run.exit_index_N, want[:5])
  assert got.latency_examples == 5 and got.throughput_speedup > 0 and got.latency_speedup > 0
