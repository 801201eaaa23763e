"""Regression targets: what the exits of a regression task are trained to predict.

Every exit of a regression task starts near 0 (zero bias, a barely trained pooler), while STS-B's
labels average about 2.7. Trained on raw labels, the first updates of six MSE heads are spent on that
common offset, and Adam fits it through the shared encoder: the pooled states collapse to one point
and every exit predicts a constant (docs/results.md, "Regression targets"). The fix is to train each
exit on z = (y - mean) / std of the TRAIN labels. rome_flax folds the inverse map into the exits
(`ModelConfig.regression_mean` / `regression_std`, applied by the sequence head), so logits, metrics,
prediction files, patience deltas and the Python API all stay in the labels' units, and the loss
divides the error by std (`LossConfig.regression_scale`): the same loss as on z.

Modes (`--regression_targets`):
  standardize  the default: the map above.
  bias_init    raw-unit outputs and loss; each exit's bias starts at the train mean and its kernel is
               scaled by std (the same function at step 0, a different parameterisation under Adam).
  raw          the published recipe: raw labels, zero biases.
"""

from __future__ import annotations

import numpy as np

from rome_flax.errors import RomeFlaxError

MODES = ("standardize", "bias_init", "raw")


def label_stats(labels: np.ndarray) -> tuple[float, float]:
  """(mean, std) of the train labels; std of a constant column is refused (nothing to learn)."""
  y = np.asarray(labels, np.float64)
  if y.size == 0 or not np.isfinite(y).all():
    raise RomeFlaxError("regression labels must be finite numbers (the train split has none, or NaN/inf)")
  mean, std = float(y.mean()), float(y.std())
  if not std > 0:
    raise RomeFlaxError(f"every train label is {mean:g}: a regression task needs labels that vary")
  return mean, std


def prepare(model, train_labels: np.ndarray, mode: str):
  """The model a regression run trains, for `mode`. A model that already carries statistics (a
  rome_flax export trained further) keeps them: its exits already speak the labels' units."""
  if mode not in MODES:
    raise RomeFlaxError(f"regression_targets must be one of {', '.join(MODES)}, got {mode!r}")
  if not model.config.is_regression or mode == "raw" or model.config.maps_regression_output:
    return model
  mean, std = label_stats(train_labels)
  if mode == "standardize":
    model.config = model.config.replace(regression_mean=mean, regression_std=std)
  else:   # bias_init: every exit's classifier (kernel [L, 1, D] out x in, bias [L, 1]), in place
    cls = model.params["exits"]["classifier"]
    cls["kernel"] = cls["kernel"] * np.float32(std)
    cls["bias"] = cls["bias"] * np.float32(std) + np.float32(mean)
  return model
