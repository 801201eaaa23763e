"""infer.py end to end on a tiny synthetic export: sweep files, measured speed, submission, bad input."""

import json
import subprocess
import sys
from pathlib import Path

import jax
import pytest

from rome_flax import infer_cli
from rome_flax.errors import RomeFlaxError
from rome_flax.kinds import synthetic
from rome_flax.model import encoder as model_lib
from rome_flax.model.config import ModelConfig
from rome_flax.model.pretrained import ExportInfo, MultiExitBert

ROOT = Path(__file__).resolve().parents[1]


def _export(path, num_labels, task, label_names):
  cfg = ModelConfig(vocab_size=len(synthetic.VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=64, max_position_embeddings=64, num_labels=num_labels)
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  params["exits"]["classifier"]["kernel"] = params["exits"]["classifier"]["kernel"] * 100.0
  MultiExitBert(cfg, params, synthetic.build_tokenizer()).save_pretrained(
      path, ExportInfo(task=task, label_names=label_names, max_length=32))
  return path


@pytest.fixture(scope="module")
def export(tmp_path_factory):
  return _export(tmp_path_factory.mktemp("ckpt") / "export", 2, "synthetic", ["negative", "positive"])


@pytest.fixture(scope="module")
def regression_export(tmp_path_factory):
  return _export(tmp_path_factory.mktemp("ckpt") / "export", 1, "custom", [])


def infer(*argv):
  return infer_cli.main([str(a) for a in argv])


def test_dev_sweep_and_measured_speed(export, tmp_path, capsys):
  out = tmp_path / "out"
  assert infer("--checkpoint", export, "--output_dir", out, "--limit", 96, "--batch_size", 16,
               "--thresholds", "0.2,0.6,0.3:0.7", "--measure_speed", "all", "--speed_repeats", 1, "--latency_examples", 8, "--no_progress") == 0
  printed = capsys.readouterr().out
  assert "| setting | accuracy | avg_exit_layer" in printed and "entropy<0.6" in printed
  for name in ("sweep.json", "sweep.csv", "sweep.md", "per_exit.json", "per_exit.csv", "per_exit.md",
               "per_exit.png", "tradeoff.png", "speed.json", "summary.json"):
    assert (out / name).is_file(), name
  summary = json.loads((out / "summary.json").read_text())
  assert summary["examples"] == 96 and len(summary["settings"]) == 3
  assert summary["settings"][2]["thresholds"] == [0.3]   # 2 layers: one highway; the final exit always exits
  speed = json.loads((out / "speed.json").read_text())
  assert all(r["exits_match_offline"] for r in speed)
  assert all(r["throughput_speedup_b16"] > 0 and r["latency_speedup_b1"] > 0 for r in speed)
  pred = (out / "predictions" / "entropy_lt_0.6.tsv").read_text().splitlines()
  assert pred[0] == "index\tprediction\texit_layer" and len(pred) == 97
  assert pred[1].split("\t")[1] in ("negative", "positive")


def test_all_criteria_default_thresholds(export, tmp_path):
  out = tmp_path / "out"
  assert infer("--checkpoint", export, "--output_dir", out, "--limit", 40, "--criterion", "all",
               "--measure_speed", "none", "--no_progress") == 0
  assert not (out / "speed.json").exists()
  criteria = {r["criterion"] for r in json.loads((out / "sweep.json").read_text())}
  assert criteria == {"entropy", "maxprob", "patience"}


def test_test_split_writes_submission(export, tmp_path):
  out = tmp_path / "out"
  assert infer("--checkpoint", export, "--split", "test", "--output_dir", out, "--limit", 20,
               "--thresholds", "0.5", "--no_progress") == 0
  sub = list((out / "submission").glob("*/*.tsv"))
  assert len(sub) == 1
  lines = sub[0].read_text().splitlines()
  assert lines[0] == "index\tprediction" and len(lines) == 21
  assert {line.split("\t")[1] for line in lines[1:]} <= {"negative", "positive"}
  assert not (out / "per_exit.json").exists()


def test_regression_custom_patience(regression_export, tmp_path):
  data = tmp_path / "dev.jsonl"
  data.write_text("".join(json.dumps({"text": t, "label": float(i % 5)}) + "\n"
                          for i, t in enumerate(synthetic.make_split("dev", size=30)[0])))
  out = tmp_path / "out"
  assert infer("--checkpoint", regression_export, "--task", "custom", "--data_file", data,
               "--criterion", "patience", "--thresholds", "1", "--delta", "0.5", "--output_dir", out,
               "--measure_speed", "all", "--no_progress") == 0
  assert json.loads((out / "speed.json").read_text())[0]["exits_match_offline"]
  rows = json.loads((out / "sweep.json").read_text())
  assert rows[0]["setting"] == "patience=1,delta=0.5" and "pearson" in rows[0]


@pytest.mark.parametrize("case, match", [
    ("missing_ckpt", "does not exist"),
    ("foreign_ckpt", "neither a rome_flax export"),
    ("bad_thresholds", "does not parse"),
    ("metric_on_test", "has no labels"),
    ("output_exists", "already holds results"),
    ("bad_criterion", "unknown criterion"),
])
def test_bad_input(export, tmp_path, capsys, case, match):
  out = tmp_path / "out"
  args = ["--checkpoint", export, "--output_dir", out, "--limit", 8, "--no_progress"]
  if case == "missing_ckpt":
    args[1] = tmp_path / "nope"
  elif case == "foreign_ckpt":
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "weights.bin").write_bytes(b"x")
    args[1] = tmp_path / "foreign"
  elif case == "bad_thresholds":
    args += ["--thresholds", "0.1,abc"]
  elif case == "metric_on_test":
    args += ["--split", "test", "--metric", "accuracy"]
  elif case == "output_exists":
    out.mkdir()
    (out / "sweep.json").write_text("[]")
  elif case == "bad_criterion":
    args += ["--criterion", "confidence"]
  assert infer(*args) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: ") and match in err[0]
  if case == "output_exists":
    assert (out / "sweep.json").read_text() == "[]"


