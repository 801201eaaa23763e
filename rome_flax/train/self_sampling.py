"""Self-sampling fine-tuning, TOKEE's stage 2 (method-seqlab.md section 4): what a training batch gets.

Stage 1 (a finished token model, e.g. `joint_weighted`) is run once over the training set, dropout
off: every word's normalised entropy and cross-entropy at every exit stay fixed for the whole
stage (`stage_one_targets`). Each batch, every sentence draws a TOKEE window and threshold from the
configured lists (`methods.SelfSamplingOptions`); the sandwich rules force the smallest window or the largest
threshold on some sentences and no halting on others (drawn among the batch's real sentences; the
reference takes the first and last rows of its batch); the halting those settings would
give on the frozen stage-1 uncertainties (`token_exit.simulate`, the inference criterion, with the
doubled upper-half threshold capped at `ss_upper_cap`) decides which pieces are active at each layer
(`active_BxLxS`: a halted word's pieces keep their residual in `model.forward`), and the stage-1
losses are the flooding targets (`flood_bias_BxLxS`, `losses.flooding_terms`). Draws come from
(seed, step), so a resumed run draws the same.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp
import numpy as np

from rome_flax.engine import inference
from rome_flax.engine import token_exit as te
from rome_flax.errors import RomeFlaxError
from rome_flax.kinds import data
from rome_flax.kinds.kind import kind_of
from rome_flax.train import losses
from rome_flax.train.methods import SelfSamplingOptions


def validate(task, model) -> None:
  """The method's `validate` hook: self-sampling fine-tunes a finished stage-1 token model (its export)."""
  if not kind_of(task).token_level_exit:
    raise RomeFlaxError("self_sampling is token-level early exit's fine-tuning: it needs a token task (conll2003, "
                        "ner, pos)")
  if not model.export_info.method or not kind_of(model.config).token_level_exit:
    raise RomeFlaxError("self_sampling fine-tunes a finished stage-1 run: pass --model runs/<stage 1>/export (a "
                        "token task trained with e.g. --method joint_weighted)")


def prepare(run_piece, train: data.EncodedSplit, options: SelfSamplingOptions, model_cfg, seed: int,
            batch_size: int):
  """The method's `prepare` hook: stage 1's frozen view of the training set, once; then each batch gets
  its sampled halting and flooding targets (`batch_extras`), drawn from (seed, step)."""
  targets = stage_one_targets(run_piece, train, batch_size)
  return lambda batch, step: {**batch, **batch_extras(targets, batch, options, model_cfg.num_layers,
                                                      np.random.default_rng([seed, step]))}


@dataclasses.dataclass
class StageOneTargets:
  """The frozen stage-1 model's word-level view of the training set."""
  uncertainty_NxWxL: np.ndarray   # float32 normalised entropy of each word at each exit
  loss_NxWxL: np.ndarray          # float32 cross-entropy of each word's gold tag at each exit (0 past the words)


def stage_one_targets(run_piece, encoded: data.EncodedSplit, batch_size: int, progress=None) -> StageOneTargets:
  """Every exit's word logits for the training set (`run_piece(batch) -> [E,B,S,C]`, dropout off),
  reduced to uncertainties and losses (the logits themselves are not kept)."""
  if not kind_of(encoded).token_level_exit or encoded.labels is None:
    raise RomeFlaxError("self-sampling needs a labelled token-task training split")
  logits_ExNxWxC = inference.exit_logits_of(run_piece, encoded, batch_size, progress)
  C = logits_ExNxWxC.shape[-1]
  u = np.asarray(te.word_uncertainty(jnp.asarray(logits_ExNxWxC)))
  labels_U = np.broadcast_to(np.maximum(encoded.labels, 0)[None], logits_ExNxWxC.shape[:-1]).reshape(-1)
  ce = np.asarray(losses.nll(jnp.asarray(logits_ExNxWxC.reshape(-1, C)), jnp.asarray(labels_U)))
  ce = np.where(encoded.labels[None] >= 0, ce.reshape(u.shape), 0.0)
  return StageOneTargets(u.transpose(1, 2, 0).astype(np.float32), ce.transpose(1, 2, 0).astype(np.float32))


