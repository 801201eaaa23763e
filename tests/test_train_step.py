"""Train steps: GR projection and penalty against direct computations, stage freezing, optimizer."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rome_flax.model import encoder as model_lib
from rome_flax.model.config import ModelConfig
from rome_flax.train import methods
from rome_flax.train import train_step as ts
from rome_flax.train.methods import LossConfig, loss_terms

L = 3


@pytest.fixture
def setup():
  cfg = ModelConfig(vocab_size=40, hidden_size=16, num_hidden_layers=L, num_attention_heads=2,
                    intermediate_size=24, max_position_embeddings=16, num_labels=2,
                    hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  # Distinct exit poolers, larger classifiers: the gradients of the two groups then differ clearly.
  params["exits"] = jax.tree.map(lambda x: x + 0.3 * jax.random.normal(jax.random.PRNGKey(1), x.shape),
                                 params["exits"])
  rng = np.random.default_rng(0)
  batch = {"input_ids": rng.integers(3, 40, (4, 8)).astype(np.int32),
           "attention_mask": np.array([[1] * 8, [1] * 6 + [0] * 2, [1] * 8, [1] * 5 + [0] * 3], np.int32),
           "token_type_ids": np.zeros((4, 8), np.int32), "labels": np.array([0, 1, 1, 0], np.int32),
           "example_ids": np.array([0, 1, 2, -1], np.int32)}
  return cfg, params, batch


def flat(tree):
  return np.concatenate([np.ravel(x) for x in jax.tree.leaves(tree)])


def group_grads(cfg, params, batch, loss_cfg):
  """The two groups' gradients by two separate jax.grad calls on the plain model.forward (jitted: op by op,
  each primitive compiled on its own took 25 s of this file's 180)."""
  w = (batch["example_ids"] >= 0).astype(np.float32)
  terms = lambda p: loss_terms(model_lib.forward(p, cfg, batch["input_ids"], batch["attention_mask"],
                                                 batch["token_type_ids"]).exit_logits, batch["labels"], w, loss_cfg)
  return jax.jit(lambda p: (jax.grad(lambda q: terms(q).final)(p), jax.grad(lambda q: terms(q).highway)(p)))(params)


