"""Token-classification readers: CoNLL columns, JSON Lines, data_dir / files / hub, tag sets."""

import json
import re

import numpy as np
import pytest

from rome_flax.errors import RomeFlaxError
from rome_flax.kinds import token_data as td

TWO_COL = """\
EU B-ORG
rejects O
German B-MISC
call O

Peter B-PER
Blackburn I-PER
"""

FOUR_COL = """\
-DOCSTART- -X- -X- O

EU NNP B-NP B-ORG
rejects VBZ B-VP O
German JJ B-NP B-MISC

Peter NNP B-NP B-PER
Blackburn NNP I-NP I-PER
"""


def write(path, text, mode="w"):
  if isinstance(text, bytes):
    path.write_bytes(text)
  else:
    path.write_text(text, newline="")
  return path


def jsonl(path, rows):
  path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
  return path


def err(path, line, text):
  """A match pattern for an error naming path:line."""
  return re.escape(f"{path}:{line}: ") + text


# ----------------------------------------------------------------------------- CoNLL


def test_two_column(tmp_path):
  p = write(tmp_path / "train.txt", TWO_COL)
  s = td.read_conll(p)
  assert len(s) == 2 and s.task == "ner" and s.split == "train"
  assert s.words == [["EU", "rejects", "German", "call"], ["Peter", "Blackburn"]]
  assert s.tags == [["B-ORG", "O", "B-MISC", "O"], ["B-PER", "I-PER"]]
  assert s.ids.dtype == np.int64 and s.ids.tolist() == [0, 1]
  assert s.lines.dtype == np.int64 and s.lines.tolist() == [1, 6]
  assert s.where(1) == f"{p}:6" and s.source == str(p)


def test_four_column_tag_column_and_docstart(tmp_path):
  p = write(tmp_path / "train.txt", FOUR_COL)
  ner = td.read_conll(p)
  assert ner.words == [["EU", "rejects", "German"], ["Peter", "Blackburn"]]
  assert ner.tags == [["B-ORG", "O", "B-MISC"], ["B-PER", "I-PER"]]
  assert ner.lines.tolist() == [3, 7]
  pos = td.read_conll(p, task="pos", tag_column=1)
  assert pos.tags == [["NNP", "VBZ", "JJ"], ["NNP", "NNP"]] and pos.task == "pos"
  assert td.read_conll(p, tag_column=2).tags[1] == ["B-NP", "I-NP"]


def test_blank_runs_crlf_tabs_and_docstart_mid_file(tmp_path):
  text = "\n\n-DOCSTART- O\n\n\na\tB-PER\r\nb  I-PER \r\n\r\n \t\n\n-DOCSTART- O\nc O\n-DOCSTART- O\nd O\n\n\n"
  s = td.read_conll(write(tmp_path / "x.txt", text))
  assert s.words == [["a", "b"], ["c"], ["d"]]
  assert s.tags == [["B-PER", "I-PER"], ["O"], ["O"]]
  assert s.lines.tolist() == [6, 12, 14]


def test_bom_and_no_trailing_newline(tmp_path):
  s = td.read_conll(write(tmp_path / "x.txt", b"\xef\xbb\xbfa O\nb B-LOC"))
  assert s.words == [["a", "b"]] and s.tags == [["O", "B-LOC"]]


def test_unlabelled_one_column(tmp_path):
  p = write(tmp_path / "test.txt", "-DOCSTART-\n\na\nb\n\nc\n")
  s = td.read_conll(p, "test")
  assert s.tags is None and s.words == [["a", "b"], ["c"]] and s.lines.tolist() == [3, 6]
  assert td.read_conll(p, "test", labelled=False).tags is None
  assert td.read_conll(write(tmp_path / "t2.txt", TWO_COL), labelled=False).tags is None
  with pytest.raises(RomeFlaxError, match=err(p, 3, "one column: no tag")):
    td.read_conll(p, labelled=True)


def test_head_and_rows(tmp_path):
  s = td.read_conll(write(tmp_path / "x.txt", "a O\n\nb B-PER\n\nc O\n"))
  h = s.head(2)
  assert h.words == [["a"], ["b"]] and h.tags == [["O"], ["B-PER"]] and h.lines.tolist() == [1, 3]
  r = s.rows(1, 3)
  assert r.words == [["b"], ["c"]] and r.ids.tolist() == [1, 2] and r.where(0) == s.where(1)
  with pytest.raises(RomeFlaxError, match="at least one"):
    s.head(0)


