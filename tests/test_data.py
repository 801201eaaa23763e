"""Tasks, loaders (GLUE TSV layouts, custom CSV / JSON Lines, synthetic), tokenising and batching."""

import json

import numpy as np
import pytest

from rome_flax.errors import RomeFlaxError
from rome_flax.kinds import data, synthetic, tasks


def write(path, lines):
  path.write_text("".join(line + "\n" for line in lines))
  return path


@pytest.fixture(scope="module")
def tokenizer():
  return synthetic.build_tokenizer()


def test_every_glue_task_is_known():
  for name in ("CoLA", "SST-2", "sst2", "MRPC", "QQP", "STS-B", "MNLI", "QNLI", "RTE", "WNLI", "synthetic"):
    spec = tasks.get_task(name)
    assert spec.num_labels >= 1 and spec.primary_metric in spec.metric_names
  assert tasks.get_task("mnli").eval_splits == ("dev_matched", "dev_mismatched")
  assert tasks.get_task("sts-b").is_regression
  assert tasks.get_task("mnli").protect_final and tasks.get_task("qqp").protect_final
  assert not tasks.get_task("sst-2").protect_final
  with pytest.raises(RomeFlaxError, match="unknown task"):
    tasks.get_task("sst3")


def test_cola_has_no_header(tmp_path):
  write(tmp_path / "train.tsv", ["gj04\t1\t\tThe dog barked.", "gj04\t0\t*\tDog the barked."])
  split = data.load_split(tasks.get_task("cola"), "train", str(tmp_path))
  assert split.texts_a == ["The dog barked.", "Dog the barked."] and split.labels.tolist() == [1, 0]
  assert split.texts_b is None


def test_sst2_and_test_split(tmp_path):
  write(tmp_path / "dev.tsv", ["sentence\tlabel", "a fine film \t1", "dull \t0"])
  write(tmp_path / "test.tsv", ["index\tsentence", "7\tsomething"])
  dev = data.load_split(tasks.get_task("sst-2"), "dev", str(tmp_path))
  test = data.load_split(tasks.get_task("sst-2"), "test", str(tmp_path))
  assert dev.labels.tolist() == [1, 0] and dev.texts_a[0] == "a fine film "
  assert test.labels is None and test.ids.tolist() == [7]


def test_mnli_pairs_and_names(tmp_path):
  header = "index\tpromptID\tpairID\tgenre\ts1bp\ts2bp\ts1p\ts2p\tsentence1\tsentence2\tlabel1\tgold_label"
  row = lambda i, lab: f"{i}\t1\t1\tfic\tx\tx\tx\tx\tpremise {i}\thypothesis {i}\t{lab}\t{lab}"
  write(tmp_path / "dev_mismatched.tsv", [header, row(0, "neutral"), row(1, "contradiction")])
  spec = tasks.get_task("mnli")
  split = data.load_split(spec, "dev_mismatched", str(tmp_path))
  assert split.texts_a == ["premise 0", "premise 1"] and split.texts_b == ["hypothesis 0", "hypothesis 1"]
  assert [spec.label_names[i] for i in split.labels] == ["neutral", "contradiction"]


def test_stsb_scores(tmp_path):
  header = "index\tgenre\tfilename\tyear\told_index\tsource1\tsource2\tsentence1\tsentence2\tscore"
  write(tmp_path / "train.tsv", [header, "0\tg\tf\t2012\t1\tn\tn\tA man.\tA person.\t4.250"])
  split = data.load_split(tasks.get_task("sts-b"), "train", str(tmp_path))
  assert split.labels.dtype == np.float32 and split.labels.tolist() == [4.25]


def test_bad_tsv_inputs_say_file_and_line(tmp_path):
  spec = tasks.get_task("qnli")
  with pytest.raises(RomeFlaxError, match="train.tsv is missing"):
    data.load_split(spec, "train", str(tmp_path))
  write(tmp_path / "dev.tsv", ["index\tquestion\tlabel", "0\tq\tentailment"])
  with pytest.raises(RomeFlaxError, match=r"dev.tsv:1: header has no column 'sentence'"):
    data.load_split(spec, "dev", str(tmp_path))
  write(tmp_path / "dev.tsv", ["index\tquestion\tsentence\tlabel", "0\tq\ts\tentailment", "1\tq\ts\tmaybe"])
  with pytest.raises(RomeFlaxError, match=r"dev.tsv:3: label 'maybe' is not one of"):
    data.load_split(spec, "dev", str(tmp_path))
  write(tmp_path / "dev.tsv", ["index\tquestion\tsentence\tlabel", "0\tq"])
  with pytest.raises(RomeFlaxError, match=r"dev.tsv:2: expected at least 4 columns"):
    data.load_split(spec, "dev", str(tmp_path))
  write(tmp_path / "dev.tsv", ["index\tquestion\tsentence\tlabel"])
  with pytest.raises(RomeFlaxError, match="empty"):
    data.load_split(spec, "dev", str(tmp_path))
  with pytest.raises(RomeFlaxError, match="not a directory"):
    data.load_split(spec, "dev", str(tmp_path / "nowhere"))


