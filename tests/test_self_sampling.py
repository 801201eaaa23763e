"""Self-sampling fine-tuning (TOKEE's stage 2): the sampling rules, the mixed forward equal to TOKEE
inference, the flooding loss against NumPy, and a stage-2 run end to end (and refused without stage 1)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import plain_exit_logits

import infer
import train
from rome_flax.engine import token_exit as te
from rome_flax.kinds import data, synthetic
from rome_flax.kinds.kind import TOKEN
from rome_flax.model import encoder as model_lib
from rome_flax.model.config import ModelConfig
from rome_flax.train import losses, methods, self_sampling
from tests.test_token_cli import TINY, make_dir, ner_sentences, run_cli

CFG = ModelConfig(vocab_size=len(synthetic.VOCAB), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64, num_labels=5, head="token")


@pytest.fixture(scope="module")
def encoded():
  rng = np.random.default_rng(0)
  words = [[str(rng.choice(synthetic.FILLER)) for _ in range(rng.integers(1, 12))] for _ in range(12)]
  tags = [rng.integers(0, 5, len(w)).astype(np.int32) for w in words]
  return data.encode_token_split(synthetic.build_tokenizer(), words, tags, max_length=32)


@pytest.fixture(scope="module")
def params():
  p = model_lib.init_params(CFG, jax.random.PRNGKey(4))
  p["exits"]["classifier"]["kernel"] = p["exits"]["classifier"]["kernel"] * 40.0
  return model_lib.unstack_layers(p)


def test_sampling_rules():
  cfg = methods.SelfSamplingOptions()
  windows, thr, small, full = self_sampling.sample_thresholds(np.random.default_rng(0), 10, 6, cfg,
                                                              eligible=np.arange(8))   # rows 8, 9: padding
  assert set(windows) <= set(cfg.ss_windows)
  assert len(full) == 4 and (thr[full] == -1).all() and not set(full) & {8, 9}   # 4 real rows never halt
  assert len(small) == 2 and not set(small) & set(full) and not set(small) & {8, 9}
  for k in small:   # the smallest window or the largest threshold
    assert windows[k] == 5 or thr[k, 0] == pytest.approx(0.25)
  rest = [k for k in range(10) if k not in full]
  np.testing.assert_allclose(thr[rest, 3:], np.minimum(2 * thr[rest, :3], 0.5), rtol=1e-6)
  again = self_sampling.sample_thresholds(np.random.default_rng(0), 10, 6, cfg, eligible=np.arange(8))
  np.testing.assert_array_equal(windows, again[0])   # (seed, step) -> the same draws on resume


def test_all_active_is_the_plain_forward(params, encoded):
  batch = data.pad_batch(encoded, np.arange(6), 6)
  args = (batch["input_ids"], batch["attention_mask"], batch["token_type_ids"])
  plain = plain_exit_logits(params, CFG, *args)
  active = np.ones((6, 4, batch["input_ids"].shape[1]), np.int32)
  mixed = plain_exit_logits(params, CFG, *args, active_BxLxS=active)
  np.testing.assert_allclose(mixed, plain, atol=2e-5)


def test_mixed_forward_equals_tokee_inference(params, encoded):
  """The training forward with TOKEE's own halting reproduces TOKEE's logits at every word's exit."""
  policy = te.make_token_policy(0.6, 3, 4)
  batch = data.pad_batch(encoded, np.arange(len(encoded)), len(encoded))
  arrays = [jnp.asarray(batch[k]) for k in ("input_ids", "attention_mask", "token_type_ids", "word_mask")]
  run = te.token_exit(params, CFG, policy, *arrays, gather=False)
  exits_BxW = np.asarray(run.word_exit_BxW)
  assert len(np.unique(exits_BxW[exits_BxW >= 0])) > 1
  word_of = np.asarray(te.piece_words(arrays[3], arrays[1]))
  piece_exit = np.where(word_of >= 0, np.take_along_axis(exits_BxW, np.maximum(word_of, 0), 1), 3)
  active = (piece_exit[:, None, :] >= np.arange(4)[None, :, None]).astype(np.int32)
  logits = np.asarray(plain_exit_logits(params, CFG, *arrays[:3], active_BxLxS=active))
  pos = np.asarray(te.word_positions(arrays[3]))
  for b in range(len(encoded)):
    for k in range(len(encoded.word_starts[b])):
      e = exits_BxW[b, k]
      np.testing.assert_allclose(logits[e, b, pos[b, k]], np.asarray(run.word_logits_BxWxC)[b, k], atol=3e-4)


