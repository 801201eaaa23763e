"""Regression targets (model/targets.py): the exits learn standardised labels and speak the labels' units."""

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import plain_exit_logits

from rome_flax.errors import RomeFlaxError
from rome_flax.model import encoder as model_lib
from rome_flax.model import targets
from rome_flax.model.config import ModelConfig
from rome_flax.model.pretrained import MultiExitBert
from rome_flax.train import methods, trainer
from rome_flax.train.train_config import TrainConfig

CFG = ModelConfig(vocab_size=50, hidden_size=16, num_hidden_layers=3, num_attention_heads=2, intermediate_size=32,
                  max_position_embeddings=32, num_labels=1, exit_pooling="mean")
IDS = jnp.asarray(np.random.default_rng(0).integers(1, 50, (5, 7)))


def exit_logits(cfg, params):
  return np.asarray(plain_exit_logits(params, cfg, IDS))


def test_the_head_maps_its_output_to_the_labels_units():
  params = model_lib.init_params(CFG, jax.random.PRNGKey(0))
  plain = exit_logits(CFG, params)
  mapped = exit_logits(CFG.replace(regression_mean=2.5, regression_std=1.5), params)
  np.testing.assert_allclose(mapped, plain * 1.5 + 2.5, rtol=1e-6, atol=1e-6)
  assert not CFG.maps_regression_output and not CFG.replace(num_labels=3, regression_std=2.0).maps_regression_output


def test_the_loss_is_the_standardised_targets_mse():
  """NumPy reference: with pred = std * z + mean, the loss is the MSE of z against (y - mean) / std."""
  rng = np.random.default_rng(1)
  mean, std = 2.4, 1.6
  z = rng.normal(size=(3, 4, 1)).astype(np.float32)
  y = rng.uniform(0, 5, 4).astype(np.float32)
  w = np.ones(4, np.float32)
  pred = z * std + mean
  cfg = methods.LossConfig(gamma=0.9, regression=True, regression_scale=std)
  terms = methods.loss_terms(jnp.asarray(pred), jnp.asarray(y), jnp.asarray(w), cfg)
  t = (y - mean) / std
  mse = lambda a, b: np.mean((a - b) ** 2)
  np.testing.assert_allclose(terms.final, mse(z[-1, :, 0], t), rtol=1e-5)
  want = sum(0.1 * mse(z[i, :, 0], t) + 0.9 * mse(z[i, :, 0], z[-1, :, 0]) for i in range(2))
  np.testing.assert_allclose(terms.highway, want, rtol=1e-5)


