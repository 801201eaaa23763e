"""The study command (issue 14): a 2-cell x 1-seed smoke run on the synthetic task, resume after a kill,
and the report's arithmetic (frontier, mean +- std, verdicts, the recipe rule) on hand-made results."""

from __future__ import annotations

import json

import numpy as np
import pytest

from rome_flax import study as study_lib
from rome_flax import study_report
from rome_flax.__main__ import main as package_main
from rome_flax.errors import RomeFlaxError

TINY = dict(task="synthetic", model=None, random_model_layers=3, random_model_hidden=32, random_model_heads=2,
            random_model_intermediate=64, train_rows=64, max_length=16, batch_size=16, epochs=1,
            learning_rate=1e-3, eval_every=0, save_every=2, log_every=2)

CONFIG = f'''
def get_config():
  return dict(name="smoke", train={TINY!r},
              cells=[dict(name="rome", label="RomeBERT", overrides=dict(method="romebert")),
                     dict(name="dee", label="DeeBERT", overrides=dict(method="deebert"))],
              seeds=[0], thresholds=[0.0, 0.3, 0.7], heldout_rows=[100, 140], heldout_cells=["rome", "dee"],
              claims=dict(romebert="rome", deebert="dee"), recipe=dict(published="rome", candidates=["dee"]),
              latency_examples=4)
'''


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
  root = tmp_path_factory.mktemp("study")
  (root / "study_smoke.py").write_text(CONFIG)
  assert package_main(["study", "--config", str(root / "study_smoke.py"), "--output_dir", str(root / "out")]) == 0
  return root


def test_smoke_study_writes_every_table_and_the_plot(smoke):
  out = smoke / "out"
  for cell in ("rome", "dee"):
    result = json.loads((out / cell / "seed0" / "result.json").read_text())
    assert len(result["dev"]["per_exit"]) == 3 and len(result["dev"]["settings"]) == 3
    assert result["train_seconds"] > 0 and "speed" in result   # the first seed's setting is timed
  for cell in ("rome", "dee"):
    held = json.loads((out / cell / "seed0" / "result.json").read_text())["heldout"]
    assert held["rows"] == [100, 140] and held["examples"] == 40
  tables = (out / "tables.md").read_text()
  for part in ("## Dev per exit", "RomeBERT", "DeeBERT", "at >= 2x layers", "## Training cost", "## Claims",
               "## Recipe", "train rows 100..139"):
    assert part in tables
  summary = json.loads((out / "study.json").read_text())
  assert set(summary["cells"]) == {"rome", "dee"} and summary["recipe"]["chosen"] in ("rome", "dee")
  assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"
  assert not (out / "rome" / "seed0" / "train" / "checkpoints").exists()   # a finished run keeps its export only


def test_rerun_skips_finished_runs(smoke, capsys):
  before = (smoke / "out" / "rome" / "seed0" / "result.json").read_bytes()
  assert package_main(["study", "--config", str(smoke / "study_smoke.py"), "--output_dir", str(smoke / "out")]) == 0
  assert "training" not in capsys.readouterr().out
  assert (smoke / "out" / "rome" / "seed0" / "result.json").read_bytes() == before


def test_another_config_is_refused_and_another_sweep_reevaluates(smoke, capsys):
  config, out = str(smoke / "study_smoke.py"), str(smoke / "out")
  before = (smoke / "out" / "rome" / "seed0" / "result.json").read_bytes()
  assert package_main(["study", "--config", config, "--output_dir", out, "--set", "learning_rate=0.5"]) == 2
  assert "differs in learning_rate" in capsys.readouterr().err
  assert (smoke / "out" / "rome" / "seed0" / "result.json").read_bytes() == before
  changed = smoke / "study_smoke2.py"
  changed.write_text(CONFIG.replace("thresholds=[0.0, 0.3, 0.7]", "thresholds=[0.0, 0.5]"))
  assert package_main(["study", "--config", str(changed), "--output_dir", out]) == 0
  said = capsys.readouterr().out
  assert "training" not in said and "dev sweep: 2 settings" in said
  assert len(json.loads((smoke / "out" / "rome" / "seed0" / "result.json").read_text())["dev"]["settings"]) == 2


