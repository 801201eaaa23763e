"""TOKEE (token-level early exit): the criterion against NumPy, the halting semantics against a plain
step-by-step reference, thresholds 0 = the full model, and the gathered (work-skipping) loop equal to
the plain one at every batch size."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rome_flax.engine import token_exit as te
from rome_flax.errors import RomeFlaxError
from rome_flax.kinds import data, synthetic
from rome_flax.model import encoder as model_lib
from rome_flax.model.config import ModelConfig

TAGS = 5
CFG = ModelConfig(vocab_size=len(synthetic.VOCAB), hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64, num_labels=TAGS, head="token")


def _split_word_tokenizer():
  """Word pieces: 'playing' -> play ##ing, so that words have several pieces."""
  from tokenizers import Tokenizer, models, pre_tokenizers, processors
  from transformers import PreTrainedTokenizerFast
  words = ["the", "movie", "good", "bad", "play", "##ing", "##s", "act", "##or", "was", "very"]
  vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + words)}
  tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = pre_tokenizers.Whitespace()
  tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
  return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                 sep_token="[SEP]")


@pytest.fixture(scope="module")
def encoded():
  rng = np.random.default_rng(0)
  vocab = ["the", "movie", "good", "bad", "playing", "plays", "actor", "was", "very", "acts"]
  words = [[str(rng.choice(vocab)) for _ in range(rng.integers(1, 12))] for _ in range(21)]
  return data.encode_token_split(_split_word_tokenizer(), words, None, max_length=48)


@pytest.fixture(scope="module")
def params():
  cfg = CFG.replace(vocab_size=15)
  p = model_lib.init_params(cfg, jax.random.PRNGKey(3))
  p["exits"]["classifier"]["kernel"] = p["exits"]["classifier"]["kernel"] * 40.0
  return model_lib.unstack_layers(p)


CFG15 = CFG.replace(vocab_size=15)


