"""Offline sweep figures and the report writers (through files.py's one atomic writer)."""

import csv
import json
import os

import numpy as np
import pytest

from rome_flax.errors import RomeFlaxError

from rome_flax import report
from rome_flax.engine import exit_policy as ep
from rome_flax.engine import sweep
from rome_flax.io import files
from rome_flax.kinds import metrics, tasks
from rome_flax.model.config import ModelConfig

CFG = ModelConfig(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=64, num_labels=2)
CONF0, CONF1, UNSURE = [6.0, 0.0], [0.0, 6.0], [0.1, 0.0]
TASK = tasks.get_task("sst-2")   # accuracy only


@pytest.fixture
def cached():
  # 4 examples: exit 1 confident (right), exit 2 confident (wrong), never confident (final right), exit 1 wrong
  z = np.array([[CONF0, UNSURE, UNSURE, CONF1],
                [CONF0, CONF1, UNSURE, UNSURE],
                [CONF0, UNSURE, CONF1, UNSURE]], np.float32)
  labels = np.array([0, 0, 1, 0])
  return z, labels


def test_evaluate_rows(cached):
  z, labels = cached
  policies = [ep.make_policy("entropy", 0.1, 3, num_labels=2), ep.make_policy("entropy", 0.0, 3, num_labels=2)]
  rows = sweep.evaluate(policies, z, CFG, np.full(4, 10), labels, TASK)
  fast, full = rows
  assert fast["setting"] == "entropy<0.1"
  assert fast["avg_exit_layer"] == pytest.approx((1 + 2 + 3 + 1) / 4)
  assert fast["layer_ratio"] == pytest.approx(3 / 1.75)
  assert fast["accuracy"] == pytest.approx(50.0)   # examples 0 and 2 right
  assert fast["exit_shares"] == [0.5, 0.25, 0.25]
  assert full["avg_exit_layer"] == 3 and full["layer_ratio"] == 1
  assert full["accuracy"] == pytest.approx(100.0)  # the final exit gets all four right
  # the full setting runs every highway head too, so it costs a little more than the full model
  assert full["flops_ratio"] < 1 < fast["flops_ratio"] < fast["layer_ratio"]
  per_exit = metrics.per_exit_metrics(TASK, z, labels)
  assert [r["exit"] for r in per_exit] == [1, 2, 3]
  assert per_exit[0]["accuracy"] == pytest.approx(50.0)
  assert sweep.best_tradeoff(rows, "accuracy", per_exit[-1]["accuracy"]) is full
  assert sweep.best_tradeoff(rows, "accuracy", 50.0) is fast


def test_flops_ratio_counts_heads_that_ran():
  lengths = np.array([20, 20])
  layer, head = sweep.layer_flops(CFG, 20), sweep.head_flops(CFG, 20)
  want = (2 * (3 * layer + head)) / ((1 + 3) * (layer + head))
  assert sweep.flops_ratio(CFG, np.array([0, 2]), lengths) == pytest.approx(want)
  assert sweep.flops_ratio(CFG, np.array([2, 2]), lengths) < 1.0


def test_unlabelled_rows_have_no_metric(cached):
  z, _ = cached
  rows = sweep.evaluate([ep.make_policy("maxprob", 0.9, 3, num_labels=2)], z, CFG, np.full(4, 5))
  assert "accuracy" not in rows[0] and rows[0]["layer_ratio"] > 1


def test_report_files(tmp_path, cached):
  z, labels = cached
  rows = sweep.evaluate([ep.make_policy("entropy", t, 3, num_labels=2) for t in (0.0, 0.1)] +
                        [ep.make_policy("patience", 1, 3, num_labels=2)], z, CFG, np.full(4, 10), labels, TASK)
  paths = report.write_table(tmp_path, "sweep", rows)
  assert [p.name for p in paths] == ["sweep.json", "sweep.csv", "sweep.md"]
  assert json.loads((tmp_path / "sweep.json").read_text())[1]["setting"] == "entropy<0.1"
  with open(tmp_path / "sweep.csv") as f:
    table = list(csv.DictReader(f))
  assert len(table) == 3 and float(table[0]["layer_ratio"]) == 1.0
  md = (tmp_path / "sweep.md").read_text().splitlines()
  assert md[0].startswith("| criterion | setting") and len(md) == 5
  png = report.plot_tradeoff(tmp_path / "tradeoff.png", rows, "accuracy", final_metric=50.0)
  assert png.read_bytes()[:4] == b"\x89PNG"
  per_exit = metrics.per_exit_metrics(TASK, z, labels)
  assert report.plot_per_exit(tmp_path / "per_exit.png", per_exit, "accuracy").stat().st_size > 1000
  assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_atomic_write_keeps_old_file_on_failure(tmp_path, monkeypatch):
  target = tmp_path / "result.json"
  files.write_json(target, {"v": 1})

  def boom(*a, **k):
    raise OSError("disk full")
  monkeypatch.setattr(os, "replace", boom)
  with pytest.raises(RomeFlaxError, match="disk full"):   # one error line, the old file intact
    files.write_json(target, {"v": 2})
  assert json.loads(target.read_text()) == {"v": 1}
  assert os.listdir(tmp_path) == ["result.json"]


