"""Data parallelism on 8 (fake) CPU devices gives the single-device step's numbers."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

SCRIPT = textwrap.dedent("""
  import jax, numpy as np
  assert jax.device_count() == 8, jax.devices()
  from rome_flax.config import ModelConfig
  from rome_flax.methods import LossConfig
  from rome_flax.model import init_params
  from rome_flax import sharding, train_step as steps

  cfg = ModelConfig(vocab_size=50, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                    intermediate_size=40, max_position_embeddings=32, num_labels=2)
  rs = np.random.default_rng(0)
  batch = {"input_ids": rs.integers(1, 50, (16, 12)).astype(np.int32),
           "attention_mask": np.ones((16, 12), np.int32), "token_type_ids": np.zeros((16, 12), np.int32),
           "labels": rs.integers(0, 2, (16,)).astype(np.int32), "example_ids": np.arange(16, dtype=np.int32)}
  batch["attention_mask"][::3, 8:] = 0
  opt = steps.make_optimizer(steps.OptimConfig(learning_rate=1e-3, total_steps=10), init_params(cfg, jax.random.PRNGKey(0)))

  def run(mesh):
    params = init_params(cfg, jax.random.PRNGKey(0))
    step = steps.make_train_step(cfg, LossConfig(method="romebert", gr="projection"), opt, params)
    state = steps.init_train_state(params, opt, seed=1)
    if mesh is not None:
      state = sharding.replicate(state, mesh)
    for _ in range(3):
      b = sharding.shard_batch(batch, mesh) if mesh is not None else batch
      state, metrics = step(state, b)
    return jax.device_get(state.params), jax.device_get(metrics)

  mesh = sharding.data_mesh()
  p8, m8 = run(mesh)
  p1, m1 = run(None)
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


def test_data_parallel_step_matches_single_device():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu",
             PYTHONPATH=str(Path(__file__).resolve().parents[1]))
  done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stdout + done.stderr
  assert "OK" in done.stdout
