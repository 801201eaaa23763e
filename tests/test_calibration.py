"""Calibrated thresholds (rome_flax.engine.calibration): the conformal and Learn-then-Test maths on synthetic
scores (their guarantees hold empirically over many random splits, the uncorrected choice breaks them),
the replay of criteria on cached logits, and `python -m rome_flax calibrate` -> thresholds.json ->
`infer.py --thresholds_file` end to end on a tiny random export."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from rome_flax import infer_cli
from rome_flax.__main__ import main as rome_main
from rome_flax.engine import calibration as cal
from rome_flax.engine import sweep, token_exit
from rome_flax.errors import RomeFlaxError
from rome_flax.kinds import synthetic, tasks
from rome_flax.model import encoder as model_lib
from rome_flax.model.config import ModelConfig
from rome_flax.model.pretrained import ExportInfo, MultiExitBert

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------- the maths


def test_conformal_index_and_what_n_can_certify():
  assert cal.conformal_k(99, 0.05) == 5            # ceil(100 * 0.95) = 95 = n + 1 - 5
  assert cal.conformal_k(872, 0.001) == 0          # 873 * 0.001 < 1: nothing certifiable
  assert cal.conformal_k(999, 0.001) == 1
  # scores: first failing index per example (J = 4 settings: never fails -> 4)
  agree = np.ones((4, 9), bool)
  for i, s in enumerate([1, 2, 2, 3, 3, 3, 4, 4, 4]):
    agree[s:, i] = False
  np.testing.assert_array_equal(cal.first_failure(~agree), [1, 2, 2, 3, 3, 3, 4, 4, 4])
  # n = 9: epsilon 0.2 -> k = 2: the 2nd smallest score is 2 -> index 1 (every example agrees below its score)
  assert cal.conformal_choice(agree, 0.2) == 1
  assert cal.conformal_choice(agree, 0.45) == 2    # k = 4 -> score 3 -> index 2
  assert cal.conformal_choice(agree, 0.05) is None   # 10 * 0.05 < 1
  assert cal.naive_consistency(agree, 0.2) == 1
  with pytest.raises(ValueError):
    cal.conformal_choice(~agree, 0.2)               # index 0 must be no early exit


def test_fixed_sequence_stops_at_the_first_non_rejection():
  assert cal.fixed_sequence([1.0, 0.01, 0.2, 0.01], 0.05) == 1
  assert cal.fixed_sequence([1.0, 0.3, 0.01], 0.05) == 0
  assert cal.fixed_sequence([1.0, 0.01, 0.02, 0.03], 0.05) == 3
  p = cal.hoeffding_p(np.array([0.0, 0.05, 0.2]), 100, 0.1)
  np.testing.assert_allclose(p[:2], np.exp(-2 * 100 * np.square(0.1 - np.array([0.0, 0.05]))))
  assert p[2] == 1.0
  # the exact binomial p-value is smaller than Hoeffding's at a small empirical loss
  assert cal.binomial_p(2, 100, 0.1) < cal.hoeffding_p(0.02, 100, 0.1)
  assert cal.min_risk_epsilon(872, 0.01) == pytest.approx(np.exp(-2 * 872 * 1e-4))
  assert cal.speed_choice([90, 89, 88, 80], [1.0, 1.5, 2.0, 3.0], 1.8) == 2
  assert cal.speed_choice([90, 89], [1.0, 1.5], 2.0) is None


def _population(rng, N=3000, J=40):
  """Per example and setting (index 0 = no early exit): wrong when a latent difficulty is below a
  rising rate, plus non-monotone noise (an example may be wrong at j and right at j+1)."""
  d = rng.random(N)
  rate = 0.3 * (np.arange(J) / (J - 1)) ** 2
  wrong = (d[None, :] < rate[:, None]) | (rng.random((J, N)) < 0.03 * np.arange(J)[:, None] / J)
  wrong[0] = False
  return ~wrong


def test_conformal_guarantee_holds_over_random_splits():
  rng = np.random.default_rng(0)
  agree = _population(rng)
  eps, n_cal, trials = 0.05, 400, 300
  N = agree.shape[1]
  conf, naive = [], []
  for _ in range(trials):
    perm = rng.permutation(N)
    c, t = perm[:n_cal], perm[n_cal:]
    j = cal.conformal_choice(agree[:, c], eps)
    conf.append(1 - agree[j, t].mean())
    naive.append(1 - agree[cal.naive_consistency(agree[:, c], eps), t].mean())
  conf, naive = np.array(conf), np.array(naive)
  assert conf.mean() <= eps + 0.005, conf.mean()           # marginal: E[test disagreement] <= epsilon
  assert (naive > eps).mean() > (conf > eps).mean() + 0.2  # the uncorrected choice breaks it far more often
  assert naive.mean() > conf.mean()


@pytest.mark.parametrize("method", ["hoeffding", "binomial"])
def test_learn_then_test_violations_at_most_epsilon(method):
  rng = np.random.default_rng(1)
  J, n, delta, eps, trials = 30, 500, 0.1, 0.1, 400
  risk = np.linspace(0.0, 0.25, J)          # the true risk of each setting
  ltt, naive = [], []
  for _ in range(trials):
    u = rng.random(n)
    loss = (u[None, :] < risk[:, None]).astype(np.float32)
    ltt.append(risk[cal.fixed_sequence(cal.p_values(loss, delta, method), eps)] > delta)
    naive.append(risk[cal.naive_risk(loss, delta)] > delta)
  assert np.mean(ltt) <= eps, np.mean(ltt)
  assert np.mean(naive) > np.mean(ltt) + 0.2


# ----------------------------------------------------------------------------- replay on cached logits


def test_decision_table_replays_the_criterion():
  cfg = ModelConfig(vocab_size=10, hidden_size=8, num_hidden_layers=4, num_attention_heads=2, intermediate_size=8,
                    max_position_embeddings=16, num_labels=3)
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(4, 200, 3)).astype(np.float32) * 3
  labels = rng.integers(0, 3, 200)
  task = tasks.get_task("mnli")
  for criterion in ("entropy", "maxprob", "patience"):
    grid = cal.make_grid(criterion, cfg, size=20)
    table = cal.decision_table(grid, logits, cfg, task, labels)
    assert table.agree[0].all() and (table.layers[0] == 4).all()   # index 0: no early exit
    j = len(grid) - 1
    pred, exit_N = sweep.decisions(grid.policy(j), logits, False)
    np.testing.assert_array_equal(table.exits[j], exit_N)
    np.testing.assert_array_equal(table.agree[j], pred == logits[-1].argmax(-1))
    np.testing.assert_array_equal(table.loss[j], (pred != labels) & (logits[-1].argmax(-1) == labels))
    assert table.layer_ratio(j, num_layers=4) >= table.layer_ratio(0, num_layers=4) == 1.0
  # TOKEE: the replay is token_exit.simulate
  tcfg = cfg.replace(head="token")
  word_logits = rng.normal(size=(4, 30, 6, 3)).astype(np.float32) * 4
  mask = np.arange(6)[None, :] < rng.integers(1, 7, 30)[:, None]
  grid = cal.make_grid("tokee", tcfg, size=10, window=3)
  table = cal.decision_table(grid, word_logits, tcfg, None, None, mask)
  j = len(grid) - 1
  u = token_exit.word_uncertainty(word_logits)
  exits = np.asarray(token_exit.simulate(grid.policy(j), u, mask))
  assert table.layers[j].sum() == np.where(mask, exits + 1, 0).sum()
  assert table.agree[0].all() and table.exits is None


def test_too_small_n_is_said_plainly():
  cfg = ModelConfig(vocab_size=10, hidden_size=8, num_hidden_layers=2, num_attention_heads=2, intermediate_size=8,
                    max_position_embeddings=16, num_labels=2)
  grid = cal.make_grid("entropy", cfg, size=5)
  logits = np.random.default_rng(3).normal(size=(2, 872, 2)).astype(np.float32)
  table = cal.decision_table(grid, logits, cfg, None)
  with pytest.raises(RomeFlaxError, match=r"n=872 can certify epsilon >= 0.001145 \(1/\(n\+1\)\) for consistency, "
                                          r"not 0.001 .*use a larger calibration slice"):
    cal.choose(table, grid, cfg, np.full(872, 8), target="consistency", epsilon=0.001)
  table.loss = np.zeros_like(table.loss)
  with pytest.raises(RomeFlaxError, match="n=872 can certify epsilon >= .* at delta=0.01"):
    cal.choose(table, grid, cfg, np.full(872, 8), target="risk", epsilon=0.1, delta=0.01)


# ----------------------------------------------------------------------------- the command, end to end


def _export(path, seed=0):
  cfg = ModelConfig(vocab_size=len(synthetic.VOCAB), hidden_size=32, num_hidden_layers=3, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=64, num_labels=2)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(seed))
  params["exits"]["classifier"]["kernel"] = params["exits"]["classifier"]["kernel"] * 100.0
  MultiExitBert(cfg, params, synthetic.build_tokenizer()).save_pretrained(
      path, ExportInfo(task="synthetic", label_names=["negative", "positive"], max_length=32))
  return path


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  root = tmp_path_factory.mktemp("calib")
  return _export(root / "export"), _export(root / "other", seed=1)


def calibrate(*argv):
  return rome_main(["calibrate", "--no_progress", *[str(a) for a in argv]])


def test_calibrate_then_infer_runs_that_setting(exports, tmp_path, capsys):
  export, other = exports
  out = tmp_path / "thresholds.json"
  assert calibrate("--checkpoint", export, "--target", "consistency", "--epsilon", "0.1", "--skip_rows", "100",
                   "--rows", "300", "--output", out) == 0
  r = json.loads(out.read_text())
  assert r["format"] == cal.FORMAT and r["target"] == "consistency" and r["n"] == 300 and r["k"] == 30
  assert r["order_statistic"] == 271 and r["bound"] == pytest.approx(30 / 301)
  assert r["model"]["identity"] == cal.export_identity(export) != cal.export_identity(other)
  assert r["data"]["skip_rows"] == 100 and len(r["data"]["sha256"]) == 64
  assert r["setting"]["criterion"] == "entropy" and "guarantee" in r and r["calibration"]["layer_ratio"] >= 1
  assert 1 - r["calibration"]["agreement"] <= 0.1
  printed = capsys.readouterr().out
  assert "guarantee:" in printed and f"wrote {out}" in printed

  res = infer_cli.main(["--checkpoint", str(export), "--thresholds_file", str(out), "--output_dir",
                        str(tmp_path / "inf"), "--split", "train", "--limit", "400", "--measure_speed", "none",
                        "--no_progress"])
  assert res == 0
  summary = json.loads((tmp_path / "inf" / "summary.json").read_text())
  assert [s["setting"] for s in summary["settings"]] == [r["setting"]["describe"]]

  # the file is for `export`: another model, a malformed file and a clashing option are one error line each
  for argv, message in (([ "--checkpoint", str(other)], "was calibrated for another model"),
                        (["--checkpoint", str(export), "--thresholds", "0.1"], "drop --thresholds"),):
    assert infer_cli.main([*argv, "--thresholds_file", str(out), "--output_dir", str(tmp_path / "x"),
                           "--measure_speed", "none", "--no_progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err
  bad = tmp_path / "bad.json"
  bad.write_text(json.dumps({**r, "setting": {"criterion": "entropy"}}))
  assert infer_cli.main(["--checkpoint", str(export), "--thresholds_file", str(bad), "--output_dir",
                         str(tmp_path / "y"), "--no_progress"]) == 2
  assert "is malformed" in capsys.readouterr().err
  assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()


@pytest.mark.parametrize("argv,key", [
    (["--target", "risk", "--epsilon", "0.1", "--delta", "0.2", "--criterion", "maxprob"], "p_value"),
    (["--target", "risk", "--epsilon", "0.1", "--delta", "0.2", "--p_value", "binomial", "--loss", "disagreement",
      "--criterion", "patience"], "p_value"),
    (["--target", "speed", "--speedup", "1.2"], "speedup"),
])
def test_calibrate_risk_and_speed(exports, tmp_path, argv, key):
  out = tmp_path / "t.json"
  assert calibrate("--checkpoint", exports[0], *argv, "--skip_rows", "100", "--rows", "300", "--output", out) == 0
  r = json.loads(out.read_text())
  assert key in r and r["n"] == 300
  if r["target"] == "speed":
    assert r["calibration"]["layer_ratio"] >= 1.2
  else:
    assert r["calibration_loss"] <= 0.2 or not r["early_exit"]


def test_calibration_validation_script_runs(exports, tmp_path):
  out = tmp_path / "validation.json"
  res = subprocess.run([sys.executable, str(ROOT / "scripts" / "calibration_validation.py"), "--checkpoint",
                        str(exports[0]), "--skip_rows", "100", "--rows", "400", "--splits", "200", "--epsilon", "0.1",
                        "--delta", "0.2", "--output", str(out)], capture_output=True, text=True, cwd=ROOT)
  assert res.returncode == 0, res.stderr[-2000:]
  assert "cpu:" in res.stdout and "conformal" in res.stdout and "learn-then-test" in res.stdout
  report = json.loads(out.read_text())
  assert report["splits"] == 200 and {r["method"] for r in report["consistency"]} == {"conformal", "naive"}
