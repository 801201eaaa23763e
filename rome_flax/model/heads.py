"""Exit heads: what an exit computes from its layer's hidden states, chosen by the task's kind.

The seam between the encoder and the task. `encoder.py` runs an exit through `head_kind(cfg)`
without knowing what the head does; a head kind says
  - `module`: the Flax module of one exit, `(h_BxSxD, mask_BxS, deterministic) -> logits`,
  - `reads_first_token_only`: whether it reads token 0 alone (then the last layer may compute
    token 0 alone: ~80% of that layer skipped, same logits),
  - `flops`: the FLOPs of one exit on sequences of given real lengths (speed ratios count them).

Kinds: 'sequence' (one logit vector per sequence, pooled by 'cls' or 'mean'; a regression task is
this head with one output) and 'token' (one logit vector per token: sequence labelling; a word is
read at its first piece, method-seqlab.md section 1). A new kind is one `HeadKind` in `HEAD_KINDS`
and a `head` value in `ModelConfig`.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from rome_flax.errors import RomeFlaxError
from rome_flax.model import layers


def predictions(logits, is_regression: bool):
  """Class ids (argmax over the last axis) or regression values (`[..., 0]`), for NumPy or JAX
  arrays: the one logits-to-predictions rule of training metrics, sweeps, criteria and prediction."""
  return logits[..., 0] if is_regression else logits.argmax(-1)


class SequenceHead(nn.Module):
  """Pool layer i's output (token 0, or the masked mean), pooler Linear + tanh, dropout, classifier.

  Exit L is the model's own pooler + classifier; exits 1..L-1 start from copies of that pooler.
  """
  cfg: object   # ModelConfig

  @nn.compact
  def __call__(self, h_BxSxD, mask_BxS, deterministic: bool):
    cfg = self.cfg
    if cfg.exit_pooling == "cls":
      x_BxD = h_BxSxD[:, 0]
    else:
      m_BxSx1 = mask_BxS[..., None].astype(h_BxSxD.dtype)
      x_BxD = (h_BxSxD * m_BxSx1).sum(1) / jnp.maximum(m_BxSx1.sum(1), 1)
    pooler = layers.Linear(cfg.hidden_size, layers.compute_dtype(cfg), layers.kernel_init(cfg), name="pooler")
    x_BxD = layers.Dropout(cfg.exit_dropout)(jnp.tanh(pooler(x_BxD)), deterministic=deterministic)
    logits_BxC = layers.Linear(cfg.num_labels, jnp.float32, layers.kernel_init(cfg), name="classifier")(x_BxD)
    if cfg.maps_regression_output:   # standardised exit output -> the labels' units (config.py)
      logits_BxC = logits_BxC * cfg.regression_std + cfg.regression_mean
    return logits_BxC


class TokenHead(nn.Module):
  """Dropout + linear on every token: [B,S,D] -> [B,S,C] (the reference's `Pseudo_Classifier`, and
  transformers' BertForTokenClassification head, so a fine-tuned token classifier loads as exit L).
  Logits of non-first pieces and padding are computed and ignored: gathering the first pieces
  first would cost more than the S x D x C matmul it saves."""
  cfg: object   # ModelConfig

  @nn.compact
  def __call__(self, h_BxSxD, mask_BxS, deterministic: bool):
    x_BxSxD = layers.Dropout(self.cfg.exit_dropout)(h_BxSxD, deterministic=deterministic)
    return layers.Linear(self.cfg.num_labels, jnp.float32, layers.kernel_init(self.cfg), name="classifier")(x_BxSxD)


def _token_flops(cfg, lengths) -> np.ndarray:
  """The classifier on every piece of the sequence (what runs)."""
  return 2.0 * np.asarray(lengths, np.float64) * cfg.hidden_size * cfg.num_labels


def _sequence_flops(cfg, lengths) -> np.ndarray:
  """Pooler + classifier matmuls (x2 for multiply-adds); mean pooling adds a pass over the tokens."""
  s = np.asarray(lengths, np.float64)
  D = cfg.hidden_size
  pool = s * D if cfg.exit_pooling == "mean" else 0.0 * s
  return pool + 2.0 * (D * D + D * cfg.num_labels)


@dataclasses.dataclass(frozen=True)
class HeadKind:
  name: str
  module: type[nn.Module]
  reads_first_token_only: Callable[[object], bool]
  flops: Callable[[object, object], np.ndarray]
  # Hugging Face: the Auto class of an export-hf directory and its config's problem_type (model/export_hf.py)
  hf_auto_class: str
  hf_problem_type: Callable[[object], Optional[str]]
  # A checkpoint's classifier rows are a tag set (model/convert.py): a classifier of another size is an error,
  # not a new classifier, and its rows are reordered to the task's tags.
  classifier_rows_are_tags: bool


def _sequence_problem_type(cfg) -> str:
  return "regression" if cfg.is_regression else "single_label_classification"


HEAD_KINDS: dict[str, HeadKind] = {k.name: k for k in (
    HeadKind("sequence", SequenceHead, lambda cfg: cfg.exit_pooling == "cls", _sequence_flops,
             "AutoModelForSequenceClassification", _sequence_problem_type, classifier_rows_are_tags=False),
    HeadKind("token", TokenHead, lambda cfg: False, _token_flops,
             "AutoModelForTokenClassification", lambda cfg: None, classifier_rows_are_tags=True),
)}


def head_kind(cfg) -> HeadKind:
  if cfg.head not in HEAD_KINDS:
    raise RomeFlaxError(f"unknown exit head {cfg.head!r}; heads: {', '.join(HEAD_KINDS)}")
  return HEAD_KINDS[cfg.head]