def test_conll_errors(tmp_path):
  p = write(tmp_path / "x.txt", "a B-PER\nb I-PER\n\nc NN O\n")
  with pytest.raises(RomeFlaxError, match=err(p, 4, r"expected 2 columns \(as on line 1\), found 3")):
    td.read_conll(p)
  p = write(tmp_path / "y.txt", "\n-DOCSTART- -X- -X- O\n\na NN B-NP O\nb O\n")
  with pytest.raises(RomeFlaxError, match=err(p, 5, r"expected 4 columns \(as on line 4\), found 2")):
    td.read_conll(p)
  p = write(tmp_path / "z.txt", "a O\nb\n")
  with pytest.raises(RomeFlaxError, match=err(p, 2, r"expected 2 columns \(as on line 1\), found 1")):
    td.read_conll(p)
  for text in ("", "\n\n", "-DOCSTART- O\n\n"):
    p = write(tmp_path / "e.txt", text)
    with pytest.raises(RomeFlaxError, match=re.escape(f"{p} has no sentences")):
      td.read_conll(p)
  p = write(tmp_path / "c.txt", "a O\n")
  with pytest.raises(RomeFlaxError, match=err(p, 1, "tag_column 3 is out of range for 2 columns")):
    td.read_conll(p, tag_column=3)
  with pytest.raises(RomeFlaxError, match=err(p, 1, "tag_column 0 and word_column 0 are the same column")):
    td.read_conll(p, tag_column=0)
  with pytest.raises(RomeFlaxError, match=re.escape(f"{tmp_path / 'nope.txt'} is missing")):
    td.read_conll(tmp_path / "nope.txt")


def test_non_utf8(tmp_path):
  p = write(tmp_path / "x.txt", b"a O\n\nb\xff O\n")
  with pytest.raises(RomeFlaxError, match=err(p, 3, "not UTF-8")):
    td.read_conll(p)


# ----------------------------------------------------------------------------- JSON Lines


def test_jsonl(tmp_path):
  p = jsonl(tmp_path / "train.jsonl", [{"tokens": ["EU", "rejects"], "tags": ["B-ORG", "O"], "id": 7}, "",
                                       {"tokens": ["Peter"], "tags": ["B-PER"]}])
  s = td.read_jsonl(p)
  assert s.words == [["EU", "rejects"], ["Peter"]] and s.tags == [["B-ORG", "O"], ["B-PER"]]
  assert s.lines.tolist() == [1, 3] and s.ids.tolist() == [0, 1] and s.where(1) == f"{p}:3"
  p = jsonl(tmp_path / "custom.json", [{"words": ["a", "b"], "labels": ["NN", "VB"]}])
  s = td.read_jsonl(p, task="pos", tokens_column="words", tags_column="labels")
  assert s.words == [["a", "b"]] and s.tags == [["NN", "VB"]] and s.task == "pos"
  p = jsonl(tmp_path / "test.jsonl", [{"tokens": ["a"]}, {"tokens": ["b"], "tags": ["O"]}])
  assert td.read_jsonl(p, "test").tags is None
  assert td.read_jsonl(jsonl(tmp_path / "l.jsonl", [{"tokens": ["a"], "tags": ["O"]}]), labelled=False).tags is None


@pytest.mark.parametrize("rows, line, message", [
    ([{"tokens": ["a"], "tags": ["O"]}, {"text": "a b"}], 2, r"no tokens column 'tokens' \(columns: text\)"),
    ([{"tokens": "a b", "tags": ["O"]}], 1, r"column 'tokens' must be a list of strings, found str"),
    ([{"tokens": ["a", 3], "tags": ["O", "O"]}], 1, r"token 1 in column 'tokens' is int 3, not a string"),
    ([{"tokens": [], "tags": []}], 1, "empty sentence"),
    ([{"tokens": ["a"], "tags": ["O"]}, {"tokens": ["a", "b"], "tags": ["O"]}], 2, "1 tags for 2 tokens"),
    ([{"tokens": ["a", ""], "tags": ["O", "O"]}], 1, r"token 1 in column 'tokens' is '': empty"),
    ([{"tokens": ["a b"], "tags": ["O"]}], 1, r"token 0 in column 'tokens' is 'a b': contains whitespace"),
    ([{"tokens": ["a\u00a0b"], "tags": ["O"]}], 1, r".*\\xa0b': contains whitespace"),
    ([{"tokens": ["a"], "tags": [0]}], 1, r"tag 0 in column 'tags' is int 0, not a string \(give tag names, not ids\)"),
    ([{"tokens": ["a"], "tags": ["O"]}, {"tokens": ["b"]}], 2, "no tags in column 'tags'"),
    ([{"tokens": ["a"], "tags": ["O"]}, "[1, 2]"], 2, "expected one JSON object per line"),
    ([{"tokens": ["a"], "tags": ["O"]}, "{oops"], 2, "not valid JSON"),
])
def test_jsonl_errors(tmp_path, rows, line, message):
  p = jsonl(tmp_path / "x.jsonl", rows)
  with pytest.raises(RomeFlaxError, match=err(p, line, message)):
    td.read_jsonl(p)


