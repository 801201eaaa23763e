"""Training losses of RomeBERT and the baselines, as functions of the exits' logits (method.md).

Pure arithmetic: which method uses which terms in which stage is declared once, in `methods.py`.
`cfg` is a `methods.LossConfig` (gamma, temperature, kl_reduction, regression).

Every loss is a weighted batch mean: padding rows (weight 0) do not count, so a short last batch
padded to a fixed shape gives the same loss as the unpadded batch.
Each method returns two terms, `final` (the final exit's) and `highway` (the other exits'); the
loss is their sum, and RomeBERT's gradient projection acts on exactly these two groups.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp


class LossTerms(NamedTuple):
  final: jax.Array      # the final exit's term (0 when the method has none)
  highway: jax.Array    # the sum of the highway exits' terms (0 when the method has none)

  @property
  def total(self) -> jax.Array:
    return self.final + self.highway


def _wmean(values_B, weights_B):
  return jnp.sum(values_B * weights_B) / jnp.maximum(jnp.sum(weights_B), 1.0)


def nll(logits_BxC, labels_B):
  """Per-unit softmax cross-entropy."""
  logp_BxC = jax.nn.log_softmax(logits_BxC.astype(jnp.float32), axis=-1)
  return -jnp.take_along_axis(logp_BxC, labels_B.astype(jnp.int32)[:, None], axis=-1)[:, 0]


def cross_entropy(logits_BxC, labels_B, weights_B):
  """Weighted batch-mean softmax cross-entropy."""
  return _wmean(nll(logits_BxC, labels_B), weights_B)


def mse(pred_Bx1, target_B, weights_B, scale: float = 1.0):
  """Weighted batch-mean squared error of a regression exit ([B, 1]) against targets [B], in units of
  `scale` (the train labels' std when targets are standardised: the loss of z = (y - mean) / std)."""
  err_B = pred_Bx1[:, 0].astype(jnp.float32) - target_B.astype(jnp.float32)
  if scale != 1.0:   # static: unstandardised runs compile the graph they always did
    err_B = err_B / scale
  return _wmean(err_B ** 2, weights_B)


def distillation_kl(teacher_BxC, student_BxC, weights_B, temperature: float, reduction: str):
  """T^2 * KL(softmax(stop(teacher)/T) || softmax(student/T)), 'reference' (B*C) or 'batchmean' (B)."""
  t = temperature
  logp_BxC = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_BxC).astype(jnp.float32) / t, axis=-1)
  logq_BxC = jax.nn.log_softmax(student_BxC.astype(jnp.float32) / t, axis=-1)
  kl_B = jnp.sum(jnp.exp(logp_BxC) * (logp_BxC - logq_BxC), axis=-1)
  per_label = student_BxC.shape[-1] if reduction == "reference" else 1
  return t * t * _wmean(kl_B, weights_B) / per_label


def supervised(logits_BxC, labels_B, weights_B, cfg):
  """CE for classification, MSE for regression (one exit; in the labels' std units, `cfg.regression_scale`)."""
  if cfg.regression:
    return mse(logits_BxC, labels_B, weights_B, cfg.regression_scale)
  return cross_entropy(logits_BxC, labels_B, weights_B)


def distillation(teacher_BxC, student_BxC, weights_B, cfg):
  """Distillation of the final exit into a highway: KL for classification, MSE to the stopped final
  prediction for regression (the reference cannot do regression; method.md)."""
  if cfg.regression:
    return mse(student_BxC, jax.lax.stop_gradient(teacher_BxC)[:, 0], weights_B, cfg.regression_scale)
  return distillation_kl(teacher_BxC, student_BxC, weights_B, cfg.temperature, cfg.kl_reduction)


def romebert_terms(logits_ExBxC, labels_B, weights_B, cfg) -> LossTerms:
  """CE(z_L) + sum_{i<L} [(1-g) CE(z_i) + g T^2 KL(p || q_i)], teacher p = stop(z_L) (dropout on)."""
  z_final = logits_ExBxC[-1]
  highway = jnp.float32(0.0)
  for z in logits_ExBxC[:-1]:
    highway += ((1.0 - cfg.gamma) * supervised(z, labels_B, weights_B, cfg)
                + cfg.gamma * distillation(z_final, z, weights_B, cfg))
  return LossTerms(supervised(z_final, labels_B, weights_B, cfg), highway)


def final_terms(logits_ExBxC, labels_B, weights_B, cfg) -> LossTerms:
  """The final exit's supervised loss alone (final_only, DeeBERT stage 1): logits hold that exit."""
  return LossTerms(supervised(logits_ExBxC[-1], labels_B, weights_B, cfg), jnp.float32(0.0))


def highway_terms(logits_ExBxC, labels_B, weights_B, cfg) -> LossTerms:
  """The sum of the highways' supervised losses (DeeBERT stage 2): logits hold the highways alone."""
  return LossTerms(jnp.float32(0.0),
                   sum(supervised(z, labels_B, weights_B, cfg) for z in logits_ExBxC))


def joint_terms(logits_ExBxC, labels_B, weights_B, cfg) -> LossTerms:
  """Every exit's supervised loss, unweighted."""
  sup = lambda z: supervised(z, labels_B, weights_B, cfg)
  return LossTerms(sup(logits_ExBxC[-1]), sum((sup(z) for z in logits_ExBxC[:-1]), jnp.float32(0.0)))


def pabee_terms(logits_ExBxC, labels_B, weights_B, cfg) -> LossTerms:
  """PABEE's weighted average: exit i (1-based) weighs i, normalised by the sum of the weights."""
  sup = lambda z: supervised(z, labels_B, weights_B, cfg)
  num_exits = logits_ExBxC.shape[0]
  norm = num_exits * (num_exits + 1) / 2
  highway = sum(((i + 1) * sup(z) for i, z in enumerate(logits_ExBxC[:-1])), jnp.float32(0.0)) / norm
  return LossTerms(num_exits * sup(logits_ExBxC[-1]) / norm, highway)


def flooding_terms(logits_ExBxC, labels_B, weights_B, cfg, flood_bias_ExB=None) -> LossTerms:
  """Self-sampling fine-tuning's loss (method-seqlab.md section 4, steps 5 and 7.3): per unit (word)
  and exit, |CE(z_i) - b_i| with b the frozen stage-1 model's CE of that word at that exit (flooding:
  the gradient turns round once a word's loss falls below stage 1's), averaged over the words, and
  the exits weighted by layer number, sum_i i * loss_i / sum_i i. Every word is supervised at every
  exit, halted ones included, as the reference's code (not its paper) does."""
  if flood_bias_ExB is None:
    raise ValueError("flooding_terms needs the stage-1 losses (flood_bias)")
  num_exits = logits_ExBxC.shape[0]
  norm = num_exits * (num_exits + 1) / 2
  per_exit = [_wmean(jnp.abs(nll(z, labels_B) - flood_bias_ExB[i]), weights_B) for i, z in enumerate(logits_ExBxC)]
  highway = sum(((i + 1) * v for i, v in enumerate(per_exit[:-1])), jnp.float32(0.0)) / norm
  return LossTerms(num_exits * per_exit[-1] / norm, highway)
