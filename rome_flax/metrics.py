"""GLUE metrics (method.md): CoLA Matthews corr., accuracy, F1, STS-B Pearson / Spearman."""

from __future__ import annotations

import numpy as np
from scipy import stats
from sklearn import metrics as skm

from rome_flax import heads
from rome_flax.errors import RomeFlaxError
from rome_flax.tasks import TaskSpec


def primary_metric(task: TaskSpec) -> str:
  """The metric that ranks checkpoints and that tables report first."""
  return task.primary_metric


def compute_metrics(task: TaskSpec, predictions, labels) -> dict[str, float]:
  """The task's metrics (percentages as GLUE reports them; mse as is) of predictions against labels.

  `predictions` are class ids or scores, or logits ([N, C]), which are turned into predictions.
  """
  pred = np.asarray(predictions)
  if pred.ndim == 2:
    pred = heads.predictions(pred, task.is_regression)
  labels = np.asarray(labels)
  if pred.shape != labels.shape:
    raise RomeFlaxError(f"{len(pred)} predictions for {len(labels)} labels")
  if len(labels) == 0:
    raise RomeFlaxError("no examples to score")
  out = {}
  for name in task.metric_names:
    scale = 1.0 if name == "mse" else 100.0
    out[name] = scale * float(_METRICS[name](pred, labels))
  return out


def _corr(fn):
  def metric(pred, labels):
    if np.std(pred) == 0 or np.std(labels) == 0:
      return 0.0  # a constant prediction has no correlation (scipy would warn and give nan)
    return fn(pred, labels)[0]
  return metric


_METRICS = {
    "accuracy": lambda p, y: np.mean(p == y),
    "f1": lambda p, y: skm.f1_score(y, p, zero_division=0.0),
    "macro_f1": lambda p, y: skm.f1_score(y, p, average="macro", zero_division=0.0),
    "mcc": lambda p, y: skm.matthews_corrcoef(y, p),
    "pearson": _corr(stats.pearsonr),
    "spearman": _corr(stats.spearmanr),
    "mse": lambda p, y: np.mean((p - y) ** 2),
}


def per_exit_metrics(task: TaskSpec, logits_ExNxC, labels_N) -> list[dict]:
  """The task's metrics of every exit used alone: [{"exit": 1, <metric>: ...}, ..., {"exit": L, ...}]."""
  return [{"exit": e + 1, **compute_metrics(task, z_NxC, labels_N)} for e, z_NxC in enumerate(np.asarray(logits_ExNxC))]
