"""Token exits (sequence labelling): alignment of words to pieces, the head, the token losses against
NumPy, and SENTEE: the latency and throughput paths take exactly the offline decisions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import plain_exit_logits

from rome_flax.engine import exit_policy as ep
from rome_flax.engine import inference
from rome_flax.errors import RomeFlaxError
from rome_flax.kinds import data
from rome_flax.kinds import synthetic
from rome_flax.kinds.kind import TOKEN
from rome_flax.model import encoder as model_lib
from rome_flax.model.config import ModelConfig
from rome_flax.train import methods
from rome_flax.train import train_step as steps

TAGS = ("O", "B-PER", "I-PER", "B-LOC", "I-LOC")
CFG = ModelConfig(vocab_size=len(synthetic.VOCAB), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64, num_labels=len(TAGS), head="token")


def sentences(seed: int, n: int):
  rng = np.random.default_rng(seed)
  words = [[str(rng.choice(synthetic.FILLER + synthetic.POSITIVE)) for _ in range(rng.integers(1, 14))]
           for _ in range(n)]
  tags = [rng.integers(0, len(TAGS), len(w)).astype(np.int32) for w in words]
  return words, tags


@pytest.fixture(scope="module")
def tokenizer():
  return synthetic.build_tokenizer()


@pytest.fixture(scope="module")
def encoded(tokenizer):
  words, tags = sentences(0, 37)
  return data.encode_token_split(tokenizer, words, tags, max_length=32)


@pytest.fixture(scope="module")
def params():
  p = model_lib.init_params(CFG, jax.random.PRNGKey(0))
  p["exits"]["classifier"]["kernel"] = p["exits"]["classifier"]["kernel"] * 60.0   # spread the exits
  return p


def test_word_alignment_first_piece(tokenizer):
  """BERT-style: [CLS] pieces [SEP]; a word's label sits on its first piece; an unknown word is
  one piece [UNK]; labels -1 past the last word."""
  enc = data.encode_token_split(tokenizer, [["the", "zzz", "movie"], ["good"]], [np.array([0, 1, 2]), np.array([3])],
                                max_length=16)
  assert enc.word_starts[0].tolist() == [1, 2, 3] and enc.word_starts[1].tolist() == [1]
  assert enc.labels.tolist() == [[0, 1, 2], [3, -1, -1]]
  batch = data.pad_batch(enc, np.array([0, 1]), 3)
  assert batch["word_mask"].tolist()[0][:5] == [0, 1, 1, 1, 0]
  assert batch["labels"][0, 1:4].tolist() == [0, 1, 2] and batch["labels"][1, 1] == 3
  assert batch["word_mask"][2].sum() == 0   # a padding row has no words


def test_word_pieces_of_a_split_word():
  """A word of several pieces: its tag and prediction sit on the first piece only."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast
  vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "play", "##ing", "go"])}
  tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                 sep_token="[SEP]")
  enc = data.encode_token_split(fast, [["go", "playing", "go"]], [np.array([0, 1, 2])], max_length=16)
  assert enc.input_ids[0].tolist() == [2, 6, 4, 5, 6, 3]
  assert enc.word_starts[0].tolist() == [1, 2, 4]


def test_truncate_keeps_the_words_that_fit_and_says_how_many_were_cut(tokenizer):
  from rome_flax.kinds import token_data
  split = token_data.TokenSplit("ner", "dev", [["the"] * 20, ["a", "b"], ["the"] * 30], [["O"] * 20, ["O", "O"], ["O"] * 30],
                                np.arange(3), np.array([1, 22, 25]), "dev.txt", True)
  cut, warning = token_data.fit_to_length(split, tokenizer, 16)
  assert [len(w) for w in cut.words] == [14, 2, 14] and [len(t) for t in cut.tags] == [14, 2, 14]   # [CLS] 14 [SEP]
  assert warning == ("--truncate: 2 of 3 sentences were longer than max_length 16 word pieces and were cut "
                     "(22 words not predicted); the first: dev.txt:1")
  encoded = token_data.encode(tokenizer, cut, ("O",), 16)   # now it fits
  assert max(len(x) for x in encoded.input_ids) == 16
  assert token_data.fit_to_length(cut, tokenizer, 16) == (cut, None)