def sample_thresholds(rng: np.random.Generator, n: int, num_layers: int, cfg: SelfSamplingOptions,
                      eligible=None):
  """Per sentence a window and per-layer thresholds [n, L]: tau in the lower half, min(2 tau, cap)
  above; sandwich rules (method-seqlab.md section 4, step 2) on sentences drawn at random among
  `eligible` (default all; the batch's real rows), so neither a batch's length order nor its
  padding rows decide which sentences they fall on."""
  windows = rng.choice(np.asarray(cfg.ss_windows, np.int64), n)
  taus = rng.choice(np.asarray(cfg.ss_thresholds, np.float64), n)
  rows = rng.permutation(np.arange(n) if eligible is None else np.asarray(eligible))
  small = rows[:min(cfg.ss_sandwich_small, len(rows))]
  full = rows[len(small):][:min(cfg.ss_sandwich_full, len(rows) - len(small))]
  coin = rng.random(len(small)) < 0.5
  windows[small] = np.where(coin, min(cfg.ss_windows), windows[small])
  taus[small] = np.where(coin, taus[small], max(cfg.ss_thresholds))
  lower = np.arange(num_layers) < num_layers // 2
  thresholds = np.where(lower[None], taus[:, None], np.minimum(2 * taus[:, None], cfg.ss_upper_cap))
  thresholds[full] = -1.0   # never below: these sentences run every layer
  return windows, thresholds.astype(np.float32), small, full


def batch_extras(targets: StageOneTargets, batch: dict, cfg: SelfSamplingOptions, num_layers: int,
                 rng: np.random.Generator) -> dict:
  """{active_BxLxS, flood_bias_BxLxS} for one padded token batch (`data.pad_batch`): which pieces each
  layer updates (the model's mixed forward) and, per word and exit, stage 1's loss (the method's
  `unit_inputs`: the flooding terms read it as flood_bias_ExB)."""
  rows = batch["example_ids"]
  B, S = batch["input_ids"].shape
  L = num_layers
  real = rows >= 0
  W = S   # word slots: a sentence has at most as many words as pieces
  u_BxWxL = np.ones((B, W, L), np.float32)
  ce_BxWxL = np.zeros((B, W, L), np.float32)
  width = min(W, targets.uncertainty_NxWxL.shape[1])
  u_BxWxL[real, :width] = targets.uncertainty_NxWxL[rows[real], :width]
  ce_BxWxL[real, :width] = targets.loss_NxWxL[rows[real], :width]
  num_words = batch["word_mask"].sum(1)
  valid_BxW = (np.arange(W)[None] < num_words[:, None]) & real[:, None]
  windows, thresholds, _, _ = sample_thresholds(rng, B, L, cfg, eligible=np.nonzero(real)[0])
  exits_BxW = np.full((B, W), L - 1, np.int32)
  for w in np.unique(windows):
    policy = te.TokenPolicy(jnp.asarray(thresholds), int(w), L)
    exits = np.asarray(te.simulate(policy, jnp.asarray(u_BxWxL.transpose(2, 0, 1)), jnp.asarray(valid_BxW)))
    exits_BxW = np.where((windows == w)[:, None], exits, exits_BxW)
  word_of_BxS = np.asarray(te.piece_words(jnp.asarray(batch["word_mask"]), jnp.asarray(batch["attention_mask"])))
  piece_exit_BxS = np.where(word_of_BxS >= 0, np.take_along_axis(exits_BxW, np.maximum(word_of_BxS, 0), 1), L - 1)
  active_BxLxS = (piece_exit_BxS[:, None, :] >= np.arange(L)[None, :, None]).astype(np.int32)
  positions_BxW = np.asarray(te.word_positions(jnp.asarray(batch["word_mask"])))
  flood_BxLxS = np.zeros((B, L, S), np.float32)
  b_idx, w_idx = np.nonzero(valid_BxW)
  flood_BxLxS[b_idx, :, positions_BxW[b_idx, w_idx]] = ce_BxWxL[b_idx, w_idx]
  return {"active_BxLxS": active_BxLxS, "flood_bias_BxLxS": flood_BxLxS}