def test_window_max_matches_numpy():
  rng = np.random.default_rng(1)
  u = rng.random((3, 9)).astype(np.float32)
  valid = np.arange(9)[None] < np.array([[9], [4], [1]])
  for w in (1, 3, 5, 15):
    got = np.asarray(te.window_max(jnp.asarray(u), jnp.asarray(valid), w))
    for b in range(3):
      for j in range(valid[b].sum()):
        lo, hi = max(0, j - w // 2), min(valid[b].sum(), j + w // 2 + 1)
        assert got[b, j] == u[b, lo:hi].max()


def test_halt_step_reference_and_masked_window():
  """Word 1 is confident, its neighbour 0 halted earlier and is uncertain: the reference's window
  still counts word 0 (7.1), the masked variant does not."""
  z_conf, z_flat = np.array([9.0, 0, 0, 0, 0]), np.zeros(5)
  logits = jnp.asarray(np.stack([z_flat, z_conf, z_conf])[None], jnp.float32)
  valid = jnp.ones((1, 3), bool)
  halted = jnp.asarray([[True, False, False]])
  ref = te.make_token_policy(0.1, 3, 4)
  masked = te.make_token_policy(0.1, 3, 4, masked_window=True)
  assert np.asarray(te.halt_step(ref, halted, logits, valid, 0)).tolist() == [[False, False, True]]
  assert np.asarray(te.halt_step(masked, halted, logits, valid, 0)).tolist() == [[False, True, True]]
  # The last layer halts every word left.
  assert np.asarray(te.halt_step(ref, halted, logits, valid, 3)).tolist() == [[False, True, True]]


def test_policy_thresholds_double_in_the_upper_half():
  p = te.make_token_policy(0.1, 5, 6)
  np.testing.assert_allclose(np.asarray(p.threshold_L), [0.1, 0.1, 0.1, 0.2, 0.2, 0.2], rtol=1e-6)
  assert p.describe() == "tokee,w=5,tau=0.1"


@pytest.mark.parametrize("bad, match", [
    (dict(window=4), "odd whole number"), (dict(window=0), "odd whole number"),
    (dict(threshold=[]), "no TOKEE threshold"), (dict(threshold=[0.1, 0.2]), "one per layer"),
    (dict(threshold=-1.0), ">= 0"), (dict(copy_wordpiece="last"), "copy_wordpiece")])
def test_bad_policies(bad, match):
  kw = dict(threshold=0.1, window=3)
  kw.update(bad)
  with pytest.raises(RomeFlaxError, match=match):
    te.make_token_policy(kw.pop("threshold"), kw.pop("window"), 4, **kw)


def test_tokee_is_for_token_tasks(params, encoded):
  with pytest.raises(RomeFlaxError, match="for token tasks"):
    te.token_pass(params, CFG15.replace(head="sequence"), te.make_token_policy(0.1, 3, 4), encoded, 4)


def _full_model_words(params, encoded):
  from rome_flax.engine import inference
  return inference.run_all_exits(params, CFG15, encoded, 8)[-1]   # [N, W, C] word-level, final exit


def test_thresholds_zero_equal_the_full_model(params, encoded):
  full = _full_model_words(params, encoded)
  policy = te.make_token_policy(0.0, 3, 4)
  for gather, batch in ((True, 1), (True, 8), (False, 8)):
    run = te.token_pass(params, CFG15, policy, encoded, batch, gather=gather).run()
    mask = encoded.word_mask
    assert (run.word_exits[mask] == 3).all() and (run.word_exits[~mask] == -1).all()
    np.testing.assert_allclose(run.word_logits[mask], full[mask], atol=2e-5)
    lengths = encoded.lengths
    np.testing.assert_array_equal(run.keys, np.repeat(lengths[:, None], 4, 1))
    assert te.flops_ratio(CFG15, run.queries, run.keys, lengths) < 1.0   # every exit head ran


# The reference's model pieces, each jitted whole (cfg and the layer static): run op by op, every
# primitive compiled on its own for each sentence length (388 compilations, 31 s of this file's 88).
_embed = jax.jit(model_lib.embed, static_argnums=1)
_layer = jax.jit(lambda params, cfg, i, h, bias: model_lib.run_layer(params, cfg, i, h, bias, residual_out=True),
                 static_argnums=(1, 2))
_norm = jax.jit(lambda params, cfg, i, p: model_lib.output_norm(model_lib.layer_slice(params["layers"], i), cfg, p),
                static_argnums=(1, 2))
_exit = jax.jit(model_lib.run_exit, static_argnums=(1, 2))


def _reference_tokee(params, cfg, policy, ids, types, word_starts):
  """A plain step-by-step TOKEE of one sentence: every piece computed, halted pieces restored, the
  window and thresholds in NumPy loops."""
  S = len(ids)
  L = cfg.num_layers
  ids_1xS, mask_1xS = jnp.asarray(ids)[None], jnp.ones((1, S), jnp.int32)
  bias = model_lib.attention_bias(mask_1xS)
  h = _embed(params, cfg, ids_1xS, mask_1xS, jnp.asarray(types)[None])
  p = np.array(h, np.float32)
  W = len(word_starts)
  word_of = np.full(S, -1)
  for k, s in enumerate(word_starts):
    end = word_starts[k + 1] if k + 1 < W else S - 1
    word_of[s:end] = k
  halted, exits = np.zeros(W, bool), np.full(W, -1)
  out = np.zeros((W, cfg.num_labels), np.float32)
  thr = np.asarray(policy.threshold_L)
  for i in range(L):
    if halted.all():
      break
    active = np.array([word_of[s] < 0 or not halted[word_of[s]] for s in range(S)])
    p_new = np.asarray(_layer(params, cfg, i, h, bias))[0]
    p[0, active] = p_new[active]
    h = _norm(params, cfg, i, jnp.asarray(p))
    z = np.asarray(_exit(params, cfg, i, h, mask_1xS))[0][word_starts]
    zs = z - z.max(-1, keepdims=True)
    prob = np.exp(zs) / np.exp(zs).sum(-1, keepdims=True)
    u = -(prob * np.log(np.maximum(prob, 1e-30))).sum(-1) / np.log(cfg.num_labels)
    for j in range(W):
      if halted[j]:
        continue
      win = u[max(0, j - policy.window // 2): j + policy.window // 2 + 1].max()
      if win < thr[i] or i == L - 1:
        exits[j], out[j] = i, z[j]
    halted |= exits >= 0
  return out, exits


def test_jitted_equals_step_by_step_reference(params, encoded):
  tau = 0.6
  for policy in (te.make_token_policy(tau, 3, 4),):
    run = te.token_pass(params, CFG15, policy, encoded, 4).run()
    spread = []
    for n in range(10):   # the reference is eager, layer by layer: a few sentences keep it quick
      out, exits = _reference_tokee(params, CFG15, policy, encoded.input_ids[n], encoded.token_type_ids[n],
                                    encoded.word_starts[n])
      W = len(exits)
      np.testing.assert_array_equal(run.word_exits[n, :W], exits, err_msg=f"sentence {n}")
      np.testing.assert_allclose(run.word_logits[n, :W], out, atol=3e-4)
      spread += exits.tolist()
    assert len(set(spread)) > 1, "thresholds too low or high to test halting"


@pytest.mark.parametrize("kw", [dict(), dict(copy_wordpiece="first", keep_norm_same=False, masked_window=True)])
def test_gathered_loop_equals_plain_loop_at_any_batch(params, encoded, kw):
  policy = te.make_token_policy(0.6, 3, 4, **kw)
  plain = te.token_pass(params, CFG15, policy, encoded, 8, gather=False).run()
  assert len(np.unique(plain.word_exits[encoded.word_mask])) > 1
  for batch in ((1, 8) if not kw else (8,)):
    run = te.token_pass(params, CFG15, policy, encoded, batch).run()
    np.testing.assert_array_equal(run.word_exits, plain.word_exits)
    np.testing.assert_allclose(run.word_logits, plain.word_logits, atol=3e-4)
    np.testing.assert_array_equal(run.queries, plain.queries)
  # Halting saves work: fewer active pieces than the full model's, and a FLOPs ratio above 1.
  assert te.flops_ratio(CFG15, plain.queries, plain.keys, encoded.lengths) > 1.0


def test_simulate_equals_the_device_decision_on_given_logits():
  rng = np.random.default_rng(2)
  logits = jnp.asarray(rng.normal(0, 3, (4, 6, 7, TAGS)), jnp.float32)
  valid = jnp.asarray(np.arange(7)[None] < rng.integers(1, 8, (6, 1)))
  policy = te.make_token_policy(0.5, 3, 4)
  exits = np.asarray(te.simulate(policy, te.word_uncertainty(logits), valid))
  halted = ~np.asarray(valid)
  for i in range(4):
    now = np.asarray(te.halt_step(policy, jnp.asarray(halted), logits[i], valid, i))
    assert (exits[now] == i).all()
    halted |= now
  assert halted.all()


@pytest.mark.parametrize("longer_slots,layout", [(0, "unstacked"), (40, "unstacked"), (40, "stacked")])
def test_open_engine_refills_slots_and_equals_the_closed_loop(params, encoded, longer_slots, layout):
  """TOKEE in the open engine (the server's path): sentences admitted into free slots while others run,
  each with its own thresholds, give the closed loop's word exits and logits for the same thresholds;
  also in slots longer than the sentences, run under a view of them (as the server does), and with the
  stacked weights sliced by the traced layer (the token server's layout)."""
  from rome_flax.engine import scheduler as engine
  policy = te.make_token_policy(0.6, 3, 4)
  closed_params = params
  if layout == "stacked":
    params = model_lib.stack_layers(params)
  plain = te.token_pass(closed_params, CFG15, policy, encoded, 8, gather=False).run()
  full = te.token_pass(closed_params, CFG15, te.make_token_policy(0.0, 3, 4), encoded, 8, gather=False).run()
  N = len(encoded)
  padded = data.pad_batch(encoded, np.arange(N), N)
  S = padded["input_ids"].shape[1]
  slots, batch = 4, 2
  lengths = engine.trim_lengths(S + longer_slots)
  view = engine.view_for(lengths, S) if longer_slots else None
  assert view is None or view < S + longer_slots
  state = engine.init(CFG15, slots, S + longer_slots, True)
  queue, free, held, admitted_while_running = list(range(N)), list(range(slots)), {}, 0
  exits, logits, queries = np.full((N, S), -9), np.zeros((N, S, TAGS), np.float32), np.zeros((N, 4), int)
  W = plain.word_exits.shape[1]
  for _ in range(200):   # bounded: each round finishes at least one sentence
    if not queue and not held:
      break
    take = queue[:len(free)]
    if take:
      admitted_while_running += bool(held)
      slot_A = np.array([free.pop(0) for _ in take], np.int32)
      tau = np.array([policy.threshold_L if n % 3 else np.zeros(4) for n in take], np.float32)   # every third: tau 0
      state = engine.admit(params, CFG15, state, slot_A, *(padded[k][take] for k in
                                                           ("input_ids", "attention_mask", "token_type_ids")),
                           -np.array(take, np.int32), tau, padded["word_mask"][take])
      held.update(zip(slot_A.tolist(), take))
      queue = queue[len(take):]
    state = engine.run(params, CFG15, policy, state, batch, lengths, slots - len(held) + 1, 10 ** 6, view=view)
    running = np.asarray(state.running_N)
    for slot, n in list(held.items()):
      if not running[slot]:
        word_exit, out = np.asarray(state.tokee.word_exit_NxW)[slot], np.asarray(state.out_NxC)[slot]
        assert (word_exit[S:] == -1).all() and not out[S:].any()
        exits[n], logits[n] = word_exit[:S], out[:S]
        queries[n] = np.asarray(state.tokee.queries_NxL)[slot]
        del held[slot]
        free.append(slot)
  assert not queue and not held and admitted_while_running > 0
  for n in range(N):
    want = full if n % 3 == 0 else plain
    np.testing.assert_array_equal(exits[n, :W], want.word_exits[n], err_msg=f"sentence {n}")
    assert (exits[n, W:] == -1).all()
    np.testing.assert_allclose(logits[n, :W], want.word_logits[n], atol=3e-4)
    np.testing.assert_array_equal(queries[n], want.queries[n])
  assert len(np.unique(plain.word_exits[plain.word_exits >= 0])) > 1