def test_long_sentence_is_refused_not_cut(tokenizer):
  words = [["the"] * 20]
  with pytest.raises(RomeFlaxError, match=r"dev.txt:7: a sentence of 20 words is 22 word pieces, more than "
                                          r"max_length 16; raise --max_length"):
    data.encode_token_split(tokenizer, words, None, max_length=16, where=lambda i: "dev.txt:7")


def test_token_head_shapes(params, encoded):
  batch = data.pad_batch(encoded, np.arange(8), 8)
  out = jax.eval_shape(lambda *a: model_lib.forward(params, CFG, *a), batch["input_ids"], batch["attention_mask"],
                       batch["token_type_ids"])
  assert out.exit_logits.shape == (4, 8, batch["input_ids"].shape[1], len(TAGS))


def _np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_token_losses_match_numpy(params, encoded):
  """romebert and joint_weighted on token exits: per-word CE / KL, averaged over the batch's words."""
  batch = data.pad_batch(encoded, np.arange(5), 6)   # one padding row
  logits = np.asarray(plain_exit_logits(params, CFG, batch["input_ids"], batch["attention_mask"],
                                        batch["token_type_ids"]))
  w = np.asarray(steps.example_weights(batch))
  assert w[5].sum() == 0 and w.sum() == sum(len(encoded.word_starts[i]) for i in range(5))
  z, y, m = logits.reshape(4, -1, len(TAGS)), batch["labels"].reshape(-1), w.reshape(-1)
  ce = lambda zz: -(np.take_along_axis(_np_log_softmax(zz), y[:, None], 1)[:, 0] * m).sum() / m.sum()
  T, g = 3.0, 0.9
  p, logp = np.exp(_np_log_softmax(z[-1] / T)), _np_log_softmax(z[-1] / T)
  kl = lambda zz: T * T * ((p * (logp - _np_log_softmax(zz / T))).sum(-1) * m).sum() / m.sum() / len(TAGS)
  rome = methods.loss_terms(*steps.flat_units(jnp.asarray(logits), batch["labels"], w),
                            methods.LossConfig("romebert", gamma=g, temperature=T))
  np.testing.assert_allclose(rome.final, ce(z[-1]), rtol=1e-5)
  np.testing.assert_allclose(rome.highway, sum((1 - g) * ce(z[i]) + g * kl(z[i]) for i in range(3)), rtol=1e-5)
  joint = methods.loss_terms(*steps.flat_units(jnp.asarray(logits), batch["labels"], w),
                             methods.LossConfig("joint_weighted"))
  np.testing.assert_allclose(joint.total, sum((i + 1) * ce(z[i]) for i in range(4)) / 10, rtol=1e-5)


def test_token_train_step_runs_and_learns(encoded):
  p = model_lib.init_params(CFG, jax.random.PRNGKey(1))
  loss_cfg = methods.LossConfig("romebert")
  opt = steps.make_optimizer(steps.OptimConfig(learning_rate=3e-3, total_steps=30))
  state = steps.init_train_state(p, opt, seed=0)
  step = steps.make_train_step(CFG, loss_cfg, opt)
  batch = data.pad_batch(encoded, np.arange(16), 16)
  losses = []
  for _ in range(30):
    state, m = step(state, batch)
    losses.append(float(m["loss"]))
  assert np.isfinite(losses).all() and losses[-1] < 0.75 * losses[0]
  assert float(m["gr_cos"]) == float(m["gr_cos"])   # GR ran on the token exits


def _policies(exit_logits_words, mask):
  u = np.asarray(ep.entropy(jnp.asarray(exit_logits_words))) / np.log(len(TAGS))
  pooled = np.where(mask[None], u, -np.inf).max(-1)   # [E, N]
  tau = ep.threshold_in_gap(pooled[:-1])   # no sentence within rounding of it (issue 23)
  return [ep.make_policy("entropy", tau, 4, num_labels=len(TAGS), kind=TOKEN),
          ep.make_policy("entropy", [tau * 0.5, tau, tau * 1.5], 4, num_labels=len(TAGS), kind=TOKEN),
          ep.make_policy("maxprob", 0.6, 4, num_labels=len(TAGS), kind=TOKEN),
          ep.make_policy("entropy", 0.0, 4, num_labels=len(TAGS), kind=TOKEN)]