def test_patience_on_regression_needs_delta(regression_export, tmp_path, capsys):
  data = tmp_path / "dev.csv"
  data.write_text("text,label\ngood film,1.0\nbad film,0.0\n")
  assert infer("--checkpoint", regression_export, "--task", "custom", "--data_file", data, "--criterion",
               "patience", "--output_dir", tmp_path / "out", "--no_progress") == 2
  assert "delta" in capsys.readouterr().err


def test_data_file_without_needed_column(regression_export, tmp_path, capsys):
  data = tmp_path / "dev.csv"
  data.write_text("sentence,label\ngood film,1.0\n")
  assert infer("--checkpoint", regression_export, "--task", "custom", "--data_file", data, "--criterion",
               "patience", "--delta", "0.1", "--output_dir", tmp_path / "out", "--no_progress") == 2
  assert "no column 'text'" in capsys.readouterr().err


def test_entry_point_exit_code(tmp_path):
  proc = subprocess.run([sys.executable, str(ROOT / "infer.py"), "--checkpoint", str(tmp_path / "missing"),
                         "--output_dir", str(tmp_path / "o")], capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 2 and proc.stderr.strip().startswith("error: checkpoint directory")


def test_evaluate_exits_is_a_library_program(export, tmp_path, monkeypatch):
  """The evaluation writes nothing; the reporting step writes what infer.py writes."""
  from rome_flax import report
  from rome_flax.engine import evaluation
  from rome_flax.engine import exit_policy as ep
  from rome_flax.kinds import data, tasks
  monkeypatch.chdir(tmp_path)
  model = MultiExitBert.from_pretrained(export)
  task = tasks.get_task("synthetic")
  examples = data.load_split(task, "dev").head(24)
  policies = [ep.make_policy("entropy", t, 2, num_labels=2) for t in (0.0, 0.6)]
  ev = evaluation.evaluate_exits(model, task, examples, policies, batch_size=8, measure_speed="none")
  assert list(tmp_path.iterdir()) == []
  assert ev.metric == "accuracy" and ev.max_length == 32 and [r["exit"] for r in ev.per_exit] == [1, 2]
  assert ev.settings[0]["accuracy"] == pytest.approx(ev.final_metric) and ev.speed == []
  assert len(ev.predictions) == len(ev.exits) == 2 and (ev.exits[0] == 1).all()
  written = report.write_evaluation(tmp_path / "out", ev, checkpoint="ckpt")
  assert json.loads((tmp_path / "out" / "summary.json").read_text())["checkpoint"] == "ckpt"
  assert {p.name for p in written} >= {"sweep.json", "per_exit.png", "entropy_lt_0.6.tsv", "tradeoff.png"}
  with pytest.raises(RomeFlaxError, match="has no labels"):
    evaluation.evaluate_exits(model, task, data.load_split(task, "test").head(4), policies, metric="accuracy")
