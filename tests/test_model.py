"""Model logic on tiny configs: shapes, padding, exits, traced layer index, bfloat16, init."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rome_flax.errors import RomeFlaxError
from rome_flax.model import encoder as M
from rome_flax.model import layers
from rome_flax.model.config import ModelConfig
from rome_flax.model.pretrained import ExportInfo, MultiExitBert


def _batch(cfg, B=3, S=10, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(2, cfg.vocab_size, size=(B, S)).astype(np.int32)
  mask = np.ones((B, S), np.int32)
  if B >= 3:
    mask[1, 6:] = 0
    mask[2, 3:] = 0
  ids[mask == 0] = cfg.pad_token_id
  types = np.zeros_like(ids)
  types[:, 5:] = 1
  return ids, mask, types * mask


@pytest.mark.parametrize("pooling", ["cls", "mean"])
def test_forward_shapes(tiny_config, pooling):
  cfg = tiny_config.replace(exit_pooling=pooling)
  params = M.init_params(cfg, jax.random.PRNGKey(0))
  ids, mask, types = _batch(cfg)
  out = M.forward(params, cfg, ids, mask, types, output_hidden_states=True)
  assert out.exit_logits.shape == (cfg.num_exits, 3, cfg.num_labels)
  assert out.exit_logits.dtype == jnp.float32
  assert out.hidden_states.shape == (cfg.num_layers + 1, 3, 10, cfg.hidden_size)
  assert np.isfinite(np.asarray(out.exit_logits)).all()
  assert M.forward(params, cfg, ids, mask, types).hidden_states is None


@pytest.mark.parametrize("model_type,pooling", [("bert", "cls"), ("bert", "mean"), ("roberta", "cls")])
def test_padding_invariance(tiny_config, model_type, pooling):
  """Extra padding changes nothing for the real tokens or any exit."""
  cfg = tiny_config.replace(model_type=model_type, exit_pooling=pooling,
                            pad_token_id=1 if model_type == "roberta" else 0)
  params = M.init_params(cfg, jax.random.PRNGKey(1))
  ids, mask, types = _batch(cfg, B=1, S=6)
  pad = 9
  ids_p = np.concatenate([ids, np.full((1, pad), cfg.pad_token_id, np.int32)], 1)
  mask_p = np.concatenate([mask, np.zeros((1, pad), np.int32)], 1)
  types_p = np.concatenate([types, np.zeros((1, pad), np.int32)], 1)
  a = M.forward(params, cfg, ids, mask, types, output_hidden_states=True)
  b = M.forward(params, cfg, ids_p, mask_p, types_p, output_hidden_states=True)
  np.testing.assert_allclose(a.exit_logits, b.exit_logits, atol=1e-5)
  np.testing.assert_allclose(a.hidden_states, b.hidden_states[:, :, :6], atol=1e-5)


def test_layer_and_exit_with_traced_index_match_forward(tiny_config):
  cfg = tiny_config
  params = M.init_params(cfg, jax.random.PRNGKey(2))
  ids, mask, types = _batch(cfg)
  ref = M.forward(params, cfg, ids, mask, types, output_hidden_states=True)
  bias = M.attention_bias(jnp.asarray(mask))

  @jax.jit
  def step(i, h):  # one compiled function serves every layer index
    h = M.run_layer(params, cfg, i, h, bias)
    return h, M.run_exit(params, cfg, i, h, jnp.asarray(mask))

  h = ref.hidden_states[0]
  for i in range(cfg.num_layers):
    h, logits = step(jnp.int32(i), h)
    np.testing.assert_allclose(h, ref.hidden_states[i + 1], atol=1e-5)
    np.testing.assert_allclose(logits, ref.exit_logits[i], atol=1e-5)
  assert step._cache_size() == 1


def test_dropout_is_on_only_when_asked(tiny_config):
  cfg = tiny_config.replace(hidden_dropout_prob=0.3, attention_probs_dropout_prob=0.3)
  params = M.init_params(cfg, jax.random.PRNGKey(3))
  ids, mask, types = _batch(cfg)
  det = M.forward(params, cfg, ids, mask, types).exit_logits
  d1 = M.forward(params, cfg, ids, mask, types, deterministic=False, rng=jax.random.PRNGKey(0)).exit_logits
  d1b = M.forward(params, cfg, ids, mask, types, deterministic=False, rng=jax.random.PRNGKey(0)).exit_logits
  d2 = M.forward(params, cfg, ids, mask, types, deterministic=False, rng=jax.random.PRNGKey(1)).exit_logits
  assert not np.allclose(det, d1)
  np.testing.assert_array_equal(d1, d1b)
  assert not np.allclose(d1, d2)


def test_init_exit_poolers_are_copies_and_classifiers_small(tiny_config):
  params = M.init_params(tiny_config, jax.random.PRNGKey(4))
  pool = np.asarray(params["exits"]["pooler"]["kernel"])
  for i in range(1, tiny_config.num_exits):
    np.testing.assert_array_equal(pool[i], pool[0])
  cls = np.asarray(params["exits"]["classifier"]["kernel"])
  assert abs(cls.std() - 0.02) < 0.01
  assert not np.allclose(cls[0], cls[1])
  np.testing.assert_array_equal(np.asarray(params["exits"]["classifier"]["bias"]), 0.0)


def test_bfloat16_forward_close_to_float32(tiny_config):
  """bfloat16 matmuls with float32 params/softmax/LayerNorm: logits within 0.05 of float32."""
  cfg = tiny_config
  params = M.init_params(cfg, jax.random.PRNGKey(5))
  ids, mask, types = _batch(cfg)
  f32 = M.forward(params, cfg, ids, mask, types).exit_logits
  bf16 = M.forward(params, cfg.replace(dtype="bfloat16"), ids, mask, types)
  assert bf16.exit_logits.dtype == jnp.float32
  assert jax.tree.leaves(params)[0].dtype == jnp.float32
  np.testing.assert_allclose(bf16.exit_logits, f32, atol=0.05)


def test_num_layers_truncates(tiny_config):
  params = M.init_params(tiny_config, jax.random.PRNGKey(6))
  ids, mask, types = _batch(tiny_config)
  full = M.forward(params, tiny_config, ids, mask, types)
  one = M.forward(params, tiny_config, ids, mask, types, num_layers=1)
  assert one.exit_logits.shape[0] == 1
  np.testing.assert_allclose(one.exit_logits[0], full.exit_logits[0], atol=1e-6)


def test_config_validation():
  with pytest.raises(RomeFlaxError, match="model_type"):
    ModelConfig(model_type="gpt2")
  with pytest.raises(RomeFlaxError, match="exit_pooling"):
    ModelConfig(exit_pooling="max")
  with pytest.raises(RomeFlaxError, match="model_type 'gpt2'"):
    ModelConfig.from_hf_dict({"model_type": "gpt2"})


def test_wrapper_call_and_export_roundtrip(tiny_config, tmp_path):
  model = MultiExitBert.from_config(tiny_config, seed=7)
  ids, mask, types = _batch(tiny_config)
  out = model(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
  assert out.exit_logits.shape == (2, 3, 3)
  path = model.save_pretrained(tmp_path / "export", ExportInfo(task="unit", label_names=["a", "b", "c"]))
  again = MultiExitBert.from_pretrained(path)
  assert again.config == tiny_config
  # On the device, not the host arrays Orbax restores (a jitted call would copy those in on every call).
  assert all(isinstance(x, jax.Array) for x in jax.tree.leaves(again.params))
  assert again.export_info == ExportInfo(task="unit", label_names=("a", "b", "c"))
  # Same code path (output_hidden_states) on both sides: the parameters must round-trip bit for bit.
  np.testing.assert_array_equal(again(ids, mask, types, output_hidden_states=True).exit_logits, out.exit_logits)
  # Saving over an existing export replaces it whole (staged, then renamed).
  model.save_pretrained(path, ExportInfo(task="second"))
  assert MultiExitBert.from_pretrained(path).export_info.task == "second"
  assert not any(p.name.startswith(".export.tmp") for p in tmp_path.iterdir())
  with pytest.raises(RomeFlaxError, match="labels"):
    MultiExitBert.from_pretrained(path, num_labels=5)


def test_export_info_reads_older_and_newer_exports(tiny_config, tmp_path):
  """The "metadata" record keeps today's keys; unknown keys are ignored, missing ones default."""
  import json

  from rome_flax.io import integrity
  from rome_flax.model import pretrained
  path = MultiExitBert.from_config(tiny_config).save_pretrained(
      tmp_path / "export", ExportInfo(task="sst-2", max_length=64, dev_metrics={"dev": [{"accuracy": 50.0}]}))
  saved = json.loads((path / pretrained.EXPORT_CONFIG).read_text())
  assert saved["metadata"] == {"task": "sst-2", "max_length": 64, "dev_metrics": {"dev": [{"accuracy": 50.0}]}}
  saved["metadata"] = {"task": "rte", "label_names": ["entailment", "not_entailment"], "from_the_future": 1}
  (path / pretrained.EXPORT_CONFIG).write_text(json.dumps(saved))
  integrity.write_manifest(path)   # a newer rome_flax seals what it writes too
  info = MultiExitBert.from_pretrained(path).export_info
  assert info.task == "rte" and info.label_names == ("entailment", "not_entailment") and info.max_length is None
  del saved["metadata"]
  (path / pretrained.EXPORT_CONFIG).write_text(json.dumps(saved))
  (path / integrity.MANIFEST).unlink()   # an older one wrote no checksums: loaded, with a warning
  assert MultiExitBert.from_pretrained(path).export_info == ExportInfo()