def test_jsonl_file_errors(tmp_path):
  p = jsonl(tmp_path / "x.jsonl", [{"tokens": ["a"]}])
  with pytest.raises(RomeFlaxError, match=err(p, 1, r"no tags column 'tags' \(columns: tokens\)")):
    td.read_jsonl(p, labelled=True)
  p = jsonl(tmp_path / "e.jsonl", ["", ""])
  with pytest.raises(RomeFlaxError, match=re.escape(f"{p} has no sentences")):
    td.read_jsonl(p)
  p = write(tmp_path / "b.jsonl", b'{"tokens": ["a"], "tags": ["O"]}\n{"tokens": ["\xff"]}\n')
  with pytest.raises(RomeFlaxError, match=err(p, 2, "not UTF-8")):
    td.read_jsonl(p)
  with pytest.raises(RomeFlaxError, match="read_jsonl reads .jsonl"):
    td.read_jsonl(write(tmp_path / "x.txt", "a O\n"))


# ----------------------------------------------------------------------------- loading


def test_data_dir(tmp_path):
  write(tmp_path / "train.txt", TWO_COL)
  write(tmp_path / "valid.txt", "a O\n")
  write(tmp_path / "testb.txt", "-DOCSTART-\n\nb\n")
  train = td.load_token_split("train", data_dir=str(tmp_path))
  assert len(train) == 2 and train.split == "train"
  dev = td.load_token_split("dev", data_dir=str(tmp_path))
  assert dev.words == [["a"]] and dev.source == str(tmp_path / "valid.txt")
  test = td.load_token_split("test", data_dir=str(tmp_path))
  assert test.tags is None and test.words == [["b"]]
  write(tmp_path / "dev.txt", "c O\n")   # the primary name wins
  assert td.load_token_split("dev", data_dir=str(tmp_path)).words == [["c"]]
  write(tmp_path / "dev.txt", "c\n")     # train and dev must be labelled
  with pytest.raises(RomeFlaxError, match=err(tmp_path / "dev.txt", 1, "one column: no tag")):
    td.load_token_split("dev", data_dir=str(tmp_path))
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(RomeFlaxError, match=r"has no dev file \(looked for dev.txt, valid.txt, testa.txt\)"):
    td.load_token_split("dev", data_dir=str(empty))
  with pytest.raises(RomeFlaxError, match="is not a directory"):
    td.load_token_split("train", data_dir=str(tmp_path / "nope"))
  with pytest.raises(RomeFlaxError, match="give one of data_dir, files, hub_name"):
    td.load_token_split("train")
  with pytest.raises(RomeFlaxError, match="give one of"):
    td.load_token_split("train", data_dir=str(tmp_path), hub_name="conll2003")


def test_files(tmp_path):
  files = {"train": str(write(tmp_path / "a.conll", FOUR_COL)),
           "dev": str(jsonl(tmp_path / "b.jsonl", [{"words": ["x"], "ner": ["B-PER"]}]))}
  train = td.load_token_split("train", files=files, task="pos", tag_column=1)
  assert train.tags[0] == ["NNP", "VBZ", "JJ"] and train.task == "pos"
  dev = td.load_token_split("dev", files=files, tokens_column="words", tags_column="ner")
  assert dev.words == [["x"]] and dev.tags == [["B-PER"]]
  with pytest.raises(RomeFlaxError, match="no file given for split 'test'"):
    td.load_token_split("test", files=files)


def _fake_hub(monkeypatch, tokens, tags, *, fail=None, seen=None):
  import datasets
  features = datasets.Features({
      "id": datasets.Value("string"),
      "tokens": datasets.Sequence(datasets.Value("string")),
      "pos_tags": datasets.Sequence(datasets.ClassLabel(names=["NN", "VB"])),
      "ner_tags": datasets.Sequence(datasets.ClassLabel(names=["O", "B-PER", "I-PER"])),
  })

  def load_dataset(name, split=None, **kw):
    if fail:
      raise ConnectionError(fail)
    if seen is not None:
      seen.append((name, split))
    return datasets.Dataset.from_dict(
        {"id": [str(i) for i in range(len(tokens))], "tokens": tokens, "ner_tags": tags,
         "pos_tags": [[i % 2 for i in range(len(t))] for t in tokens]}, features=features)

  monkeypatch.setattr(datasets, "load_dataset", load_dataset)


