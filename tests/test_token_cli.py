"""Sequence labelling end to end: train.py on tiny CoNLL / JSON Lines fixtures (NER and POS) with a
tiny random BERT, then infer.py on its export: per-exit and sweep files, the CoNLL prediction files,
the measured paths taking the offline exits, and the export's tag set.

The CLIs run in-process (`train.main`, `infer.main`); each fixture trains once per module.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import infer
import train
from rome_flax.kinds import synthetic, token_data
from rome_flax.model.pretrained import MultiExitBert

LAYERS = 2
TINY = ["--random_model_layers", str(LAYERS), "--random_model_hidden", "32", "--random_model_heads", "2",
        "--random_model_intermediate", "64", "--max_length", "24", "--batch_size", "16", "--epochs", "1",
        "--learning_rate", "3e-3", "--eval_every", "0", "--no_progress"]
PERSONS, PLACES = synthetic.POSITIVE[:5], synthetic.NEGATIVE[:5]
ORPHAN = [("the", "O"), ("good", "I-PER")]   # an I- tag with no B- before it: conlleval starts an entity there
NER_TAG_SET = ("O", "B-LOC", "B-PER", "I-PER")   # token_data.tag_set order: O, then by (type, B < I)


def run_cli(main, argv) -> int:
  try:
    return main([str(a) for a in argv])
  except SystemExit as e:
    return e.code


def ner_sentences(seed: int, n: int) -> list[list[tuple[str, str]]]:
  """n sentences of 3..8 words: persons (B-PER I-PER pairs of POSITIVE words), places (one B-LOC
  NEGATIVE word) and filler (O); the last sentence is ORPHAN."""
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(n - 1):
    sent = []
    for _ in range(rng.integers(3, 9)):
      r = rng.random()
      if r < 0.15:
        sent += [(str(rng.choice(PERSONS)), "B-PER"), (str(rng.choice(PERSONS)), "I-PER")]
      elif r < 0.3:
        sent.append((str(rng.choice(PLACES)), "B-LOC"))
      else:
        sent.append((str(rng.choice(synthetic.FILLER)), "O"))
    out.append(sent)
  return out + [list(ORPHAN)]


def pos_sentences(seed: int, n: int) -> list[list[tuple[str, str]]]:
  """Plain tags: DT for articles, VB for verbs, NN for everything else."""
  rng = np.random.default_rng(seed)
  tag = {"the": "DT", "a": "DT", "this": "DT", "was": "VB", "is": "VB"}
  return [[(w, tag.get(w, "NN")) for w in (str(rng.choice(synthetic.FILLER)) for _ in range(rng.integers(2, 9)))]
          for _ in range(n)]


def write_conll(path: Path, sentences) -> Path:
  path.write_text("".join("".join(f"{w} {t}\n" for w, t in s) + "\n" for s in sentences))
  return path


def write_jsonl(path: Path, sentences) -> Path:
  path.write_text("".join(json.dumps({"tokens": [w for w, _ in s], "tags": [t for _, t in s]}) + "\n"
                          for s in sentences))
  return path


def make_dir(root: Path, make) -> tuple[Path, dict]:
  root.mkdir(parents=True)
  splits = {"train": make(0, 60), "dev": make(1, 16), "test": make(2, 12)}
  for name, sentences in splits.items():
    write_conll(root / f"{name}.txt", sentences)
  return root, splits


def read_predictions(path: Path) -> list[list[list[str]]]:
  """A .conll prediction file as sentences of split lines; checks the blank line after each."""
  text = path.read_text()
  assert text.endswith("\n\n"), "no blank line after the last sentence"
  header, _, text = text.partition("\n")
  assert header in ("# columns: word gold predicted exit_layer", "# columns: word predicted exit_layer"), header
  sentences, current = [], []
  for line in text.splitlines():
    if line == "":
      assert current, "two blank lines in a row"
      sentences.append(current)
      current = []
    else:
      current.append(line.split(" "))
  assert not current
  return sentences


def check_predictions(path: Path, gold_sentences, tag_set) -> list[list[list[str]]]:
  """One `word gold pred exit_layer` line per word, the gold column the fixture's tags."""
  got = read_predictions(path)
  assert len(got) == len(gold_sentences)
  for sent, gold in zip(got, gold_sentences):
    assert [len(cols) for cols in sent] == [4] * len(gold), sent
    assert [(c[0], c[1]) for c in sent] == gold
    assert {c[2] for c in sent} <= set(tag_set)
    layers = {c[3] for c in sent}
    assert len(layers) == 1 and 1 <= int(layers.pop()) <= LAYERS   # a sentence exits as a whole
  return got