def test_a_killed_run_resumes(tmp_path):
  from rome_flax.train import trainer
  cfg = study_lib.from_dict(dict(name="r", train=TINY, cells=[dict(name="joint", overrides=dict(method="joint"))],
                                 seeds=[3], thresholds=[0.0]))
  cell = cfg.cells[0]
  trainer.train(study_lib.train_config(cfg, cell, 3, tmp_path), progress=False, max_steps=2)   # "killed" at step 2
  said = []
  results = study_lib.run_study(cfg, tmp_path, say=said.append, report=False)
  assert any("training (resuming)" in s for s in said)
  assert results["joint"][0]["train_steps"] == 4 and results["joint"][0]["seed"] == 3


def test_bad_study_input_is_one_error_line(smoke, tmp_path, capsys):
  config = str(smoke / "study_smoke.py")
  cases = [(["study", "--config", str(tmp_path / "none.py")], "does not exist"),
           (["study", "--config", config, "--cells", "nope"], "unknown cell"),
           (["study", "--config", config, "--set", "learning_rat=1"], "FIELD=VALUE"),
           (["study", "--config", config, "--seeds", "a"], "--seeds"),
           (["study", "--config", config, "--set", "seed=3"], "set by the study"),
           (["study", "--config", config, "--report_only", "--output_dir", str(tmp_path / "empty")], "no finished run")]
  for argv, message in cases:
    assert package_main([*argv, *([] if "--output_dir" in argv else ["--output_dir", str(tmp_path / "o")])]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error:") and message in err[0]
  base = dict(name="x", cells=[dict(name="a", overrides=dict(train_rows=100))], thresholds=[0.1])
  for extra, message in [(dict(seed=[1]), "unknown study key"), (dict(claims=["a"]), "claims must be a dict"),
                         (dict(seeds=3), "seeds must be a list"), (dict(claims=dict(rome="a")), "unknown claim role"),
                         (dict(heldout_rows=[10, 20], heldout_cells=["a"]), "overlap heldout_rows"),
                         (dict(heldout_rows=[200, 220], recipe=dict(published="a")), "not in heldout_cells")]:
    with pytest.raises(RomeFlaxError, match=message):
      study_lib.from_dict({**base, **extra})


# ----------------------------------------------------------------------------- the report's arithmetic


def _run(seed, per_exit, settings, heldout=None):
  r = {"seed": seed, "train_seconds": 10.0, "dev": {"metric": "accuracy", "metric_names": ["accuracy"],
       "per_exit": [{"exit": i + 1, "accuracy": v} for i, v in enumerate(per_exit)],
       "settings": [{"setting": f"s{i}", "accuracy": a, "layer_ratio": x} for i, (x, a) in enumerate(settings)]}}
  if heldout is not None:
    r["heldout"] = {"metric": "accuracy", "metric_names": ["accuracy"],
                    "per_exit": [{"exit": i + 1, "accuracy": v} for i, v in enumerate(heldout)]}
  return r


def test_frontier_is_the_best_setting_reaching_the_ratio():
  settings = [{"layer_ratio": 1.0, "a": 90.0}, {"layer_ratio": 1.9, "a": 89.0}, {"layer_ratio": 2.1, "a": 85.0},
              {"layer_ratio": 3.5, "a": 86.0}]
  assert study_report.frontier(settings, "a", 1.0) == 90.0
  assert study_report.frontier(settings, "a", 2.0) == 86.0    # 1.9 does not reach 2x; 3.5 beats 2.1
  assert np.isnan(study_report.frontier(settings, "a", 4.0))


def test_mean_std_and_verdicts():
  m, s = study_report.mean_std([80.0, 82.0, 84.0])
  assert m == 82.0 and s == pytest.approx(2.0)             # sample std (n - 1)
  d, se, n = study_report.compare([80.0, 82.0, 84.0], [70.0, 70.0, 70.0])
  assert d == 12.0 and se == pytest.approx(np.sqrt(4 / 3)) and n == 3
  assert study_report.compare([80.0, float("nan"), 84.0], [70.0, 70.0])[2] == 2     # NaN seeds do not count
  assert study_report.fmt([80.0, float("nan"), 84.0]) == "82.0 ± 2.8 (2 of 3)"
  assert study_report.verdict(d, se) == "holds"
  assert study_report.verdict(-d, se) == "fails"
  assert study_report.verdict(1.0, 1.0) == "not resolved"
  assert study_report.verdict(-0.5, 0.1, margin=-1.0) == "holds"    # within one point
  assert study_report.verdict(5.0, 0.0, seeds=1) == "one seed"


def test_recipe_is_chosen_on_heldout_rows_never_on_dev():
  cfg = study_lib.from_dict(dict(name="r", cells=[dict(name="pub"), dict(name="a"), dict(name="b")], seeds=[0, 1],
                                 train=dict(train_rows=10),
                                 thresholds=[0.1], heldout_rows=[10, 20], heldout_cells=["pub", "a", "b"],
                                 recipe=dict(published="pub", candidates=["a", "b"], max_mean_exits_drop=1.0)))
  flat = [(1.0, 80.0)]
  results = {  # dev says b; held out says a (b's held-out final is higher but its early exits collapse)
      "pub": [_run(s, [70, 80], flat, heldout=[70, 80]) for s in (0, 1)],
      "a": [_run(s, [70, 79], flat, heldout=[70, 82]) for s in (0, 1)],
      "b": [_run(s, [70, 99], flat, heldout=[50, 85]) for s in (0, 1)]}
  choice = study_report.choose_recipe(cfg, results)
  assert choice["chosen"] == "a"
  # Within noise is not enough: a's held-out final 79 / 85 (mean 82, s.e. 3) against 80 / 80.
  noisy = dict(results, a=[_run(0, [70, 79], flat, heldout=[70, 79]), _run(1, [70, 79], flat, heldout=[70, 85])])
  assert study_report.choose_recipe(cfg, noisy)["chosen"] == "pub"
  results["a"] = results["a"][:1]                            # a candidate with a missing seed is not eligible
  assert study_report.choose_recipe(cfg, results)["chosen"] == "pub"


def test_highway_weight_scales_the_highway_term_only():
  import jax.numpy as jnp
  from rome_flax.train import methods
  rng = np.random.default_rng(0)
  logits = jnp.asarray(rng.normal(size=(4, 5, 3)), jnp.float32)
  labels, weights = jnp.asarray([0, 1, 2, 1, 0]), jnp.ones(5)
  base = methods.loss_terms(logits, labels, weights, methods.LossConfig())
  scaled = methods.loss_terms(logits, labels, weights, methods.LossConfig(highway_weight=0.25))
  np.testing.assert_allclose(float(scaled.final), float(base.final), rtol=1e-6)
  np.testing.assert_allclose(float(scaled.highway), 0.25 * float(base.highway), rtol=1e-6)
  with pytest.raises(Exception, match="highway_weight"):
    methods.LossConfig(highway_weight=0.0)


def test_settings_table_and_patience_plot(tmp_path):
  cfg = study_lib.from_dict(dict(name="r", cells=[dict(name="a", label="A")], seeds=[0, 1], criterion="patience",
                                 thresholds=[1, 2], deltas=[0.1, 0.5]))
  def run(seed, shift):
    r = _run(seed, [70.0, 80.0], [])
    r["dev"].update(metric="pearson", metric_names=["pearson", "spearmanr", "mse"],
                    per_exit=[{"exit": e, "pearson": 70.0 + e, "spearmanr": 69.0 + e, "mse": 1.0} for e in (1, 2)], settings=[
        {"setting": f"patience={p},delta={d}", "pearson": 75.0 + p + shift, "spearmanr": 70.0, "mse": 1.0,
         "layer_ratio": 3.0 / p} for d in (0.1, 0.5) for p in (1, 2)])
    return r
  results = {"a": [run(0, 0.0), run(1, 2.0)]}
  rows = study_report.settings_rows(results)
  assert [r["setting"] for r in rows][:2] == ["patience=1,delta=0.1", "patience=2,delta=0.1"]
  assert rows[0]["pearson"] == 77.0 and rows[0]["pearson_std"] == pytest.approx(np.sqrt(2.0), abs=1e-3)
  written = study_report.write_report(cfg, results, tmp_path)
  assert (tmp_path / "patience.png") in written and (tmp_path / "settings.csv").is_file()
  assert "| A (spearmanr) | 2 |" in (tmp_path / "tables.md").read_text()
