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


def trained_exits(model) -> list[int]:
  """The exits whose regression heads already speak the labels' units: every exit of a rome_flax export
  (trained before the statistics existed), or the last of a Hugging Face checkpoint with its own classifier."""
  info, report = getattr(model, "export_info", None), getattr(model, "load_report", None)
  if report is None and info is not None and info.method:
    return list(range(model.config.num_exits))
  if report is not None and report.classifier_from_checkpoint:
    return [model.config.num_exits - 1]
  return []


def prepare(model, train_labels: np.ndarray, mode: str):
  """The model a regression run trains, for `mode`. A model that already carries statistics (a rome_flax
  export trained further) keeps them: its exits already speak the labels' units. A head trained without
  them (`trained_exits`) keeps its function: standardising folds the inverse map into it, bias_init leaves it."""
  if mode not in MODES:
    raise RomeFlaxError(f"regression_targets must be one of {', '.join(MODES)}, got {mode!r}")
  if not model.config.is_regression or mode == "raw" or model.config.maps_regression_output:
    return model
  mean, std = label_stats(train_labels)
  cls = model.params["exits"]["classifier"]   # kernel [L, 1, D] (out x in), bias [L, 1]
  kernel, bias = np.array(cls["kernel"], np.float32), np.array(cls["bias"], np.float32)
  trained = trained_exits(model)
  if mode == "standardize":
    model.config = model.config.replace(regression_mean=mean, regression_std=std)
    kernel[trained] /= np.float32(std)
    bias[trained] = (bias[trained] - np.float32(mean)) / np.float32(std)
  else:   # bias_init: the fresh exits start at the train mean with the scale folded into their kernels
    fresh = [i for i in range(model.config.num_exits) if i not in trained]
    kernel[fresh] *= np.float32(std)
    bias[fresh] = bias[fresh] * np.float32(std) + np.float32(mean)
  cls["kernel"], cls["bias"] = kernel, bias
  return model