def test_custom_csv_and_jsonl(tmp_path):
  (tmp_path / "train.csv").write_text('review,stars\n"good, really",pos\nbad,neg\nfine,pos\n')
  with open(tmp_path / "dev.jsonl", "w") as f:
    for text, lab in [("nice", "pos"), ("awful", "neg")]:
      f.write(json.dumps({"review": text, "stars": lab}) + "\n")
  labels = data.custom_label_names(tmp_path / "train.csv", "stars")
  assert labels == ("neg", "pos")
  spec = tasks.get_task("custom", label_names=labels)
  kw = dict(files={"train": tmp_path / "train.csv", "dev": tmp_path / "dev.jsonl"}, text_a_column="review",
            label_column="stars")
  train = data.load_split(spec, "train", **kw)
  dev = data.load_split(spec, "dev", **kw)
  assert train.texts_a[0] == "good, really" and train.labels.tolist() == [1, 0, 1]
  assert dev.labels.tolist() == [1, 0]
  (tmp_path / "bad.jsonl").write_text('{"review": "x", "stars": "pos"}\n{"review": "y", "stars": "meh"}\n')
  with pytest.raises(RomeFlaxError, match=r"bad.jsonl:2: label 'meh'"):
    data.load_split(spec, "train", **{**kw, "files": {"train": tmp_path / "bad.jsonl"}})
  with pytest.raises(RomeFlaxError, match="no column 'text'"):
    data.load_split(spec, "train", **{**kw, "text_a_column": "text"})


def test_labels_are_read_by_value(tmp_path):
  """JSON 1, "1" and 1.0 (and a CSV's "1.0") are one class; booleans only where the label names list them."""
  rows = [1, "1", 1.0, 0, "0.0", " 0 "]
  (tmp_path / "train.jsonl").write_text("".join(json.dumps({"text": "x", "label": v}) + "\n" for v in rows))
  assert data.custom_label_names(tmp_path / "train.jsonl") == ("0", "1")
  files = {"train": tmp_path / "train.jsonl"}
  for names in (("0", "1"), ("0.0", "1.00")):
    spec = tasks.get_task("custom", label_names=names)
    assert data.load_split(spec, "train", files=files).labels.tolist() == [1, 1, 1, 0, 0, 0]
  (tmp_path / "bool.jsonl").write_text('{"text": "x", "label": true}\n{"text": "y", "label": false}\n')
  with pytest.raises(RomeFlaxError, match="bool.jsonl:1: label true is a boolean"):
    data.custom_label_names(tmp_path / "bool.jsonl")
  spec = tasks.get_task("custom", label_names=("False", "True"))
  assert data.load_split(spec, "train", files={"train": tmp_path / "bool.jsonl"}).labels.tolist() == [1, 0]


def test_synthetic_is_deterministic_and_balanced():
  a, ya = synthetic.make_split("train", size=400)
  b, yb = synthetic.make_split("train", size=400)
  assert a == b and (ya == yb).all() and 0.35 < ya.mean() < 0.65
  assert synthetic.make_split("dev", size=50)[0] != a[:50]


def encoded_fixture(tokenizer, n=103):
  # The long sentences of the first synthetic task (5-19 fillers): lengths that span two buckets, and
  # the bytes test_batches_are_pinned has pinned since then.
  texts, labels = synthetic.make_split("train", size=n, filler_words=(5, 19))
  split = data.Split("synthetic", "train", texts, None, labels, np.arange(n))
  return data.encode_split(tokenizer, split, max_length=24)


def test_batches_cover_every_example_once_with_fixed_shapes(tokenizer):
  enc = encoded_fixture(tokenizer)
  assert max(enc.lengths) <= 24
  got = list(data.batches(enc, 8, shuffle=True, seed=3, epoch=0))
  assert len(got) == data.num_batches(enc, 8) == 13
  ids = np.concatenate([b["example_ids"] for b in got])
  assert sorted(ids[ids >= 0].tolist()) == list(range(103)) and (ids < 0).sum() == 104 - 103
  for b in got:
    assert b["input_ids"].shape[0] == 8 and b["input_ids"].shape[1] in (16, 24)
    for row, i in enumerate(b["example_ids"]):
      if i >= 0:
        k = len(enc.input_ids[i])
        assert b["input_ids"][row, :k].tolist() == enc.input_ids[i].tolist()
        assert b["attention_mask"][row].sum() == k and b["labels"][row] == enc.labels[i]
      else:
        assert b["attention_mask"][row].sum() == 0