def test_export_format_1_with_in_out_kernels_still_loads(tiny_config, tmp_path):
  """Exports written before weight matrices moved to [out, in] (format rome_flax/1) load transposed."""
  import json

  from rome_flax.model import pretrained
  model = MultiExitBert.from_config(tiny_config, seed=3)
  path = model.save_pretrained(tmp_path / "export")
  assert json.loads((path / pretrained.EXPORT_CONFIG).read_text())["format"] == "rome_flax/2"
  legacy = tmp_path / "legacy"
  legacy.mkdir()
  pretrained.save_params(legacy / pretrained.EXPORT_PARAMS, layers.swap_kernel_axes(model.params))
  saved = json.loads((path / pretrained.EXPORT_CONFIG).read_text())
  (legacy / pretrained.EXPORT_CONFIG).write_text(json.dumps(dict(saved, format="rome_flax/1")))
  assert model.params["layers"]["intermediate"]["kernel"].shape[1:] == (tiny_config.intermediate_size,
                                                                        tiny_config.hidden_size)
  again = MultiExitBert.from_pretrained(legacy, load_tokenizer_files=False)
  for want, got in zip(jax.tree.leaves(model.params), jax.tree.leaves(again.params)):
    np.testing.assert_array_equal(got, want)
  (legacy / pretrained.EXPORT_CONFIG).write_text(json.dumps(dict(saved, format="rome_flax/9")))
  with pytest.raises(RomeFlaxError, match="format 'rome_flax/9'"):
    MultiExitBert.from_pretrained(legacy)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_last_layer_first_token_only_gives_same_logits(tiny_config, dtype):
  """forward() skips the last layer's non-[CLS] rows when nothing reads them; logits are unchanged."""
  cfg = tiny_config.replace(dtype=dtype)
  assert M.last_layer_first_token_only(cfg) and not M.last_layer_first_token_only(cfg, output_hidden_states=True)
  assert not M.last_layer_first_token_only(cfg.replace(exit_pooling="mean"))
  params = M.init_params(cfg, jax.random.PRNGKey(8))
  ids, mask, types = _batch(cfg)
  short = M.forward(params, cfg, ids, mask, types).exit_logits
  full = M.forward(params, cfg, ids, mask, types, output_hidden_states=True).exit_logits
  np.testing.assert_allclose(short, full, atol=1e-5 if dtype == "float32" else 2e-2)
  h = M.forward(params, cfg, ids, mask, types, output_hidden_states=True).hidden_states
  one = M.run_layer(params, cfg, 1, h[1], M.attention_bias(jnp.asarray(mask)), first_token_only=True)
  assert one.shape == (3, 1, cfg.hidden_size)
  np.testing.assert_allclose(one[:, 0], h[2][:, 0], atol=1e-5 if dtype == "float32" else 2e-2)


