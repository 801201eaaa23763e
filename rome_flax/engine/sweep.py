"""Offline threshold sweep: one all-exits pass, then any number of exit policies evaluated for free.

`inference.run_all_exits` caches every exit's logits [E,N,C]; `evaluate` applies each policy
with `exit_policy.decide` (the same step the runtime paths use) and reports, per setting, the task
metric, the average exit layer, the layer ratio L / average exit layer and the FLOPs ratio. Speed
figures are named as in docs/method.md: the layer ratio is ElasticBERT's "speed-up"; DeeBERT's
"expected saving" is 1 / layer ratio (the fraction of layers used).

FLOPs count multiply-adds x 2 on each example's real (unpadded) tokens: per layer the four dense
matmuls plus attention scores and context; per exit head its kind's count (pooler and classifier;
a token head's classifier on every piece). An early-exit
example taking exit e pays layers 1..e and heads 1..e (the heads that ran and were not taken
included); the full model pays L layers and one head.
"""

from __future__ import annotations

from typing import Optional, Sequence

import jax.numpy as jnp
import numpy as np

from rome_flax.engine import exit_policy as ep
from rome_flax.kinds import metrics
from rome_flax.kinds.tasks import TaskSpec
from rome_flax.model import heads
from rome_flax.model.config import ModelConfig


def layer_flops(cfg: ModelConfig, length) -> np.ndarray:
  """FLOPs of one encoder layer on sequences of the given real length(s)."""
  s = np.asarray(length, np.float64)
  D, F = cfg.hidden_size, cfg.intermediate_size
  dense = 2.0 * s * (D * 3 * D + D * D + 2 * D * F)
  attention = 4.0 * s * s * D
  return dense + attention


def head_flops(cfg: ModelConfig, length) -> np.ndarray:
  """FLOPs of one exit head: its kind's own count (heads.py)."""
  return heads.head_kind(cfg).flops(cfg, length)


def flops_ratio(cfg: ModelConfig, exit_index_N, lengths_N) -> float:
  """Full-model FLOPs / early-exit FLOPs over a set of examples (higher is faster)."""
  used_N = np.asarray(exit_index_N, np.float64) + 1
  layer_N, head_N = layer_flops(cfg, lengths_N), head_flops(cfg, lengths_N)
  full = np.sum(cfg.num_layers * layer_N + head_N)
  early = np.sum(used_N * (layer_N + head_N))
  return float(full / early)


def evaluate(policies: Sequence[ep.ExitPolicy], exit_logits_ExNxC, cfg: ModelConfig, lengths_N,
             labels_N: Optional[np.ndarray] = None, task: Optional[TaskSpec] = None,
             word_mask_NxW: Optional[np.ndarray] = None) -> list[dict]:
  """One row per policy: setting, the task's metrics (given labels and task), exit statistics and
  speed ratios. Token exits: word-level logits [E,N,W,C] and word_mask_NxW (SENTEE)."""
  logits = jnp.asarray(exit_logits_ExNxC, jnp.float32)
  L = cfg.num_layers
  rows = []
  seen: dict = {}   # the decisions of a setting -> the first setting that made them
  for policy in policies:
    pred_N, exit_N = decisions(policy, logits, cfg.is_regression, word_mask_NxW)
    first = seen.setdefault((pred_N.tobytes(), exit_N.tobytes()), policy.describe())
    highway_thresholds = np.asarray(policy.threshold_E)[:max(L - 1, 1)]   # the last exit always exits
    row = {"criterion": policy.criterion, "setting": policy.describe(),
           "thresholds": [float(f"{v:.6g}") for v in highway_thresholds],
           "min_exit_layer": policy.min_exit_layer}
    if labels_N is not None and task is not None:
      row.update(metrics.compute_metrics(task, pred_N, labels_N))
    row.update(exit_statistics(cfg, exit_N, lengths_N))
    if first != row["setting"]:
      row["same_as"] = first
      row["why_same"] = same_reason(exit_N, L)
    rows.append(row)
  return rows


