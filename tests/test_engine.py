"""The open engine (scheduler.py): work admitted while it runs, per-slot thresholds, eviction, and the
admission pass over a dataset taking the offline decisions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import plain_exit_logits

from rome_flax.engine import early_exit as ee
from rome_flax.engine import exit_policy as ep
from rome_flax.engine import scheduler as engine, inference
from rome_flax.kinds import data
from rome_flax.model import encoder as model_lib
from tests.test_early_exit import CFG, padded_arrays


@pytest.fixture(scope="module")
def prepared():
  p = model_lib.init_params(CFG, jax.random.PRNGKey(0))
  p["exits"]["classifier"]["kernel"] = p["exits"]["classifier"]["kernel"] * 150.0
  return ee.prepare_params(p)


def offline(prepared, policy, arrays):
  logits = np.asarray(plain_exit_logits(prepared, CFG, *arrays))
  return logits, np.asarray(ep.decide(policy, jnp.asarray(logits)).exit_index_N)


@pytest.mark.parametrize("slots", [4, 12])
def test_admission_pass_takes_the_offline_decisions(prepared, slots):
  arrays = padded_arrays(3, 41, 24)
  logits, _ = offline(prepared, ep.make_policy("entropy", 0.0, CFG.num_exits, num_labels=3), arrays)
  h = np.asarray(ep.entropy(jnp.asarray(logits)))
  policy = ep.make_policy("entropy", ep.threshold_in_gap(h[:-1]), CFG.num_exits, num_labels=3)
  want = np.asarray(ep.decide(policy, jnp.asarray(logits)).exit_index_N)
  assert 0 < (want < CFG.num_layers - 1).sum() < len(want)   # examples spread over layers
  encoded = data.EncodedSplit.from_padded(*arrays)
  run = inference.throughput_pass(prepared, CFG, policy, encoded, 4, chunk_size=slots, admission=True).run()
  closed = inference.throughput_pass(prepared, CFG, policy, encoded, 4).run()
  near = ep.near_tie_examples(policy, logits)
  np.testing.assert_array_equal(run.exit_index_N[~near], want[~near])
  np.testing.assert_array_equal(run.exit_index_N, closed.exit_index_N)
  np.testing.assert_allclose(run.logits_NxC, closed.logits_NxC, atol=1e-5)
  taken = logits[run.exit_index_N, np.arange(len(want))]
  np.testing.assert_allclose(run.logits_NxC, taken, atol=1e-4)


def test_open_engine_admits_while_running_with_per_slot_thresholds(prepared):
  """Two waves: the second is admitted after the first has run some layers; a slot whose threshold is
  0 runs every layer, one whose threshold is above log C exits at layer 1, whatever the wave."""
  ids, mask, types = padded_arrays(5, 8, 16)
  policy = ep.make_policy("entropy", 0.5, CFG.num_exits, num_labels=3)
  E, B, N = CFG.num_exits, 4, 8
  state = engine.init(CFG, N, 16)
  thresholds = np.array([[0.0] * E, [9.0] * E, [0.0] * E, [9.0] * E], np.float32)
  state = engine.admit(prepared, CFG, state, np.arange(4, dtype=np.int32), ids[:4], mask[:4], types[:4],
                       mask[:4].sum(1), thresholds)
  state = engine.run(prepared, CFG, policy, state, B, max_steps=1)
  assert int(state.runs) == 1 and np.asarray(state.running_N)[:4].tolist() == [True, False, True, False]
  slot_B = np.array([4, 5, 6, N], np.int32)    # the last row is padding: dropped
  state = engine.admit(prepared, CFG, state, slot_B, ids[4:], mask[4:], types[4:], mask[4:].sum(1), thresholds)
  state = engine.evict(state, np.arange(N) == 6)
  state = engine.run(prepared, CFG, policy, state, B)
  running, exits = np.asarray(state.running_N), np.asarray(state.exit_N)
  assert not running.any()
  assert exits[[0, 2, 4]].tolist() == [CFG.num_layers - 1] * 3 and exits[[1, 3, 5]].tolist() == [0, 0, 0]
  # The slots' logits are those of the exits they took, as the plain forward computes them.
  full = np.asarray(plain_exit_logits(prepared, CFG, ids, mask, types))
  for slot in (0, 1, 4, 5):
    np.testing.assert_allclose(np.asarray(state.out_NxC)[slot], full[exits[slot], slot], atol=1e-4)
  # Slot 6 was evicted before its first layer, slot 7 never admitted: 3 + 2 + 1 + ... layer batches ran.
  assert int(state.runs) < 2 * CFG.num_layers


def test_run_stops_when_enough_slots_are_free(prepared):
  ids, mask, types = padded_arrays(6, 4, 16)
  policy = ep.make_policy("entropy", 9.0, CFG.num_exits, num_labels=3)   # all exit at layer 1
  state = engine.init(CFG, 4, 16)
  state = engine.admit(prepared, CFG, state, np.arange(4, dtype=np.int32), ids, mask, types, mask.sum(1),
                       np.full((4, CFG.num_exits), 9.0, np.float32))
  state = engine.run(prepared, CFG, policy, state, 2, min_free=2)
  assert int(state.runs) == 1 and int((~np.asarray(state.running_N)).sum()) == 2
  # Among the waiting slots the highest priority (here the longest) goes first.
  first = np.flatnonzero(~np.asarray(state.running_N))
  assert set(first) == set(np.argsort(-mask.sum(1), kind="stable")[:2])


def test_short_rows_in_long_slots_run_under_a_view_as_in_short_slots(prepared):
  """The server's path (long slots, short requests): rows shorter than the slots are embedded at their own
  length, and `run(view=...)` reads and writes only the view; decisions and logits are those of slots as
  long as the rows, and the slots' positions past the rows stay zeros."""
  ids, mask, types = padded_arrays(7, 8, 16)
  E = CFG.num_exits
  policy = ep.make_policy("entropy", 0.5, E, num_labels=3)
  thresholds = np.array([[0.0] * E, [9.0] * E, [0.5] * E, [0.2] * E] * 2, np.float32)
  states = []
  for S, view in ((16, None), (48, 16)):
    state = engine.init(CFG, 8, S)
    state = engine.admit(prepared, CFG, state, np.arange(8, dtype=np.int32), ids, mask, types, mask.sum(1),
                         thresholds)
    states.append(engine.run(prepared, CFG, policy, state, 4, view=view))
  short, long = states
  exits = np.asarray(short.exit_N)
  assert len(set(exits.tolist())) > 1 and not np.asarray(long.running_N).any()
  np.testing.assert_array_equal(np.asarray(long.exit_N), exits)
  np.testing.assert_allclose(np.asarray(long.out_NxC), np.asarray(short.out_NxC), atol=1e-5)
  assert int(long.runs) == int(short.runs)
  np.testing.assert_allclose(np.asarray(long.h_NxSxD)[:, :16], np.asarray(short.h_NxSxD), atol=1e-4)
  assert not np.asarray(long.h_NxSxD)[:, 16:].any() and not np.asarray(long.mask_NxS)[:, 16:].any()
  with pytest.raises(ValueError, match="view 20"):
    engine.run(prepared, CFG, policy, engine.init(CFG, 8, 48), 4, view=20)