def test_dropout_mask_rate_independence_and_determinism():
  shape, keep = (8, 4, 64, 64), 0.9
  key = jax.random.PRNGKey(11)
  m = np.asarray(layers.dropout_keep_mask(key, shape, keep)).ravel()
  assert abs(m.mean() - keep) < 4 * np.sqrt(keep * (1 - keep) / m.size)          # the rate, within 4 sigma
  np.testing.assert_array_equal(m, np.asarray(layers.dropout_keep_mask(key, shape, keep)).ravel())
  others = [np.asarray(layers.dropout_keep_mask(k, shape, keep)).ravel()
            for k in (jax.random.fold_in(key, 1), jax.random.PRNGKey(12), jax.random.key(11))]
  tol = 4 / np.sqrt(m.size)
  for o in others[:2]:   # another key: an unrelated mask
    assert abs(np.corrcoef(m, o)[0, 1]) < tol
  np.testing.assert_array_equal(m, others[2])   # typed and raw keys with the same data agree
  for lag in (1, 64, 4096):   # neighbours along every axis are independent
    assert abs(np.corrcoef(m[:-lag], m[lag:])[0, 1]) < tol
  x = jnp.ones((256, 512))
  y = layers.Dropout(0.25).apply({}, x, False, rngs={"dropout": key})
  np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 1 / 0.75], rtol=1e-6)
  assert abs(float(y.mean()) - 1.0) < 0.01
  np.testing.assert_array_equal(layers.Dropout(0.25).apply({}, x, True), x)


def test_linear_stores_kernels_out_by_in():
  """model.Linear is PyTorch's nn.Linear: kernel [out, in], y = x @ W.T + b; default init uses fan-in."""
  x = np.random.default_rng(0).standard_normal((2, 5, 256)).astype(np.float32)
  layer = layers.Linear(8)
  params = layer.init(jax.random.PRNGKey(0), x)["params"]
  assert params["kernel"].shape == (8, 256) and params["bias"].shape == (8,)
  assert abs(float(params["kernel"].std()) * 256 ** 0.5 - 1.0) < 0.15
  params = {"kernel": params["kernel"], "bias": jnp.arange(8, dtype=jnp.float32)}
  y = layer.apply({"params": params}, x)
  np.testing.assert_allclose(y, x @ np.asarray(params["kernel"]).T + np.arange(8), rtol=1e-5, atol=1e-5)