def test_flooding_loss_matches_numpy():
  rng = np.random.default_rng(1)
  z = rng.normal(size=(3, 7, 4)).astype(np.float32)
  y = rng.integers(0, 4, 7)
  w = (rng.random(7) < 0.7).astype(np.float32)
  b = rng.random((3, 7)).astype(np.float32)
  terms = losses.flooding_terms(jnp.asarray(z), jnp.asarray(y), jnp.asarray(w), None, jnp.asarray(b))
  logp = z - np.log(np.exp(z).sum(-1, keepdims=True))
  ce = -np.take_along_axis(logp, y[None, :, None], -1)[..., 0]
  per = (np.abs(ce - b) * w).sum(-1) / w.sum()
  np.testing.assert_allclose(float(terms.total), (1 * per[0] + 2 * per[1] + 3 * per[2]) / 6, rtol=1e-5)


def test_batch_extras_follow_the_simulation(params, encoded):
  targets = self_sampling.stage_one_targets(
      lambda b: plain_exit_logits(params, CFG, b["input_ids"], b["attention_mask"], b["token_type_ids"]),
      encoded, 8)
  assert targets.uncertainty_NxWxL.shape == (len(encoded), encoded.max_words, 4)
  cfg = methods.SelfSamplingOptions(ss_windows=(1,), ss_thresholds=(2.0,), ss_sandwich_small=0, ss_sandwich_full=1)
  batch = data.pad_batch(encoded, np.arange(5), 6)
  extras = self_sampling.batch_extras(targets, batch, cfg, 4, np.random.default_rng(0))
  active = extras["active_BxLxS"]
  words = batch["word_mask"] > 0
  # Threshold 2 > any normalised entropy: every word halts after layer 1, except in the one real row
  # drawn for the full sandwich, and [CLS]/[SEP], which run on.
  halted_rows = [b for b in range(5) if (active[b, 1:][np.repeat(words[b, None], 3, 0)] == 0).all()]
  full_rows = [b for b in range(5) if (active[b][np.repeat(words[b, None], 4, 0)] == 1).all()]
  assert len(halted_rows) == 4 and len(full_rows) == 1 and (active[:5, 0][words[:5]] == 1).all()
  assert (active[:, :, 0] == 1).all()
  flood = extras["flood_bias_BxLxS"]
  np.testing.assert_allclose(flood[0, :, encoded.word_starts[0]], targets.loss_NxWxL[0, :len(encoded.word_starts[0])])
  assert (flood[5] == 0).all()   # the padding row


def test_stage_two_runs_and_needs_a_stage_one(tmp_path):
  data_dir, _ = make_dir(tmp_path / "data", ner_sentences)
  stage1 = tmp_path / "stage1"
  assert run_cli(train.main, [*TINY, "--task", "ner", "--data_dir", data_dir, "--output_dir", stage1,
                              "--method", "joint_weighted"]) == 0
  no_stage1 = run_cli(train.main, [*TINY, "--task", "ner", "--data_dir", data_dir, "--output_dir",
                                   tmp_path / "s2_alone", "--method", "self_sampling"])
  assert no_stage1 != 0 and not (tmp_path / "s2_alone").exists()
  stage2 = tmp_path / "stage2"
  assert run_cli(train.main, [*TINY, "--task", "ner", "--data_dir", data_dir, "--output_dir", stage2,
                              "--method", "self_sampling", "--model", stage1 / "export",
                              "--encoder_lr_scale", "0.1"]) == 0
  assert (stage2 / "export").is_dir()
  out = tmp_path / "infer"
  assert run_cli(infer.main, ["--checkpoint", stage2 / "export", "--data_dir", data_dir, "--output_dir", out,
                              "--tokee_windows", "3", "--tokee_thresholds", "0.1", "--measure_speed", "none",
                              "--no_progress"]) == 0
  assert (out / "tokee.json").is_file()


def test_predict_tags_api(tmp_path):
  """Production use: word lists in, tags and exit layers out, with a TOKEE or a SENTEE policy."""
  from rome_flax.engine import exit_policy as ep
  from rome_flax.model.pretrained import MultiExitBert
  data_dir, _ = make_dir(tmp_path / "data", ner_sentences)
  assert run_cli(train.main, [*TINY, "--task", "ner", "--data_dir", data_dir, "--output_dir", tmp_path / "r"]) == 0
  model = MultiExitBert.from_pretrained(tmp_path / "r" / "export")
  sentences = [["the", "good", "film"], ["bad"]]
  for policy in (te.make_token_policy(0.2, 3, model.config.num_layers),
                 ep.make_policy("entropy", 0.2, model.config.num_layers, num_labels=model.config.num_labels,
                                kind=TOKEN)):
    out = te.predict_tags(model, sentences, policy, batch_size=4)
    assert [len(t) for t in out.tags] == [3, 1] and all(t in model.export_info.label_names for t in out.tags[0])
    assert all(1 <= layer <= model.config.num_layers for s in out.exit_layers for layer in s)