def test_submission_tsv():
  text = "".join(report.submission_tsv(np.array([0, 1, 2]), np.array([1, 0, 1]), ("negative", "positive")))
  assert text.splitlines() == ["index\tprediction", "0\tpositive", "1\tnegative", "2\tpositive"]
  assert "".join(report.submission_tsv([7], np.array([2.5]), ())).splitlines()[1] == "7\t2.5"


def test_prediction_files_and_names():
  text = "".join(report.predictions_tsv([4, 5], np.array([1, 0]), np.array([0, 2]), ("negative", "positive")))
  assert text.splitlines() == ["index\tprediction\texit_layer", "4\tpositive\t1", "5\tnegative\t3"]
  assert report.safe_name("entropy<0.1") == "entropy_lt_0.1"
  assert report.submission_file("mnli", "test_mismatched") == "MNLI-mm.tsv"
  assert report.submission_file("sst-2", "test") == "SST-2.tsv" and report.submission_file("x", "test") == "x.tsv"


def test_settings_with_the_same_decisions_are_shown_once_with_the_reason(cached):
  z, labels = cached
  policies = [ep.make_policy("entropy", t, 3, num_labels=2) for t in (0.0, 0.001, 0.1, 0.2, 0.99, 1.0)]
  rows = sweep.evaluate(policies, z, CFG, np.full(4, 10), labels, TASK)
  assert "same_as" not in rows[0] and rows[1]["same_as"] == "entropy<0"   # nothing is confident below 0.001
  assert rows[1]["why_same"] == "every example exits at the last layer"
  assert rows[3]["same_as"] == "entropy<0.1" and rows[3]["why_same"] == "no example's exit changes between these thresholds"
  assert rows[5]["same_as"] == "entropy<0.99" and rows[5]["why_same"] == "every example exits at layer 1"
  kept, notes = sweep.distinct(rows)
  assert [r["setting"] for r in kept] == ["entropy<0", "entropy<0.1", "entropy<0.99"]
  assert notes == ["entropy<0.001: the same decisions as entropy<0 (every example exits at the last layer)",
                   "entropy<0.2: the same decisions as entropy<0.1 (no example's exit changes between these thresholds)",
                   "entropy<1: the same decisions as entropy<0.99 (every example exits at layer 1)"]


def test_data_grid_spans_from_little_to_nearly_all_early_exit():
  """The default sweep adds thresholds read off the first exit's scores, so it reaches high layer ratios on any
  task's uncertainty scale (issue 25: 17-tag POS topped out at 1.04x with the fixed tau list)."""
  from rome_flax.engine import evaluation
  rng = np.random.default_rng(0)
  E, N, C = 3, 400, 17
  logits = rng.normal(size=(E, N, C)).astype(np.float32) * 0.3   # every exit unsure: entropy near log(17)
  grid = ep.grid_from_scores("entropy", logits[0])
  assert grid == sorted(grid) and len(grid) >= 10 and grid[-1] > 2.0   # on this task's scale, not 0..0.7
  policies = [ep.make_policy("entropy", t, E, num_labels=C) for t in ep.default_thresholds("entropy", E)]
  grown = evaluation.with_data_grid(policies, logits)
  values = [float(np.asarray(p.threshold_E)[0]) for p in grown]
  assert values == sorted(values) and len(set(values)) == len(values) and len(grown) > len(policies)
  rows = sweep.evaluate(grown, logits, CFG.replace(num_labels=C), np.full(N, 10))
  ratios = [r["layer_ratio"] for r in rows]
  assert min(ratios) == pytest.approx(1.0) and max(ratios) > 2.5
  best = sweep.best_at([dict(r, accuracy=-r["layer_ratio"]) for r in rows], "accuracy", 2.0)
  assert best["layer_ratio"] >= 2.0 and best["layer_ratio"] == min(r["layer_ratio"] for r in rows
                                                                    if r["layer_ratio"] >= 2.0)
  maxprob = ep.grid_from_scores("maxprob", logits[0])
  assert all(0.0 <= v <= 1.0 for v in maxprob)