def same_reason(exit_N, num_layers: int) -> str:
  """Why a setting decides as an earlier one did (issue 25: identical rows, and nothing said why)."""
  layers = np.unique(np.asarray(exit_N))
  if layers.size == 1:
    where = "the last layer" if layers[0] == num_layers - 1 else f"layer {int(layers[0]) + 1}"
    return f"every example exits at {where}"
  return "no example's exit changes between these thresholds"


def distinct(rows: Sequence[dict]) -> tuple[list[dict], list[str]]:
  """The rows a reader needs (one per distinct set of decisions) and a note per group of repeats."""
  kept = [r for r in rows if "same_as" not in r]
  groups: dict = {}
  for r in rows:
    if "same_as" in r:
      groups.setdefault((r["same_as"], r["why_same"]), []).append(r["setting"])
  notes = [f"{', '.join(names)}: the same decisions as {first} ({why})" for (first, why), names in groups.items()]
  return kept, notes


def static_exits(cfg: ModelConfig, per_exit: Sequence[dict], lengths_N) -> list[dict]:
  """The baseline an early-exit setting must beat at equal cost: the model cut to k layers (exit k
  alone, for every example; no other head runs), one row per k with its metrics (`per_exit`) and
  speed ratios, in the columns of `evaluate`'s rows (criterion 'static')."""
  L = cfg.num_layers
  layer_N, head_N = layer_flops(cfg, lengths_N), head_flops(cfg, lengths_N)
  full = np.sum(L * layer_N + head_N)
  rows = []
  for r in per_exit:
    k = int(r["exit"])
    rows.append({"criterion": "static", "setting": f"static@{k}", "thresholds": [], "min_exit_layer": k,
                 **{m: v for m, v in r.items() if m != "exit"},
                 "avg_exit_layer": float(k), "layer_ratio": L / k, "expected_saving": k / L,
                 "flops_ratio": float(full / np.sum(k * layer_N + head_N)),
                 "exit_shares": [1.0 if e == k - 1 else 0.0 for e in range(L)]})
  return rows


def exit_statistics(cfg: ModelConfig, exit_index_N, lengths_N) -> dict:
  """Average exit layer, layer ratio, expected saving, FLOPs ratio and share of each exit of a set
  of 0-based exit decisions (offline or measured)."""
  exit_N = np.asarray(exit_index_N)
  L = cfg.num_layers
  avg = float((exit_N + 1).mean())
  return {"avg_exit_layer": avg, "layer_ratio": L / avg, "expected_saving": avg / L,
          "flops_ratio": flops_ratio(cfg, exit_N, lengths_N),
          "exit_shares": (np.bincount(exit_N, minlength=L) / len(exit_N)).round(4).tolist()}


def decisions(policy: ep.ExitPolicy, exit_logits_ExNxC, is_regression: bool, word_mask_NxW=None):
  """(predictions, 0-based exit index) per example under one policy (token exits: predictions [N, W])."""
  d = ep.decide(policy, jnp.asarray(exit_logits_ExNxC, jnp.float32),
                None if word_mask_NxW is None else jnp.asarray(word_mask_NxW))
  return heads.predictions(np.asarray(d.logits_NxC), is_regression), np.asarray(d.exit_index_N)


def best_at(settings: Sequence[dict], metric: str, ratio: float, speed: str = "layer_ratio"):
  """The most accurate setting whose speed ratio reaches `ratio` (None when none does)."""
  ok = [r for r in settings if metric in r and r[speed] >= ratio]
  return max(ok, key=lambda r: (r[metric], r[speed])) if ok else None


def best_tradeoff(settings: Sequence[dict], metric: str, reference: float, tolerance: float = 1.0):
  """The setting with the highest layer ratio whose metric is within `tolerance` of the reference."""
  ok = [r for r in settings if metric in r and r[metric] >= reference - tolerance]
  return max(ok, key=lambda r: r["layer_ratio"]) if ok else None
