"""Offline threshold sweep: one all-exits pass, then any number of exit policies evaluated for free.

`run_all_exits` (early_exit.py) caches every exit's logits [E,N,C]; `evaluate` applies each policy
with `exit_policy.decide` (the same step the runtime paths use) and reports, per setting, the task
metric, the average exit layer, the layer ratio L / average exit layer and the FLOPs ratio. Speed
figures are named as in docs/method.md: the layer ratio is ElasticBERT's "speed-up"; DeeBERT's
"expected saving" is 1 / layer ratio (the fraction of layers used).

FLOPs count multiply-adds x 2 on each example's real (unpadded) tokens: per layer the four dense
matmuls plus attention scores and context; per exit head the pooler and classifier. An early-exit
example taking exit e pays layers 1..e and heads 1..e (the heads that ran and were not taken
included); the full model pays L layers and one head.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax.numpy as jnp
import numpy as np

from rome_flax import exit_policy as ep
from rome_flax.config import ModelConfig

MetricFn = Callable[[np.ndarray, np.ndarray], dict]


def layer_flops(cfg: ModelConfig, length) -> np.ndarray:
  """FLOPs of one encoder layer on sequences of the given real length(s)."""
  s = np.asarray(length, np.float64)
  D, F = cfg.hidden_size, cfg.intermediate_size
  dense = 2.0 * s * (D * 3 * D + D * D + 2 * D * F)
  attention = 4.0 * s * s * D
  return dense + attention


def head_flops(cfg: ModelConfig, length) -> np.ndarray:
  """FLOPs of one exit head (pooler + classifier; mean pooling adds a pass over the tokens)."""
  s = np.asarray(length, np.float64)
  D = cfg.hidden_size
  pool = s * D if cfg.exit_pooling == "mean" else 0.0 * s
  return pool + 2.0 * (D * D + D * cfg.num_labels)


def flops_ratio(cfg: ModelConfig, exit_index_N, lengths_N) -> float:
  """Full-model FLOPs / early-exit FLOPs over a set of examples (higher is faster)."""
  used_N = np.asarray(exit_index_N, np.float64) + 1
  layer_N, head_N = layer_flops(cfg, lengths_N), head_flops(cfg, lengths_N)
  full = np.sum(cfg.num_layers * layer_N + head_N)
  early = np.sum(used_N * (layer_N + head_N))
  return float(full / early)


def predictions(logits_NxC, is_regression: bool) -> np.ndarray:
  logits_NxC = np.asarray(logits_NxC)
  return logits_NxC[..., 0] if is_regression else logits_NxC.argmax(-1)


def per_exit_metrics(exit_logits_ExNxC, labels_N, metric_fn: MetricFn, is_regression: bool) -> list[dict]:
  """The task metrics of every exit used alone (exit 1..L)."""
  return [{"exit": e + 1, **_floats(metric_fn(predictions(z, is_regression), labels_N))}
          for e, z in enumerate(np.asarray(exit_logits_ExNxC))]


def _floats(d: dict) -> dict:
  return {k: float(v) for k, v in d.items()}


def evaluate(policies: Sequence[ep.ExitPolicy], exit_logits_ExNxC, cfg: ModelConfig, lengths_N,
             labels_N: Optional[np.ndarray] = None, metric_fn: Optional[MetricFn] = None) -> list[dict]:
  """One row per policy: setting, metrics (if labelled), exit statistics and speed ratios."""
  logits = jnp.asarray(exit_logits_ExNxC, jnp.float32)
  L = cfg.num_layers
  rows = []
  for policy in policies:
    decision = ep.decide(policy, logits)
    exit_N = np.asarray(decision.exit_index_N)
    used_N = exit_N + 1
    highway_thresholds = np.asarray(policy.threshold_E)[:max(L - 1, 1)]   # the last exit always exits
    row = {"criterion": policy.criterion, "setting": policy.describe(),
           "thresholds": [float(f"{v:.6g}") for v in highway_thresholds],
           "min_exit_layer": policy.min_exit_layer}
    if labels_N is not None and metric_fn is not None:
      row.update(_floats(metric_fn(predictions(decision.logits_NxC, cfg.is_regression), labels_N)))
    avg = float(used_N.mean())
    row.update({"avg_exit_layer": avg, "layer_ratio": L / avg, "expected_saving": avg / L,
                "flops_ratio": flops_ratio(cfg, exit_N, lengths_N),
                "exit_shares": (np.bincount(exit_N, minlength=L) / len(exit_N)).round(4).tolist()})
    rows.append(row)
  return rows


def decisions(policy: ep.ExitPolicy, exit_logits_ExNxC, is_regression: bool):
  """(predictions, 0-based exit index) per example under one policy."""
  d = ep.decide(policy, jnp.asarray(exit_logits_ExNxC, jnp.float32))
  return predictions(d.logits_NxC, is_regression), np.asarray(d.exit_index_N)
