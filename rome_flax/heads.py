"""Exit heads: what an exit computes from its layer's hidden states, chosen by the task's kind.

(Placeholder during the redesign: the full head seam lands here.)
"""

from __future__ import annotations


def predictions(logits, is_regression: bool):
  """Class ids (argmax over the last axis) or regression values (`[..., 0]`), for NumPy or JAX
  arrays: the one logits-to-predictions rule of training metrics, sweeps, criteria and prediction."""
  return logits[..., 0] if is_regression else logits.argmax(-1)