def test_hub(monkeypatch):
  seen = []
  _fake_hub(monkeypatch, [["Peter", "Blackburn", "runs"], [], ["x"]], [[1, 2, 0], [], [0]], seen=seen)
  dev = td.load_token_split("dev", hub_name="conll2003")
  assert seen == [("conll2003", "validation")]
  assert dev.words == [["Peter", "Blackburn", "runs"], ["x"]]   # the empty row is no sentence
  assert dev.tags == [["B-PER", "I-PER", "O"], ["O"]]
  assert dev.source == "hub:conll2003/validation" and dev.where(1) == "hub:conll2003/validation:3"
  pos = td.load_token_split("train", hub_name="conll2003", task="pos")
  assert pos.tags[0] == ["NN", "VB", "NN"] and seen[-1] == ("conll2003", "train")
  assert td.tag_set(pos) == ("NN", "VB")


def test_hub_offline(monkeypatch):
  _fake_hub(monkeypatch, [], [], fail="Couldn't reach the hub\nmore detail")
  with pytest.raises(RomeFlaxError, match=r"^cannot load conll2003 from the hub \(Couldn't reach the hub\); "
                                          r"pass --data_dir") as e:
    td.load_token_split("train", hub_name="conll2003")
  assert "\n" not in str(e.value)


# ----------------------------------------------------------------------------- tag sets


def test_tag_set_order(tmp_path):
  text = "a I-PER\nb B-LOC\nc O\nd S-MISC\ne E-MISC\nf I-LOC\ng B-PER\nh B-MISC\ni I-MISC\n"
  s = td.read_conll(write(tmp_path / "x.txt", text))
  assert td.tag_set(s) == ("O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "E-MISC", "S-MISC", "B-PER", "I-PER")
  pos = td.read_conll(write(tmp_path / "p.txt", "a VB\nb NN\nc DT\n\nd NN\n"))
  assert td.tag_set(pos) == ("DT", "NN", "VB")
  assert td.tag_set(td.read_conll(write(tmp_path / "n.txt", "a B-PER\nb I-PER\n"))) == ("B-PER", "I-PER")


def test_tag_set_errors(tmp_path):
  with pytest.raises(RomeFlaxError, match="unlabelled"):
    td.tag_set(td.read_conll(write(tmp_path / "u.txt", "a\n"), "test"))
  with pytest.raises(RomeFlaxError, match=r"fewer than two distinct tags \(O\)"):
    td.tag_set(td.read_conll(write(tmp_path / "o.txt", "a O\n\nb O\n")))


def test_tag_ids(tmp_path):
  train = td.read_conll(write(tmp_path / "train.txt", TWO_COL))
  names = td.tag_set(train)
  ids = td.tag_ids(train, names)
  assert [x.dtype for x in ids] == [np.int32, np.int32]
  assert [[names[i] for i in x] for x in ids] == train.tags
  dev = write(tmp_path / "dev.txt", "-DOCSTART- O\n\na O\n\nb O\nc B-PER\nd B-LOC\n")
  with pytest.raises(RomeFlaxError, match=err(dev, 7, re.escape(
      "tag 'B-LOC' is not in the training tag set (O, B-MISC, B-ORG, B-PER, I-PER)"))):
    td.tag_ids(td.read_conll(dev), names)
  dj = jsonl(tmp_path / "dev.jsonl", [{"tokens": ["a"], "tags": ["O"]}, {"tokens": ["b", "c"], "tags": ["O", "X"]}])
  with pytest.raises(RomeFlaxError, match=err(dj, 2, "tag 'X' is not in the training tag set")):
    td.tag_ids(td.read_jsonl(dj), names)
  with pytest.raises(RomeFlaxError, match="unlabelled"):
    td.tag_ids(td.read_conll(write(tmp_path / "t.txt", "a\n"), "test"), names)
  # a chunk keeps its lines: the error still names the word's line
  with pytest.raises(RomeFlaxError, match=err(dev, 7, "tag 'B-LOC'")):
    td.tag_ids(td.read_conll(dev).rows(1, 2), names)