class Run:
  def __init__(self, data: Path, splits: dict, run: Path, out: Path, code: int):
    self.data, self.splits, self.run, self.out = data, splits, run, out
    self.export = run / "export"
    self.infer_code = code

  def json(self, name: str):
    return json.loads((self.out / name).read_text())


@pytest.fixture(scope="module")
def ner(tmp_path_factory) -> Run:
  root = tmp_path_factory.mktemp("ner")
  data, splits = make_dir(root / "data", ner_sentences)
  run = root / "run"
  assert run_cli(train.main, [*TINY, "--task", "ner", "--data_dir", data, "--output_dir", run,
                              "--method", "romebert"]) == 0
  out = root / "infer"
  code = run_cli(infer.main, ["--checkpoint", run / "export", "--data_dir", data, "--split", "test",
                              "--output_dir", out, "--no_progress", "--latency_examples", "8",
                              "--thresholds", "0.1,0.3,1.0", "--measure_speed", "all", "--speed_repeats", "1"])
  return Run(data, splits, run, out, code)


def test_ner_infer_outputs(ner):
  assert ner.infer_code == 0
  per_exit = ner.json("per_exit.json")
  assert [r["exit"] for r in per_exit] == list(range(1, LAYERS + 1))
  for r in per_exit:
    assert {"f1", "precision", "recall"} <= set(r) and all(0 <= r[k] <= 100 for k in ("f1", "precision", "recall"))
  sweep = ner.json("sweep.json")
  assert [r["setting"] for r in sweep] == ["entropy<0.1", "entropy<0.3", "entropy<1"]
  for r in sweep:
    assert {"f1", "layer_ratio", "flops_ratio"} <= set(r)
    assert 1.0 <= r["layer_ratio"] <= LAYERS and r["flops_ratio"] > 0
  # H / log C < 1 for any non-uniform prediction: every sentence leaves at the first exit
  assert sweep[-1]["exit_shares"][0] == 1.0 and sweep[-1]["layer_ratio"] == LAYERS
  summary = ner.json("summary.json")
  assert summary["task"] == "ner" and summary["metric"] == "f1" and summary["examples"] == len(ner.splits["test"])
  per_type = summary["final_exit_per_type"]
  assert set(per_type) >= {"PER", "LOC"}
  assert all({"f1", "precision", "recall", "support"} <= set(v) for v in per_type.values())
  test_tags = [t for s in ner.splits["test"] for _, t in s]
  assert per_type["LOC"]["support"] == test_tags.count("B-LOC")
  speed = ner.json("speed.json")
  assert len(speed) == 3 and all(r["exits_match_offline"] is True for r in speed)


def test_ner_prediction_files(ner):
  names = {p.name for p in (ner.out / "predictions").iterdir()}
  assert names == {"entropy_lt_0.1.conll", "entropy_lt_0.3.conll", "entropy_lt_1.conll"}
  for name in names:
    check_predictions(ner.out / "predictions" / name, ner.splits["test"], NER_TAG_SET)
  first = read_predictions(ner.out / "predictions" / "entropy_lt_1.conll")
  assert all(c[3] == "1" for s in first for c in s)
  assert not list(ner.out.glob("predictions/*.tsv")) and not (ner.out / "submission").exists()


