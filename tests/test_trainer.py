"""End to end on the synthetic task with a tiny model: resume exactness, outputs, bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from rome_flax.errors import RomeFlaxError
from rome_flax.model.pretrained import MultiExitBert
from rome_flax.train import train_config, trainer
from rome_flax.train.train_config import TrainConfig, load_config_file, parse_value

ROOT = Path(__file__).resolve().parents[1]


def tiny(tmp_path, name="run", **kw):
  base = dict(task="synthetic", model=None, random_model_layers=2, random_model_hidden=16, random_model_heads=2,
              random_model_intermediate=32, train_rows=64, max_length=16, batch_size=8, eval_batch_size=256,
              epochs=2, learning_rate=1e-3, eval_every=8, save_every=3, log_every=2, keep_checkpoints=2,
              output_dir=str(tmp_path / name))
  base.update(kw)
  return TrainConfig().replace(**base)


def exported_params(out):
  return jax.device_get(MultiExitBert.from_pretrained(Path(out) / "export").params)


@pytest.mark.parametrize("method,kill_at,saved", [
    ("romebert", 7, False),
    ("deebert", 19, False),   # inside stage 2 (16 steps per stage): the checkpoint holds stage 2's optimiser state
    ("deebert", 16, True),    # the last step of stage 1, saved: stage 1's state, then stage 2 starts afresh
])
def test_killed_and_resumed_run_ends_with_the_same_parameters(tmp_path, method, kill_at, saved):
  straight = tiny(tmp_path, "straight", method=method)
  results = trainer.train(straight, progress=False)
  assert len(results["dev"]) == 2 and "accuracy" in results["dev"][0]

  broken = tiny(tmp_path, "broken", method=method)
  trainer.train(broken, progress=False, max_steps=kill_at)
  last = Path(broken.run.output_dir) / "checkpoints" / "last"
  if not saved:
    shutil.rmtree(last / str(kill_at))                # killed after step kill_at, before its save
  assert (Path(broken.run.output_dir) / "export").is_dir()   # max_steps exports what it has; the resume replaces it
  trainer.train(broken, progress=False, resume=True)

  a, b = exported_params(straight.run.output_dir), exported_params(broken.run.output_dir)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  steps = [json.loads(line)["step"] for line in (Path(broken.run.output_dir) / "metrics.jsonl").read_text().splitlines()
           if json.loads(line)["kind"] == "train"]
  assert steps == sorted(set(steps))                  # nothing logged twice after the resume


def test_outputs_of_a_run(tmp_path):
  cfg = tiny(tmp_path, method="romebert", gr="projection")
  trainer.train(cfg, progress=False)
  out = Path(cfg.run.output_dir)
  assert json.loads((out / "config.json").read_text())["method"] == "romebert"
  records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  train_rec = [r for r in records if r["kind"] == "train"]
  assert {"loss", "gr_cos", "gr_norm_a", "gr_norm_b", "lr", "examples_per_s"} <= set(train_rec[-1])
  assert [r["step"] for r in records if r["kind"] == "eval"] == [8, 16]
  assert list((out / "tb").iterdir())
  assert json.loads((out / "checkpoints" / "best.json").read_text())["step"] in (8, 16)
  model = MultiExitBert.from_pretrained(out / "export")
  info = model.export_info
  assert info.task == "synthetic" and info.label_names == ("negative", "positive") and info.max_length == 16
  assert info.method == "romebert" and info.gr == "projection" and set(info.dev_metrics) == {"dev"}
  assert model.tokenizer is not None
  enc = model.encode(["good film"])
  assert model(enc["input_ids"], enc["attention_mask"]).exit_logits.shape == (2, 1, 2)


def test_output_dir_of_another_run_is_refused(tmp_path):
  cfg = tiny(tmp_path, epochs=1, eval_every=0)
  trainer.train(cfg, progress=False)
  before = sorted(p.name for p in (Path(cfg.run.output_dir) / "checkpoints" / "last").iterdir())
  with pytest.raises(RomeFlaxError, match="already holds a run"):
    trainer.train(cfg, progress=False)
  with pytest.raises(RomeFlaxError, match="config differs in learning_rate"):
    trainer.train(cfg.replace(learning_rate=0.5), progress=False, resume=True)
  assert sorted(p.name for p in (Path(cfg.run.output_dir) / "checkpoints" / "last").iterdir()) == before


def test_resume_takes_the_runs_own_config_and_refuses_only_maths_changes(tmp_path, capsys):
  """`train.py --output_dir D --resume` continues with D's config.json: no flag needs repeating, the run-owned
  ones (logging, evaluation and save cadence) may change, one that changes the maths is refused by name."""
  import train
  out = tmp_path / "run"
  flags = ["--random_model_layers", "2", "--random_model_hidden", "16", "--random_model_heads", "2",
           "--random_model_intermediate", "32", "--train_rows", "64", "--max_length", "16", "--batch_size", "8",
           "--epochs", "1", "--learning_rate", "3e-3", "--method", "joint", "--gr", "none", "--no_progress"]
  assert train.main([*flags, "--output_dir", str(out), "--max_steps", "3", "--log_every", "1"]) == 0
  assert train.main(["--output_dir", str(out), "--resume", "--gamma", "0.5", "--no_progress"]) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "config differs in gamma (a resumed run keeps its maths; it may change only" in err[0]
  assert train.main(["--output_dir", str(out), "--resume", "--eval_every", "2", "--log_every", "4", "--no_progress"]) == 0
  records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
  assert [r["step"] for r in records if r["kind"] == "train"] == list(range(1, 9)), "to the run's own end"
  assert [r["step"] for r in records if r["kind"] == "eval"] == [4, 6, 8], "the resumed part evaluates every 2 steps"
  assert json.loads((out / "config.json").read_text())["learning_rate"] == 3e-3


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  rows = ["text,label"] + [f"good film {i},{i % 5}" for i in range(40)] + ["awful film,1e30"] * 8
  (tmp_path / "train.csv").write_text("\n".join(rows) + "\n")
  cfg = tiny(tmp_path, task="custom", custom_regression=True, train_file=str(tmp_path / "train.csv"),
             train_rows=0, epochs=1, save_every=1, log_every=1, batch_size=8,
             regression_targets="raw")   # standardised targets would tame the 1e30 labels
  with pytest.raises(RomeFlaxError, match=r"non-finite loss at step \d+; stopping \(the last good checkpoint is step"):
    trainer.train(cfg, progress=False)
  saved = [int(p.name) for p in (Path(cfg.run.output_dir) / "checkpoints" / "last").iterdir() if p.name.isdigit()]
  assert all(s >= 1 for s in saved)


def test_config_file_and_overrides(tmp_path):
  cfg = load_config_file(ROOT / "configs" / "default.py")
  assert cfg.data.task == "synthetic" and cfg.network.model is None
  assert parse_value("learning_rate", "5e-5") == 5e-5 and parse_value("export", "false") is False
  assert parse_value("model", "none") is None
  with pytest.raises(RomeFlaxError, match="unknown config key"):
    cfg.replace(learnig_rate=1.0)
  with pytest.raises(RomeFlaxError, match="method must be one of"):
    cfg.replace(method="rome")
  bad = tmp_path / "bad.py"
  bad.write_text("def get_config():\n  return {'epoch': 3}\n")
  with pytest.raises(RomeFlaxError, match="unknown config key"):
    load_config_file(bad)


@pytest.mark.parametrize("args,message", [
    (["--learning_rat", "1"], "unrecognized arguments: --learning_rat"),
    (["--method", "rome"], "method must be one of"),
    (["--task", "sst3"], "unknown task"),
    (["--task", "sst-2", "--data_dir", "/nonexistent/glue", "--model", "none"], "not a directory"),
    (["--epochs", "two"], "cannot read 'two' as int"),
])
def test_cli_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
  proc = subprocess.run([sys.executable, str(ROOT / "train.py"), "--output_dir", str(tmp_path / "o"), *args],
                        capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 2, proc.stderr
  lines = [line for line in proc.stderr.splitlines() if line.strip()]
  assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], proc.stderr


def test_mnli_reports_matched_and_mismatched_and_stsb_regresses(tmp_path):
  header = "index\tpromptID\tpairID\tgenre\ts1bp\ts2bp\ts1p\ts2p\tsentence1\tsentence2\tlabel1\tgold_label"
  names = ("entailment", "neutral", "contradiction")
  rows = lambda n: [header] + [f"{i}\t1\t1\tfic\tx\tx\tx\tx\tgood film {i}\tnot bad\t-\t{names[i % 3]}"
                               for i in range(n)]
  mnli = tmp_path / "MNLI"
  mnli.mkdir()
  for name, n in (("train", 24), ("dev_matched", 9), ("dev_mismatched", 6)):
    (mnli / f"{name}.tsv").write_text("\n".join(rows(n)) + "\n")
  results = trainer.train(tiny(tmp_path, "mnli", task="mnli", data_dir=str(mnli), epochs=1, train_rows=0), progress=False)
  assert set(results) == {"dev_matched", "dev_mismatched"} and len(results["dev_mismatched"]) == 2

  sts_header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
  sts = tmp_path / "STS-B"
  sts.mkdir()
  for name, n in (("train", 24), ("dev", 8)):
    lines = [sts_header] + [f"{i}\tg\tf\t2012\t{i}\tn\tn\tgood film\tfine plot {i}\t{i % 5}.0" for i in range(n)]
    (sts / f"{name}.tsv").write_text("\n".join(lines) + "\n")
  results = trainer.train(tiny(tmp_path, "stsb", task="sts-b", data_dir=str(sts), epochs=1, train_rows=0,
                               method="romebert", gr="penalty"), progress=False)
  assert set(results["dev"][0]) == {"exit", "pearson", "spearman"}
  assert MultiExitBert.from_pretrained(tmp_path / "stsb" / "export").config.num_labels == 1


def test_checkpoint_that_does_not_fit_is_one_clear_error(tmp_path):
  """E.g. a checkpoint written with [in, out] kernels: named array, both shapes; nothing restored."""
  from rome_flax.model.config import ModelConfig
  from rome_flax.model.encoder import init_params
  from rome_flax.train import train_step as ts
  from rome_flax.train.checkpoint import RunCheckpoints
  cfg = ModelConfig(vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                    intermediate_size=24, max_position_embeddings=16, num_labels=2)
  params = init_params(cfg, jax.random.PRNGKey(0))
  optimizer = ts.make_optimizer(ts.OptimConfig())
  ckpts = RunCheckpoints(tmp_path / "ckpt", keep=2)
  ckpts.save(ts.init_train_state(params, optimizer, seed=0, step=5))
  np.testing.assert_array_equal(ckpts.restore(ts.init_train_state(params, optimizer, seed=1)).rng,
                                ts.init_train_state(params, optimizer, seed=0).rng)
  swapped = dict(params, layers=dict(params["layers"], intermediate=dict(
      params["layers"]["intermediate"], kernel=params["layers"]["intermediate"]["kernel"].swapaxes(1, 2))))
  with pytest.raises(RomeFlaxError, match=r"params/layers/0/intermediate/kernel is stored with shape \(24, 16\), "
                                          r"this model needs \(16, 24\)"):
    ckpts.restore(ts.init_train_state(swapped, ts.make_optimizer(ts.OptimConfig()), seed=0))
  ckpts.close()


def test_schedule_positions():
  from rome_flax.train.schedule import Schedule
  sched = Schedule(steps_per_epoch=4, epochs=2, num_stages=2)
  assert (sched.stage_steps, sched.total_steps) == (8, 16)
  pos = sched.at(13)
  assert (pos.stage, pos.stage_step, pos.epoch, pos.data_epoch, pos.batch) == (2, 5, 1, 3, 1)
  assert sched.at(8).starts_stage and not sched.at(9).starts_stage
  # A checkpoint after step s holds the optimiser state of the stage of step s.
  assert [sched.stage_after(s) for s in (0, 1, 8, 9, 16)] == [1, 1, 1, 2, 2]
  with pytest.raises(RomeFlaxError, match="outside"):
    sched.at(16)


def test_hooks_run_when_due_in_order():
  hooks, seen = trainer.Hooks(), []
  hooks.add(lambda info: seen.append(("every 2", info.step)), every=2)
  hooks.add(lambda info: seen.append(("at 3", info.step)), when=lambda step: step == 3)
  hooks.add(lambda info: seen.append(("both", info.step)), every=2, when=lambda step: step == 3)
  for step in range(1, 5):
    hooks.run(trainer.StepInfo(step, None, {}))
  assert seen == [("every 2", 2), ("both", 2), ("at 3", 3), ("both", 3), ("every 2", 4), ("both", 4)]


def test_config_groups_flat_and_dotted_names():
  cfg = TrainConfig().replace(**{"learning_rate": 5e-5, "run.output_dir": "x", "custom_labels": ["a", "b"]})
  assert cfg.optim.learning_rate == 5e-5 and cfg.run.output_dir == "x" and cfg.data.custom_labels == ("a", "b")
  flat = cfg.to_dict()
  assert flat["learning_rate"] == 5e-5 and "optim" not in flat
  assert TrainConfig.from_dict(json.loads(json.dumps(flat))) == cfg      # config.json round trip
  assert cfg.loss_config(True).regression and cfg.loss_config(False).gamma == cfg.objective.gamma
  with pytest.raises(RomeFlaxError, match=r"unknown config key\(s\): optim.output_dir"):
    cfg.replace(**{"optim.output_dir": "y"})
  with pytest.raises(RomeFlaxError, match="gamma must be in"):
    cfg.replace(gamma=2.0)


def test_every_option_has_help_and_its_default():
  """train.py --help: a line for every TrainConfig field with its default, and configs/default.py's value where
  the run without --config differs (issue 25: ~60 bare VALUE options)."""
  import train
  helps = {a.dest[4:]: a for a in train.build_parser()._actions if a.dest.startswith("set_")}
  assert set(helps) == set(train_config.field_names())
  for name, action in helps.items():
    text = action.help
    assert text and not text.startswith(" (default") and "(default: " in text, name
    assert action.metavar in ("STR", "INT", "FLOAT", "BOOL", "LIST"), (name, action.metavar)
  assert helps["learning_rate"].help.endswith("(default: 2e-05; configs/default.py: 0.001)")
  assert helps["method"].help.endswith("(default: romebert)")


def test_metrics_writer_and_exit_lines_ignore_the_exit_number(tmp_path):
  from rome_flax.kinds.tasks import get_task
  task = get_task("synthetic")
  per_exit = [{"exit": 1, "accuracy": 50.0}, {"exit": 2, "accuracy": 80.0}]
  assert trainer.format_exits(task, per_exit) == "accuracy per exit: 50.0 80.0"
  assert trainer.selection_value("mean_exits", task, per_exit) == 65.0
  assert trainer.selection_value("final_exit", task, per_exit) == 80.0
  writer = trainer.MetricsWriter(tmp_path, 0)
  writer.write([{"step": 1, "kind": "train", "loss": 0.5}, {"step": 2, "kind": "train", "loss": 0.4}])
  writer.write([{"step": 2, "kind": "eval", "split": "dev", "exits": per_exit}])
  writer.close()
  assert sorted(trainer._scalars({"step": 2, "kind": "eval", "split": "dev", "exits": per_exit})) == [
      ("dev/accuracy/exit1", 50.0), ("dev/accuracy/exit2", 80.0)]
  writer = trainer.MetricsWriter(tmp_path, 1)     # a resume from step 1 drops what came after it
  writer.close()
  assert [json.loads(line) for line in (tmp_path / trainer.METRICS_FILE).read_text().splitlines()] == [
      {"step": 1, "kind": "train", "loss": 0.5}]


def test_synthetic_runs_saved_before_the_short_sentences_keep_their_data(tmp_path):
  """A synthetic run saved before `synthetic_fillers` existed trained on 5-19 filler words: --resume
  keeps them (FORMER_DEFAULTS), while other tasks resume as before; bad lengths are one error."""
  def saved_without_field(cfg):
    saved = json.loads(json.dumps(cfg.to_dict()))
    saved.pop("synthetic_fillers")
    return saved
  now = TrainConfig()
  assert now.data.synthetic_fillers == (2, 7)
  assert trainer.config_differences(saved_without_field(now), now) == ["synthetic_fillers"]
  assert trainer.config_differences(saved_without_field(now), now.replace(synthetic_fillers=(5, 19))) == []
  sst2 = now.replace(task="sst-2")
  assert trainer.config_differences(saved_without_field(sst2), sst2) == []
  (tmp_path / trainer.CONFIG_FILE).write_text(json.dumps(saved_without_field(now)))
  assert trainer.resume_config(tmp_path, {}).data.synthetic_fillers == (5, 19)
  assert now.data.sources().synthetic_fillers == (2, 7)
  for bad in ((1, 5), (6, 3), (2,), "2,7"):
    with pytest.raises(RomeFlaxError, match="synthetic_fillers must be"):
      now.replace(synthetic_fillers=bad)
