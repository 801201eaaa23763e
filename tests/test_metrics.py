"""GLUE metrics against scikit-learn / SciPy."""

import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as skm

from rome_flax.errors import RomeFlaxError
from rome_flax.kinds import metrics, tasks


def test_classification_metrics():
  rng = np.random.default_rng(0)
  y, p = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
  m = metrics.compute_metrics(tasks.get_task("mrpc"), p, y)
  assert m["accuracy"] == pytest.approx(100 * np.mean(p == y))
  assert m["f1"] == pytest.approx(100 * skm.f1_score(y, p))
  assert metrics.compute_metrics(tasks.get_task("cola"), p, y)["mcc"] == pytest.approx(100 * skm.matthews_corrcoef(y, p))
  assert metrics.primary_metric(tasks.get_task("cola")) == "mcc"


def test_logits_and_regression():
  logits = np.array([[0.1, 0.9], [2.0, -1.0], [0.0, 1.0]])
  assert metrics.compute_metrics(tasks.get_task("sst-2"), logits, np.array([1, 0, 0]))["accuracy"] == pytest.approx(200 / 3)
  rng = np.random.default_rng(1)
  y = rng.uniform(0, 5, 50)
  p = y + rng.normal(size=50)
  m = metrics.compute_metrics(tasks.get_task("sts-b"), p[:, None], y)
  assert m["pearson"] == pytest.approx(100 * stats.pearsonr(p, y)[0])
  assert m["spearman"] == pytest.approx(100 * stats.spearmanr(p, y)[0])
  assert metrics.compute_metrics(tasks.get_task("sts-b"), np.full(50, 2.0), y)["pearson"] == 0.0


def test_per_exit_and_errors():
  logits = np.zeros((3, 4, 2))
  logits[2, :, 1] = 1
  per_exit = metrics.per_exit_metrics(tasks.get_task("sst-2"), logits, np.array([1, 1, 0, 1]))
  assert per_exit == [{"exit": 1, "accuracy": 25.0}, {"exit": 2, "accuracy": 25.0}, {"exit": 3, "accuracy": 75.0}]
  regression = metrics.per_exit_metrics(tasks.get_task("sts-b"), np.arange(8.0).reshape(2, 4, 1), np.arange(4.0))
  assert [m["exit"] for m in regression] == [1, 2] and regression[0]["pearson"] == pytest.approx(100.0)
  with pytest.raises(RomeFlaxError):
    metrics.compute_metrics(tasks.get_task("sst-2"), np.zeros(3), np.zeros(4))