def test_export_label_names_are_the_tag_set(ner):
  model = MultiExitBert.from_pretrained(ner.export)
  info = model.export_info
  train_split = token_data.read_conll(ner.data / "train.txt")
  assert tuple(info.label_names) == token_data.tag_set(train_split) == NER_TAG_SET
  assert info.task == "ner" and info.method == "romebert" and info.primary_metric == "f1"
  assert model.config.head == "token" and model.config.num_labels == len(NER_TAG_SET)
  dev = info.dev_metrics["dev"]
  assert len(dev) == LAYERS and all("f1" in r for r in dev)


def test_i_tag_without_b_is_trained_and_scored(ner):
  """`the O / good I-PER` is in every split: training read it and the scorer counts it as a PER
  entity (conlleval: an I- after O begins an entity)."""
  assert ner.splits["train"][-1] == ORPHAN
  sents = read_predictions(ner.out / "predictions" / "entropy_lt_0.1.conll")
  assert [(c[0], c[1]) for c in sents[-1]] == ORPHAN
  test_tags = [t for s in ner.splits["test"] for _, t in s]
  assert ner.json("summary.json")["final_exit_per_type"]["PER"]["support"] == test_tags.count("B-PER") + 1


@pytest.mark.parametrize("method", ["joint_weighted", "final_only"])
def test_other_methods_train_token_exits(ner, tmp_path, method):
  run = tmp_path / "run"
  assert run_cli(train.main, [*TINY, "--task", "ner", "--data_dir", ner.data, "--output_dir", run,
                              "--method", method, "--gr", "none"]) == 0
  info = MultiExitBert.from_pretrained(run / "export").export_info
  assert info.method == method and tuple(info.label_names) == NER_TAG_SET
  assert [sorted(r) for r in info.dev_metrics["dev"]] == [["exit", "f1", "precision", "recall"]] * LAYERS
  evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert any(r["kind"] == "eval" for r in evals)


def test_pos_is_scored_by_accuracy(tmp_path):
  data, splits = make_dir(tmp_path / "data", pos_sentences)
  run, out = tmp_path / "run", tmp_path / "infer"
  assert run_cli(train.main, [*TINY, "--task", "pos", "--data_dir", data, "--output_dir", run,
                              "--gr", "none"]) == 0
  info = MultiExitBert.from_pretrained(run / "export").export_info
  assert tuple(info.label_names) == ("DT", "NN", "VB") and info.primary_metric == "accuracy"
  assert run_cli(infer.main, ["--checkpoint", run / "export", "--data_dir", data, "--split", "dev",
                              "--output_dir", out, "--no_progress", "--thresholds", "0.2",
                              "--measure_speed", "none"]) == 0
  per_exit = json.loads((out / "per_exit.json").read_text())
  assert [sorted(r) for r in per_exit] == [["accuracy", "exit"]] * LAYERS
  summary = json.loads((out / "summary.json").read_text())
  assert summary["metric"] == "accuracy" and "final_exit_per_type" not in summary
  assert "accuracy" in json.loads((out / "sweep.json").read_text())[0]
  check_predictions(out / "predictions" / "entropy_lt_0.2.conll", splits["dev"], ("DT", "NN", "VB"))


def test_json_lines_files(tmp_path):
  train_file = write_jsonl(tmp_path / "train.jsonl", ner_sentences(0, 60))
  dev = ner_sentences(1, 16)
  dev_file = write_jsonl(tmp_path / "dev.jsonl", dev)
  run, out = tmp_path / "run", tmp_path / "infer"
  assert run_cli(train.main, [*TINY, "--task", "ner", "--train_file", train_file, "--dev_file", dev_file,
                              "--output_dir", run, "--gr", "none"]) == 0
  info = MultiExitBert.from_pretrained(run / "export").export_info
  assert tuple(info.label_names) == NER_TAG_SET and len(info.dev_metrics["dev"]) == LAYERS
  assert run_cli(infer.main, ["--checkpoint", run / "export", "--data_file", dev_file, "--output_dir", out,
                              "--no_progress", "--thresholds", "0.2", "--measure_speed", "none"]) == 0
  assert json.loads((out / "summary.json").read_text())["examples"] == len(dev)
  check_predictions(out / "predictions" / "entropy_lt_0.2.conll", dev, NER_TAG_SET)