def test_sentee_offline_pooling_matches_definition(params, encoded):
  """The offline decision: the first exit whose max over words of H / log C is below tau."""
  logits = inference.run_all_exits(model_lib.unstack_layers(params), CFG, encoded, 8)
  mask = encoded.word_mask
  assert logits.shape == (4, len(encoded), encoded.max_words, len(TAGS))
  tau = 0.5
  d = ep.decide(ep.make_policy("entropy", tau, 4, num_labels=len(TAGS), kind=TOKEN), jnp.asarray(logits),
                jnp.asarray(mask))
  u = np.asarray(ep.entropy(jnp.asarray(logits))) / np.log(len(TAGS))
  below = np.where(mask[None], u, -np.inf).max(-1) < tau
  below[-1] = True
  np.testing.assert_array_equal(np.asarray(d.exit_index_N), below.argmax(0))
  avg = ep.make_policy("entropy", tau, 4, num_labels=len(TAGS), kind=TOKEN, pool="avg")
  below_avg = (np.where(mask[None], u, 0).sum(-1) / mask.sum(-1)) < tau
  below_avg[-1] = True
  np.testing.assert_array_equal(np.asarray(ep.decide(avg, jnp.asarray(logits), jnp.asarray(mask)).exit_index_N),
                                below_avg.argmax(0))


@pytest.mark.parametrize("dispatch", ["switch", "slice"])
def test_sentee_paths_equal_offline(params, encoded, dispatch):
  """Latency (batch 1 and 4) and throughput (batch 4, chunk 12) paths: the offline exits and the
  logits of the exit taken, word by word."""
  prepared = model_lib.unstack_layers(params) if dispatch == "switch" else model_lib.stack_layers(params)
  logits = inference.run_all_exits(prepared, CFG, encoded, 8)
  mask = encoded.word_mask
  for policy in _policies(logits, mask):
    d = ep.decide(policy, jnp.asarray(logits), jnp.asarray(mask))
    exits = np.asarray(d.exit_index_N)
    assert 0 < exits.min() or exits.max() > 0
    runs = [inference.latency_pass(prepared, CFG, policy, encoded, 1).run(),
            inference.latency_pass(prepared, CFG, policy, encoded, 4).run(),
            inference.throughput_pass(prepared, CFG, policy, encoded, 4, chunk_size=12).run()]
    # Sentences within rounding of a threshold may exit differently on another path: compare the others.
    far = ~ep.near_tie_examples(policy, logits, mask)
    assert far.sum() >= len(far) - 1, f"{(~far).sum()} near-ties: {policy.describe()}"
    for run in runs:
      np.testing.assert_array_equal(run.exit_index_N[far], exits[far], err_msg=policy.describe())
      np.testing.assert_allclose(run.logits_NxC[far], np.asarray(d.logits_NxC)[far], atol=2e-5)


def test_patience_is_refused_for_token_tasks():
  with pytest.raises(RomeFlaxError, match="is for sentence tasks"):
    ep.make_policy("patience", 2, 4, num_labels=5, kind=TOKEN)
  with pytest.raises(RomeFlaxError, match="is for token tasks"):
    ep.make_policy("entropy", 0.1, 4, num_labels=2, pool="avg")


def test_collect_reads_per_device_groups():
  """A multi-device throughput piece stacks word masks [D, N, S] while its outputs and example ids
  are flat (D*N rows): words are still taken from the right rows."""
  from rome_flax.engine.early_exit import ExitResult
  mask_DxNxS = np.array([[[0, 1, 1, 0], [0, 1, 0, 0]], [[0, 0, 0, 0], [0, 1, 1, 1]]])
  piece = {"example_ids": np.array([0, 1, -1, 2]), "word_mask": mask_DxNxS}
  logits = np.random.default_rng(0).normal(size=(4, 4, len(TAGS))).astype(np.float32)
  out = ExitResult(logits, np.array([1, 2, 0, 3], np.int32), np.int32(0))
  run = inference.Pass([piece], None, 3, CFG, num_units=3).collect([out])
  np.testing.assert_array_equal(run.logits_NxC[0, :2], logits[0, [1, 2]])
  np.testing.assert_array_equal(run.logits_NxC[1, :1], logits[1, [1]])
  np.testing.assert_array_equal(run.logits_NxC[2], logits[3, [1, 2, 3]])
  assert run.exit_index_N.tolist() == [1, 2, 3]
