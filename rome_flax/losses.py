"""Training losses of RomeBERT and the baselines, as functions of the exits' logits (method.md).

Every loss is a weighted batch mean: padding rows (weight 0) do not count, so a short last batch
padded to a fixed shape gives the same loss as the unpadded batch.
Each method returns two terms, `final` (the final exit's) and `highway` (the other exits'); the
loss is their sum, and RomeBERT's gradient projection acts on exactly these two groups.
"""

from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from rome_flax.errors import RomeFlaxError

METHODS = ("romebert", "deebert", "pabee", "joint", "final_only")
GR_MODES = ("projection", "penalty", "none")
KL_REDUCTIONS = ("reference", "batchmean")
PROTECT = ("auto", "final", "highways")


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """What a train step optimises (hashable: the step closes over it).

  kl_reduction: 'reference' divides the KL by batch x labels, as the published code's PyTorch
  KLDivLoss('mean') does; it is the default because the published gamma / T were tuned with it.
  'batchmean' divides by the batch only (the textbook KL, C times larger).
  protect: which gradient group GR keeps intact; 'auto' = method.md's rule (final exit for MNLI and
  QQP, the highways for every other task).
  """
  method: str = "romebert"
  gamma: float = 0.9
  temperature: float = 3.0
  kl_reduction: str = "reference"
  gr: str = "projection"
  gr_lambda: float = 0.01
  protect: str = "auto"
  regression: bool = False

  def __post_init__(self):
    for field, allowed in (("method", METHODS), ("gr", GR_MODES), ("kl_reduction", KL_REDUCTIONS),
                           ("protect", PROTECT)):
      if getattr(self, field) not in allowed:
        raise RomeFlaxError(f"{field} must be one of {', '.join(allowed)}, got {getattr(self, field)!r}")
    if not 0.0 <= self.gamma <= 1.0:
      raise RomeFlaxError(f"gamma must be in [0, 1], got {self.gamma}")
    if self.temperature <= 0:
      raise RomeFlaxError(f"temperature must be positive, got {self.temperature}")

  @property
  def uses_gr(self) -> bool:
    return self.method == "romebert" and self.gr != "none"


class LossTerms(NamedTuple):
  final: jax.Array      # the final exit's term (0 when the method has none)
  highway: jax.Array    # the sum of the highway exits' terms (0 when the method has none)

  @property
  def total(self) -> jax.Array:
    return self.final + self.highway


def _wmean(values_B, weights_B):
  return jnp.sum(values_B * weights_B) / jnp.maximum(jnp.sum(weights_B), 1.0)


def cross_entropy(logits_BxC, labels_B, weights_B):
  """Weighted batch-mean softmax cross-entropy."""
  logp_BxC = jax.nn.log_softmax(logits_BxC.astype(jnp.float32), axis=-1)
  nll_B = -jnp.take_along_axis(logp_BxC, labels_B.astype(jnp.int32)[:, None], axis=-1)[:, 0]
  return _wmean(nll_B, weights_B)


def mse(pred_Bx1, target_B, weights_B):
  """Weighted batch-mean squared error of a regression exit ([B, 1]) against targets [B]."""
  return _wmean((pred_Bx1[:, 0].astype(jnp.float32) - target_B.astype(jnp.float32)) ** 2, weights_B)


def distillation_kl(teacher_BxC, student_BxC, weights_B, temperature: float, reduction: str):
  """T^2 * KL(softmax(stop(teacher)/T) || softmax(student/T)), 'reference' (B*C) or 'batchmean' (B)."""
  t = temperature
  logp_BxC = jax.nn.log_softmax(jax.lax.stop_gradient(teacher_BxC).astype(jnp.float32) / t, axis=-1)
  logq_BxC = jax.nn.log_softmax(student_BxC.astype(jnp.float32) / t, axis=-1)
  kl_B = jnp.sum(jnp.exp(logp_BxC) * (logp_BxC - logq_BxC), axis=-1)
  per_label = student_BxC.shape[-1] if reduction == "reference" else 1
  return t * t * _wmean(kl_B, weights_B) / per_label


def supervised(logits_BxC, labels_B, weights_B, regression: bool):
  """CE for classification, MSE for regression (one exit)."""
  return mse(logits_BxC, labels_B, weights_B) if regression else cross_entropy(logits_BxC, labels_B, weights_B)


def distillation(teacher_BxC, student_BxC, weights_B, cfg: LossConfig):
  """Distillation of the final exit into a highway: KL for classification, MSE to the stopped final
  prediction for regression (the reference cannot do regression; method.md)."""
  if cfg.regression:
    return mse(student_BxC, jax.lax.stop_gradient(teacher_BxC)[:, 0], weights_B)
  return distillation_kl(teacher_BxC, student_BxC, weights_B, cfg.temperature, cfg.kl_reduction)


def romebert_terms(logits_ExBxC, labels_B, weights_B, cfg: LossConfig) -> LossTerms:
  """CE(z_L) + sum_{i<L} [(1-g) CE(z_i) + g T^2 KL(p || q_i)], teacher p = stop(z_L) (dropout on)."""
  z_final = logits_ExBxC[-1]
  highway = jnp.float32(0.0)
  for z in logits_ExBxC[:-1]:
    highway += ((1.0 - cfg.gamma) * supervised(z, labels_B, weights_B, cfg.regression)
                + cfg.gamma * distillation(z_final, z, weights_B, cfg))
  return LossTerms(supervised(z_final, labels_B, weights_B, cfg.regression), highway)


def loss_terms(logits_ExBxC, labels_B, weights_B, cfg: LossConfig, stage: int = 1) -> LossTerms:
  """The method's loss on the exits that the step computed.

  `logits_ExBxC` holds every exit, except: final_only and deebert stage 1 pass the final exit
  alone ([1, B, C]); deebert stage 2 passes the highways alone ([L-1, B, C]).
  """
  sup = lambda z: supervised(z, labels_B, weights_B, cfg.regression)
  zero = jnp.float32(0.0)
  if cfg.method == "romebert":
    return romebert_terms(logits_ExBxC, labels_B, weights_B, cfg)
  if cfg.method == "final_only" or (cfg.method == "deebert" and stage == 1):
    return LossTerms(sup(logits_ExBxC[-1]), zero)
  if cfg.method == "deebert":
    return LossTerms(zero, sum(sup(z) for z in logits_ExBxC))
  if cfg.method == "joint":
    return LossTerms(sup(logits_ExBxC[-1]), sum((sup(z) for z in logits_ExBxC[:-1]), zero))
  # pabee: weighted average, exit i (1-based) weighs i.
  num_exits = logits_ExBxC.shape[0]
  norm = num_exits * (num_exits + 1) / 2
  highway = sum(((i + 1) * sup(z) for i, z in enumerate(logits_ExBxC[:-1])), zero) / norm
  return LossTerms(num_exits * sup(logits_ExBxC[-1]) / norm, highway)


def protect_final(cfg: LossConfig, task_protects_final: bool) -> bool:
  """True when GR keeps the final exit's gradient intact and projects the highways' (group A = final)."""
  return task_protects_final if cfg.protect == "auto" else cfg.protect == "final"