def test_shuffle_is_a_function_of_seed_and_epoch(tokenizer):
  enc = encoded_fixture(tokenizer)
  order = lambda **kw: np.concatenate([b["example_ids"] for b in data.batches(enc, 8, shuffle=True, **kw)])
  np.testing.assert_array_equal(order(seed=1, epoch=2), order(seed=1, epoch=2))
  assert not np.array_equal(order(seed=1, epoch=2), order(seed=1, epoch=3))
  assert not np.array_equal(order(seed=1, epoch=2), order(seed=2, epoch=2))
  # Resuming mid-epoch skips exactly the batches already seen.
  full = list(data.batches(enc, 8, shuffle=True, seed=1, epoch=0))
  rest = list(data.batches(enc, 8, shuffle=True, seed=1, epoch=0, start=5))
  assert all((a["input_ids"] == b["input_ids"]).all() for a, b in zip(full[5:], rest)) and len(rest) == 8


def test_pairs_get_token_types(tokenizer):
  split = data.Split("x", "dev", ["good film"], ["not bad"], np.array([1]), np.arange(1))
  enc = data.encode_split(tokenizer, split, max_length=16)
  assert enc.token_type_ids[0].tolist() == [0, 0, 0, 0, 1, 1, 1]
  (b,) = list(data.batches(enc, 2, shuffle=False))
  assert b["token_type_ids"][0, :7].tolist() == [0, 0, 0, 0, 1, 1, 1]


def test_batches_are_pinned(tokenizer):
  """Training reproducibility: this epoch's batches, byte for byte, as every earlier version made them."""
  import hashlib
  digest = hashlib.sha256()
  for b in data.batches(encoded_fixture(tokenizer), 8, shuffle=True, seed=3, epoch=1):
    for k in sorted(b):
      digest.update(k.encode() + str(b[k].dtype).encode() + str(b[k].shape).encode() + b[k].tobytes())
  assert digest.hexdigest() == "20b74302f6f02cdb507f9a1398c713fe2234eb8df8dedf388db8cfbceb331d18"


def test_bucket_length():
  assert [data.bucket_length(n, 128) for n in (0, 1, 16, 17, 33, 128)] == [16, 16, 16, 32, 64, 128]
  assert data.bucket_length(20, 24) == 24 and data.bucket_length(600, 1024) == 1024


def test_from_padded_and_pad_batch():
  ids = np.array([[5, 6, 7, 0], [8, 9, 0, 0], [4, 0, 0, 0]], np.int32)
  enc = data.EncodedSplit.from_padded(ids, ids > 0, labels=np.array([0.5, 1.5, 2.5], np.float32), pad_id=0)
  assert enc.lengths.tolist() == [3, 2, 1] and enc.max_length == 4 and enc.is_regression
  b = data.pad_batch(enc, np.array([1, 0]), 3)
  assert b["input_ids"].tolist() == [[8, 9, 0, 0], [5, 6, 7, 0], [0, 0, 0, 0]]   # bucket 16, capped at 4
  assert b["example_ids"].tolist() == [1, 0, -1] and b["labels"].tolist() == [1.5, 0.5, 0.0]
  b = data.pad_batch(enc, np.array([2]), 2, repeat_first=True)
  assert b["input_ids"].tolist() == [[4, 0, 0, 0], [4, 0, 0, 0]] and b["attention_mask"][1].tolist() == [1, 0, 0, 0]
  assert b["example_ids"].tolist() == [2, -1]
  assert len(enc.head(2)) == 2 and enc.head(2).labels.tolist() == [0.5, 1.5]
  with pytest.raises(RomeFlaxError, match="right padding"):
    data.EncodedSplit.from_padded(ids, np.array([[0, 1, 1, 0]] * 3))


def test_split_head():
  split = data.Split("x", "dev", ["a", "b", "c"], None, np.array([0, 1, 0]), np.array([7, 8, 9]))
  head = split.head(2)
  assert head.texts_a == ["a", "b"] and head.texts_b is None and head.ids.tolist() == [7, 8] and len(split) == 3
  with pytest.raises(RomeFlaxError):
    split.head(0)