@pytest.mark.parametrize("protect_final", [False, True])
def test_projection_matches_numpy(setup, protect_final):
  cfg, params, batch = setup
  loss_cfg = LossConfig(method="romebert", gr="projection")
  g_final, g_highway = group_grads(cfg, params, batch, loss_cfg)
  g_a, g_b = (g_final, g_highway) if protect_final else (g_highway, g_final)

  # NumPy: one vector over the encoder matrices of layers 1..L-1.
  names = model_lib.ENCODER_MATRICES
  va = np.concatenate([np.ravel(np.asarray(g_a["layers"][n]["kernel"])[:L - 1]) for n in names])
  vb = np.concatenate([np.ravel(np.asarray(g_b["layers"][n]["kernel"])[:L - 1]) for n in names])
  dot = float(va @ vb)
  coef = dot / float(va @ va) if dot < 0 else 0.0
  want = jax.tree.map(lambda a, b: np.asarray(a) + np.asarray(b), g_a, g_b)
  for n in names:
    k = want["layers"][n]["kernel"]
    k[:L - 1] -= coef * np.asarray(g_a["layers"][n]["kernel"])[:L - 1]

  grads_fn = ts.make_grads_fn(cfg, loss_cfg, protect_final=protect_final)
  grads, (terms, stats) = jax.jit(grads_fn)(params, batch, jax.random.PRNGKey(0))
  np.testing.assert_allclose(flat(grads), flat(want), rtol=2e-4, atol=1e-7)
  np.testing.assert_allclose(stats["gr_cos"], dot / np.sqrt((va @ va) * (vb @ vb)), rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(stats["gr_norm_a"], np.linalg.norm(va), rtol=1e-4)
  np.testing.assert_allclose(stats["gr_norm_b"], np.linalg.norm(vb), rtol=1e-4)
  assert float(stats["gr_projected"]) == float(dot < 0)


def test_projection_removes_the_conflict_only_on_layers_below_the_last(setup):
  cfg, params, _ = setup
  rng = np.random.default_rng(3)
  g_a = jax.tree.map(lambda x: jnp.asarray(rng.normal(size=x.shape), jnp.float32), params)
  g_b = jax.tree.map(lambda x: -x + 0.1 * jnp.asarray(rng.normal(size=x.shape), jnp.float32), g_a)  # conflicting
  summed, stats = ts.project_conflicting(g_a, g_b, L)
  assert float(stats["gr_cos"]) < -0.9 and float(stats["gr_projected"]) == 1.0
  names = model_lib.ENCODER_MATRICES
  pick = lambda t, sl: np.concatenate([np.ravel(np.asarray(t["layers"][n]["kernel"])[sl]) for n in names])
  b_proj = pick(summed, slice(0, L - 1)) - pick(g_a, slice(0, L - 1))
  assert abs(pick(g_a, slice(0, L - 1)) @ b_proj) < 1e-3 * np.linalg.norm(b_proj) * np.linalg.norm(pick(g_a, slice(0, L - 1)))
  # Last layer, biases, embeddings and exits: the plain sum.
  np.testing.assert_allclose(pick(summed, slice(L - 1, L)), pick(g_a, slice(L - 1, L)) + pick(g_b, slice(L - 1, L)),
                             rtol=1e-6)
  np.testing.assert_allclose(summed["layers"]["qkv"]["bias"], g_a["layers"]["qkv"]["bias"] + g_b["layers"]["qkv"]["bias"])
  np.testing.assert_allclose(flat(summed["exits"]), flat(g_a["exits"]) + flat(g_b["exits"]), rtol=1e-6)


def test_sd_only_gradient_is_the_plain_sum(setup):
  cfg, params, batch = setup
  loss_cfg = LossConfig(method="romebert", gr="none")
  g_final, g_highway = group_grads(cfg, params, batch, loss_cfg)
  grads, _ = jax.jit(ts.make_grads_fn(cfg, loss_cfg))(params, batch, jax.random.PRNGKey(0))
  np.testing.assert_allclose(flat(grads), flat(g_final) + flat(g_highway), rtol=2e-4, atol=1e-7)


def test_penalty_is_the_squared_hidden_state_gradient(setup):
  cfg, params, batch = setup
  lam = 0.5
  loss_cfg = LossConfig(method="romebert", gr="penalty", gr_lambda=lam)
  w = (batch["example_ids"] >= 0).astype(np.float32)

  def highway_of_hidden(p, taps):  # the encoder written out here, a tap on each of layers 1..L-1
    h = model_lib.embed(p, cfg, batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
    bias = model_lib.attention_bias(jnp.asarray(batch["attention_mask"]))
    logits = []
    for i in range(L):
      h = model_lib.run_layer(p, cfg, i, h, bias)
      if i < L - 1:
        h = h + taps[i]
      logits.append(model_lib.run_exit(p, cfg, i, h, batch["attention_mask"]))
    t = loss_terms(jnp.stack(logits), batch["labels"], w, loss_cfg)
    return t.highway, t

  taps = jnp.zeros((L - 1, 4, 8, cfg.hidden_size))

  def total(p):
    d, t = jax.grad(highway_of_hidden, argnums=1, has_aux=True)(p, taps)
    pen = w.sum() * jnp.sum(d ** 2)
    return t.total + lam * pen, pen

  want_grads, want_pen = jax.jit(jax.grad(total, has_aux=True))(params)
  grads, (_, stats) = jax.jit(ts.make_grads_fn(cfg, loss_cfg))(params, batch, jax.random.PRNGKey(0))
  assert float(want_pen) > 0
  np.testing.assert_allclose(stats["gr_penalty"], want_pen, rtol=1e-4)
  np.testing.assert_allclose(flat(grads), flat(want_grads), rtol=2e-4, atol=1e-7)


def changed(before, after):
  return jax.tree.map(lambda a, b: np.abs(np.asarray(a) - np.asarray(b)).reshape(a.shape[0], -1).max(-1)
                      if a.ndim else abs(float(a - b)), before, after)


@pytest.mark.parametrize("method,stage", [("deebert", 1), ("deebert", 2), ("final_only", 1), ("romebert", 1)])
def test_stages_update_only_what_they_train(setup, method, stage):
  cfg, params, batch = setup
  opt_cfg = ts.OptimConfig(learning_rate=1e-2, total_steps=10, weight_decay=0.1)
  optimizer = ts.stage_optimizer(opt_cfg, params, cfg, method, stage)
  step = ts.make_train_step(cfg, LossConfig(method=method), optimizer, stage=stage)
  before = jax.device_get(params)
  state = ts.init_train_state(jax.tree.map(jnp.array, params), optimizer, seed=0)
  for _ in range(2):
    state, metrics = step(state, batch)
  assert int(state.step) == 2 and np.isfinite(float(metrics["loss"]))
  diff = changed(before, model_lib.stack_layers(jax.device_get(state.params)))
  exit_rows = np.asarray(diff["exits"]["classifier"]["kernel"]) > 0
  encoder_moved = np.asarray(diff["layers"]["qkv"]["kernel"]).max() > 0
  if method == "deebert" and stage == 2:
    assert exit_rows.tolist() == [True] * (L - 1) + [False] and not encoder_moved
    assert float(np.max(diff["embeddings"]["word"]["embedding"])) == 0.0
  elif method in ("deebert", "final_only"):
    assert exit_rows.tolist() == [False] * (L - 1) + [True] and encoder_moved
  else:
    assert exit_rows.all() and encoder_moved


def test_weight_decay_mask_skips_biases_and_layer_norm(setup):
  _, params, _ = setup
  mask = ts.weight_decay_mask(params)
  assert mask["layers"]["qkv"]["kernel"] and not mask["layers"]["qkv"]["bias"]
  assert not mask["layers"]["attention_ln"]["ln"]["scale"] and not mask["embeddings"]["ln"]["ln"]["bias"]
  assert mask["embeddings"]["word"]["embedding"] and mask["exits"]["classifier"]["kernel"]


def test_schedule_warms_up_then_decays():
  sched = ts.learning_rate_schedule(ts.OptimConfig(learning_rate=1.0, warmup_steps=10, total_steps=110))
  np.testing.assert_allclose([sched(0), sched(5), sched(10), sched(60), sched(110)], [0, 0.5, 1.0, 0.5, 0.0],
                             atol=1e-6)


def test_dropout_differs_per_step_but_is_reproducible():
  cfg = ModelConfig(vocab_size=40, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=24, max_position_embeddings=16, num_labels=2)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  batch = {"input_ids": np.full((2, 4), 5, np.int32), "attention_mask": np.ones((2, 4), np.int32),
           "token_type_ids": np.zeros((2, 4), np.int32)}
  plan = methods.get_method("romebert").stage(1).plan(cfg.num_layers)
  forward = jax.jit(lambda rng: ts.stage_forward(params, cfg, batch, rng, plan))   # jitted: one compile, not one per op
  a, b, c = forward(jax.random.PRNGKey(1)), forward(jax.random.PRNGKey(1)), forward(jax.random.PRNGKey(2))
  ref = jax.jit(lambda rng: model_lib.forward(params, cfg, batch["input_ids"], deterministic=False,
                                              rng=rng).exit_logits)(jax.random.PRNGKey(1))
  np.testing.assert_array_equal(a, b)
  np.testing.assert_allclose(a, ref, rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(a) - np.asarray(c)).max() > 0


def test_frozen_parameters_hold_no_optimizer_state(setup):
  """DeeBERT stage 2 freezes the encoder and the final exit with optax: Adam moments for the highways only."""
  cfg, params, _ = setup
  opt_cfg = ts.OptimConfig(learning_rate=1e-2, total_steps=10)
  moments = lambda opt: sum(x.size for x in jax.tree.leaves(ts.init_train_state(params, opt, seed=0).opt_state))
  both = moments(ts.stage_optimizer(opt_cfg, params, cfg, "romebert", 1))
  heads_only = moments(ts.stage_optimizer(opt_cfg, params, cfg, "deebert", 2))
  highway_params = sum(x[:L - 1].size for x in jax.tree.leaves(params["exits"]))
  all_params = sum(x.size for x in jax.tree.leaves(params))
  assert both >= 2 * all_params
  assert 2 * highway_params <= heads_only < 2 * highway_params + 16   # two moments each, plus counters


@pytest.mark.parametrize("method,gr", [("romebert", "projection"), ("romebert", "penalty"), ("final_only", "none")])
def test_gradient_accumulation_equals_the_full_batch(setup, method, gr):
  """K micro-batches inside the step give the update of one batch K times larger (dropout off); GR
  projects the accumulated gradients (its statistics equal the full batch's)."""
  cfg, params, batch = setup
  big = jax.tree.map(lambda x: np.concatenate([x, x[::-1]]), batch)   # 8 rows, two of them padding
  opt_cfg = ts.OptimConfig(learning_rate=1e-2, total_steps=10)
  loss_cfg = LossConfig(method=method, gr=gr)
  opt = ts.stage_optimizer(opt_cfg, params, cfg, method, 1)
  out = {}
  for k in (1, 4):
    step = ts.make_train_step(cfg, loss_cfg, opt, accum_steps=k)
    state = ts.init_train_state(jax.tree.map(jnp.array, params), opt, seed=0)   # the step donates its state
    for _ in range(2):
      state, metrics = step(state, big)
    out[k] = (flat(state.params), jax.device_get(metrics))
  grads = {k: flat(jax.jit(ts.make_grads_fn(cfg, loss_cfg, accum_steps=k))(params, big, jax.random.PRNGKey(0))[0])
           for k in (1, 4)}
  np.testing.assert_allclose(grads[4], grads[1], rtol=1e-4, atol=1e-6 * np.abs(grads[1]).max())
  # Adam divides by sqrt(v): coordinates whose gradient is ~0 amplify float noise; 1e-5 is 0.1% of a step.
  np.testing.assert_allclose(out[4][0], out[1][0], atol=1e-5)
  for name in out[1][1]:
    np.testing.assert_allclose(out[4][1][name], out[1][1][name], rtol=1e-4, atol=1e-6, err_msg=name)
  if gr == "projection":
    assert 0.0 < abs(float(out[1][1]["gr_cos"])) < 1.0


def test_bfloat16_training_tracks_float32(setup):
  """dtype='bfloat16': bf16 matmuls; float32 parameters, Adam moments, loss and GR dot products. Three
  GR steps stay within 2% of the float32 run's parameter change and loss."""
  cfg, params, batch = setup
  opt = ts.stage_optimizer(ts.OptimConfig(learning_rate=1e-3, total_steps=10), params, cfg, "romebert", 1)
  runs = {}
  for dtype in ("float32", "bfloat16"):
    c = cfg.replace(dtype=dtype)
    step = ts.make_train_step(c, LossConfig(method="romebert", gr="projection"), opt)
    state = ts.init_train_state(jax.tree.map(jnp.array, params), opt, seed=0)
    losses = []
    for _ in range(3):
      state, metrics = step(state, batch)
      losses.append(float(metrics["loss"]))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves((state.params, state.opt_state)) if x.ndim)
    assert metrics["gr_cos"].dtype == jnp.float32
    runs[dtype] = (flat(state.params) - flat(params), np.array(losses))
  d32, d16 = runs["float32"][0], runs["bfloat16"][0]
  print(f"bf16 vs f32: relative parameter-change error {np.linalg.norm(d16 - d32) / np.linalg.norm(d32):.4f}, "
        f"loss {runs['bfloat16'][1]} vs {runs['float32'][1]}")
  assert 0 < np.linalg.norm(d16 - d32) < 0.02 * np.linalg.norm(d32)   # bf16 really ran, and tracks (measured 0.06%)
  np.testing.assert_allclose(runs["bfloat16"][1], runs["float32"][1], rtol=0.02)
