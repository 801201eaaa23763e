"""Data parallelism on 8 (fake) CPU devices gives the single-device step's numbers."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import xla_flags

SCRIPT = textwrap.dedent("""
  import jax, numpy as np
  assert jax.device_count() == 8, jax.devices()
  from rome_flax.io import sharding
  from rome_flax.model.config import ModelConfig
  from rome_flax.model.encoder import init_params
  from rome_flax.train import train_step as steps
  from rome_flax.train.methods import LossConfig

  cfg = ModelConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=40, max_position_embeddings=32, num_labels=2)
  rs = np.random.default_rng(0)
  batch = {"input_ids": rs.integers(1, 50, (16, 12)).astype(np.int32),
           "attention_mask": np.ones((16, 12), np.int32), "token_type_ids": np.zeros((16, 12), np.int32),
           "labels": rs.integers(0, 2, (16,)).astype(np.int32), "example_ids": np.arange(16, dtype=np.int32)}
  batch["attention_mask"][::3, 8:] = 0
  opt = steps.make_optimizer(steps.OptimConfig(learning_rate=1e-3, total_steps=10))

  def run(mesh, fsdp=False, accum_steps=1):
    params = init_params(cfg, jax.random.PRNGKey(0))
    state = steps.init_train_state(params, opt, seed=1)
    shardings = None
    if mesh is not None:   # min_elements 256: this tiny model's matrices are sharded too
      shardings = sharding.state_shardings(state, mesh, fsdp, min_elements=256)
      state = sharding.place_state(state, mesh, fsdp, min_elements=256)
    step = steps.make_train_step(cfg, LossConfig(method="romebert", gr="projection"), opt,
                                 accum_steps=accum_steps, state_sharding=shardings)
    for _ in range(3):
      b = sharding.shard_batch(batch, mesh) if mesh is not None else batch
      state, metrics = step(state, b)
    return jax.device_get(state.params), jax.device_get(metrics)

  mesh = sharding.data_mesh()
  p1, m1 = run(None)
  # FSDP: the large matrices are really split 8 ways, and the numbers are those of one device.
  pf, mf = run(mesh, fsdp=True)
  errf = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(pf), jax.tree.leaves(p1)))
  print("fsdp max param diff", errf)
  assert errf < 1e-4, errf
  state = steps.init_train_state(init_params(cfg, jax.random.PRNGKey(0)), opt, seed=1)
  placed = sharding.place_state(state, mesh, fsdp=True, min_elements=256)
  word = placed.params["embeddings"]["word"]["embedding"]
  assert word.sharding.shard_shape(word.shape) == (50, 4), word.sharding   # [50, 32] split along 32
  full = sharding.bytes_per_device(state, sharding.state_shardings(state, mesh, False))
  split = sharding.bytes_per_device(state, sharding.state_shardings(state, mesh, True, min_elements=256))
  assert split < full, (split, full)
  # Gradient accumulation on the mesh (2 strided micro-batches, each spread over the 8 devices) gives
  # one device's accumulation (dropout keys differ per micro-batch, so not the unsplit batch's).
  pa, ma = run(mesh, accum_steps=2)
  pa1, _ = run(None, accum_steps=2)
  erra = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(pa), jax.tree.leaves(pa1)))
  print("accum max param diff", erra)
  assert erra < 1e-4, erra
  p8, m8 = run(mesh)
  err = max(float(np.abs(a - b).max()) for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)))
  print("max param diff", err, "loss", m8["loss"], m1["loss"])
  assert err < 1e-4, err
  assert abs(float(m8["gr_cos"]) - float(m1["gr_cos"])) < 1e-3
  try:
    sharding.check_batch_size(12, mesh)
    raise SystemExit("batch 12 on 8 devices must be refused")
  except Exception as e:
    assert "multiple of the 8 devices" in str(e)
  print("OK")
""")


@pytest.mark.slow
def test_data_parallel_step_matches_single_device():
  env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"), JAX_PLATFORMS="cpu",
             PYTHONPATH=str(Path(__file__).resolve().parents[1]))
  done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout + done.stderr
  assert "OK" in done.stdout


INFER_SCRIPT = textwrap.dedent("""
  import jax, jax.numpy as jnp, numpy as np
  assert jax.device_count() == 8, jax.devices()
  from rome_flax.engine import early_exit as ee, exit_policy as ep, inference
  from rome_flax.kinds import data
  from rome_flax.model.config import ModelConfig
  from rome_flax.model.encoder import init_params

  cfg = ModelConfig(vocab_size=50, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                    intermediate_size=48, max_position_embeddings=64, num_labels=3)
  params = init_params(cfg, jax.random.PRNGKey(0))
  params["exits"]["classifier"]["kernel"] = params["exits"]["classifier"]["kernel"] * 150.0
  rs = np.random.default_rng(0)
  N, S = 83, 40
  lengths = rs.integers(3, S + 1, N)
  mask = (np.arange(S)[None] < lengths[:, None]).astype(np.int32)
  encoded = data.EncodedSplit.from_padded(rs.integers(1, 50, (N, S)).astype(np.int32) * mask, mask,
                                          np.zeros_like(mask))
  prepared = ee.prepare_params(params)
  one, eight = inference.local_mesh(1), inference.local_mesh()
  assert eight.size == 8
  z1 = inference.run_all_exits(prepared, cfg, encoded, 16, mesh=one)
  z8 = inference.run_all_exits(prepared, cfg, encoded, 16, mesh=eight)
  np.testing.assert_allclose(z8, z1, atol=1e-5)
  f1 = inference.full_model_pass(prepared, cfg, encoded, 16, one).run()
  f8 = inference.full_model_pass(prepared, cfg, encoded, 16, eight).run()
  np.testing.assert_allclose(f8.logits_NxC, f1.logits_NxC, atol=1e-5)
  h = np.asarray(ep.entropy(jnp.asarray(z1)))
  policy = ep.make_policy("entropy", ep.threshold_in_gap(h[:-1]), cfg.num_exits, num_labels=3)
  assert not ep.near_tie_examples(policy, z1).any()   # the median itself would be a value: a tie (issue 23)
  want = np.asarray(ep.decide(policy, jnp.asarray(z1)).exit_index_N)
  assert len(set(want.tolist())) >= 3, "examples should spread over the exits"
  t1 = inference.throughput_pass(prepared, cfg, policy, encoded, 4, 8, one).run()
  t8 = inference.throughput_pass(prepared, cfg, policy, encoded, 4, 8, eight).run()
  np.testing.assert_array_equal(t1.exit_index_N, want)
  np.testing.assert_array_equal(t8.exit_index_N, want)
  np.testing.assert_allclose(t8.logits_NxC, t1.logits_NxC, atol=1e-5)
  print("OK")
""")


@pytest.mark.slow
def test_sharded_inference_equals_one_device():
  """The all-exits pass and the full model split each batch over 8 devices; the throughput path runs
  one chunk per device: the same logits and exits as one device."""
  env = dict(os.environ, XLA_FLAGS=xla_flags("--xla_force_host_platform_device_count=8"), JAX_PLATFORMS="cpu",
             PYTHONPATH=str(Path(__file__).resolve().parents[1]))
  done = subprocess.run([sys.executable, "-c", INFER_SCRIPT], env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout + done.stderr
  assert "OK" in done.stdout