def test_prepare_modes_start_from_the_same_function():
  labels = np.asarray([1.0, 2.0, 4.0, 5.0], np.float32)
  mean, std = targets.label_stats(labels)
  fresh = lambda: MultiExitBert(CFG, model_lib.init_params(CFG, jax.random.PRNGKey(3)))
  raw = targets.prepare(fresh(), labels, "raw")
  standard = targets.prepare(fresh(), labels, "standardize")
  biased = targets.prepare(fresh(), labels, "bias_init")
  assert raw.config == CFG and biased.config == CFG
  assert (standard.config.regression_mean, standard.config.regression_std) == pytest.approx((mean, std))
  np.testing.assert_allclose(exit_logits(standard.config, standard.params), exit_logits(CFG, biased.params),
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(exit_logits(standard.config, standard.params),
                             exit_logits(CFG, raw.params) * std + mean, rtol=1e-5, atol=1e-5)
  # A model that already carries statistics keeps them; classification is untouched.
  again = targets.prepare(standard, labels * 10, "standardize")
  assert again.config.regression_std == pytest.approx(std)
  # A head trained without statistics (an older rome_flax export) keeps its function under standardize.
  from rome_flax.model.pretrained import ExportInfo
  old = MultiExitBert(CFG, model_lib.init_params(CFG, jax.random.PRNGKey(3)), export_info=ExportInfo(method="romebert"))
  before = exit_logits(CFG, old.params)
  old = targets.prepare(old, labels, "standardize")
  assert old.config.maps_regression_output
  np.testing.assert_allclose(exit_logits(old.config, old.params), before, rtol=1e-4, atol=1e-5)
  cls = MultiExitBert(CFG.replace(num_labels=2), None)
  assert targets.prepare(cls, np.asarray([0, 1]), "standardize").config == CFG.replace(num_labels=2)


@pytest.mark.parametrize("labels,message", [([3.0, 3.0, 3.0], "labels that vary"), ([1.0, np.nan], "finite")])
def test_degenerate_labels_are_refused(labels, message):
  with pytest.raises(RomeFlaxError, match=message):
    targets.label_stats(np.asarray(labels))


def test_exports_carry_the_statistics_and_old_exports_load_as_before(tmp_path):
  params = model_lib.init_params(CFG, jax.random.PRNGKey(0))
  cfg = CFG.replace(regression_mean=2.0, regression_std=3.0)
  MultiExitBert(cfg, params).save_pretrained(tmp_path / "new")
  loaded = MultiExitBert.from_pretrained(tmp_path / "new")
  assert loaded.config == cfg
  np.testing.assert_array_equal(exit_logits(loaded.config, loaded.params), exit_logits(cfg, params))
  # An export written before the statistics existed: no such keys in its config, the identity map.
  MultiExitBert(CFG, params).save_pretrained(tmp_path / "old")
  path = tmp_path / "old" / "rome_flax_config.json"
  saved = json.loads(path.read_text())
  for key in ("regression_mean", "regression_std"):
    saved["model"].pop(key)
  path.write_text(json.dumps(saved))
  (tmp_path / "old" / "rome_flax_checksums.json").unlink()   # as written before checksums existed too
  old = MultiExitBert.from_pretrained(tmp_path / "old")
  assert not old.config.maps_regression_output
  np.testing.assert_array_equal(exit_logits(old.config, old.params), exit_logits(CFG, params))


def test_a_regression_run_learns_offset_labels_and_predicts_in_their_units(tmp_path):
  """Labels around 100 (a large common offset): the standardised run's exits track them; the export
  carries the train statistics, and its predictions are in the labels' units."""
  rng = np.random.default_rng(0)
  words = ["good", "bad", "fine", "awful", "great", "poor"]
  score = {"good": 2, "bad": -2, "fine": 1, "awful": -3, "great": 3, "poor": -1}
  rows = ["text,label"]
  for _ in range(96):
    w = rng.choice(words, 3)
    rows.append(f"{' '.join(w)},{100 + sum(score[x] for x in w):.1f}")
  (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
  cfg = TrainConfig().replace(task="custom", custom_regression=True, train_file=str(tmp_path / "train.csv"),
                              dev_file=str(tmp_path / "train.csv"), model=None, random_model_layers=2,
                              random_model_hidden=32, random_model_heads=2, random_model_intermediate=64,
                              max_length=8, batch_size=16, epochs=6, learning_rate=3e-3, eval_every=0,
                              log_every=6, save_every=100, method="romebert", exit_pooling="mean",
                              output_dir=str(tmp_path / "run"))
  results = trainer.train(cfg, progress=False)
  labels = np.asarray([float(r.split(",")[1]) for r in rows[1:]])
  model = MultiExitBert.from_pretrained(tmp_path / "run" / "export")
  assert model.config.regression_mean == pytest.approx(labels.mean(), rel=1e-5)
  assert model.config.regression_std == pytest.approx(labels.std(), rel=1e-5)
  assert results["dev"][-1]["pearson"] > 80, results
  assert results["dev"][-1]["mse"] < labels.var(), results   # in the labels' units: better than the mean


def test_runs_saved_before_the_field_ran_raw_targets():
  """--resume of a regression run saved before `regression_targets` existed must not switch its targets;
  a classification run saved then resumes as before (the field does not touch its maths)."""
  def saved_without_field(cfg):
    saved = json.loads(json.dumps(cfg.to_dict()))   # as config.json holds it
    saved.pop("regression_targets")
    return saved
  stsb = TrainConfig().replace(task="sts-b")
  assert trainer.config_differences(saved_without_field(stsb), stsb) == ["regression_targets"]
  assert trainer.config_differences(saved_without_field(stsb), stsb.replace(regression_targets="raw")) == []
  custom = TrainConfig().replace(task="custom", custom_regression=True)
  assert trainer.config_differences(saved_without_field(custom), custom) == ["regression_targets"]
  assert trainer.config_differences(saved_without_field(TrainConfig()), TrainConfig()) == []   # synthetic


def test_predictions_and_patience_deltas_speak_the_labels_units():
  """The Python API on a standardised export: values are std * plain + mean, and patience with delta
  std * d takes exactly the decisions the plain model takes with d (the deltas are in the labels' units)."""
  from rome_flax.engine import exit_policy, inference
  from rome_flax.kinds import synthetic
  cfg = CFG.replace(vocab_size=len(synthetic.VOCAB), max_position_embeddings=64)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(2))
  params["exits"]["classifier"]["kernel"] = params["exits"]["classifier"]["kernel"] * 50.0
  tok = synthetic.build_tokenizer()
  plain = MultiExitBert(cfg, params, tok)
  mapped = MultiExitBert(cfg.replace(regression_mean=3.0, regression_std=2.0), params, tok)
  texts = synthetic.make_split("dev", size=24)[0]
  mean_exit = []
  for delta in (1e-6, 0.01, 0.05, 0.2, 1.0, 1e6):
    a = inference.predict(plain, texts, exit_policy.make_policy("patience", 1, 3, num_labels=1, delta=delta))
    b = inference.predict(mapped, texts, exit_policy.make_policy("patience", 1, 3, num_labels=1, delta=2.0 * delta))
    np.testing.assert_array_equal(a.exit_layers, b.exit_layers)
    np.testing.assert_allclose(b.predictions, 2.0 * a.predictions + 3.0, rtol=1e-5, atol=1e-5)
    mean_exit.append(float(a.exit_layers.mean()))
  assert mean_exit[0] == 3.0 and mean_exit[-1] == 2.0   # the deltas span no exit .. every example exits early
