"""Reading, tokenising and batching a task's examples.

Sources: the hub's `glue` dataset (online), a directory of GLUE TSV files (`data_dir`), CSV / JSON
Lines files for a custom task, and the embedded synthetic task. Batches have fixed shapes per
length bucket (so jit compiles a handful of programs) and a deterministic order from (seed, epoch).
"""

from __future__ import annotations

import codecs
import csv
import dataclasses
import functools
import json
import math
import re
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from rome_flax.errors import RomeFlaxError
from rome_flax.kinds import synthetic
from rome_flax.kinds.tasks import TaskSpec

BUCKETS = (16, 32, 64, 128, 256, 512)
SORT_WINDOW = 50    # batches whose examples are sorted by length together before batching


@dataclasses.dataclass
class Split:
  """One split's raw examples. `labels` is None for an unlabelled (test) split."""
  task: str
  split: str
  texts_a: list[str]
  texts_b: Optional[list[str]]
  labels: Optional[np.ndarray]      # int64 label ids, or float32 scores for regression
  ids: np.ndarray                   # the file's example index (GLUE 'index'/'id'), else the row number

  def __len__(self) -> int:
    return len(self.texts_a)

  def head(self, n: int) -> "Split":
    """The first n examples (quick checks)."""
    return _head(self, n, ("texts_a", "texts_b", "labels", "ids"))

  def rows(self, start: int, stop: int) -> "Split":
    """Examples start..stop-1 (a chunk of a stream)."""
    fields = ("texts_a", "texts_b", "labels", "ids")
    return dataclasses.replace(self, **{f: getattr(self, f)[start:stop] for f in fields if getattr(self, f) is not None})


@dataclasses.dataclass
class EncodedSplit:
  """Token ids per example (ragged, truncated to max_length) plus labels: the one encoded form of a
  split, batched by `batches` for training and evaluation and by `inference.plan` for inference.

  A token task (sequence labelling) also has `word_starts`: per example, the position of each
  word's first piece, where its tag is read and its logits are taken; its `labels` are [N, W] tag
  ids, W the most words of an example, -1 past an example's last word.
  """
  input_ids: list[np.ndarray]
  token_type_ids: list[np.ndarray]
  labels: Optional[np.ndarray]
  max_length: int
  pad_id: int
  is_regression: bool
  word_starts: Optional[list[np.ndarray]] = None

  def __len__(self) -> int:
    return len(self.input_ids)

  @property
  def is_token_task(self) -> bool:
    return self.word_starts is not None

  @property
  def num_words(self) -> np.ndarray:
    """Words per example (token tasks)."""
    return np.fromiter((len(x) for x in self.word_starts), np.int64, len(self.word_starts))

  @property
  def max_words(self) -> int:
    return int(self.num_words.max()) if len(self) else 0

  @property
  def word_mask(self) -> np.ndarray:
    """[N, W] bool: which word slots of `labels` (and of word-level logits) are words."""
    return np.arange(self.max_words)[None, :] < self.num_words[:, None]

  @property
  def lengths(self) -> np.ndarray:
    return np.fromiter((len(x) for x in self.input_ids), np.int64, len(self.input_ids))

  def head(self, n: int) -> "EncodedSplit":
    """The first n examples."""
    out = _head(self, n, ("input_ids", "token_type_ids", "labels", "word_starts"))
    if out.is_token_task and out.labels is not None:
      out.labels = out.labels[:, :out.max_words]
    return out

  @classmethod
  def from_padded(cls, input_ids, attention_mask, token_type_ids=None, labels=None, pad_id: int = 0,
                  is_regression: Optional[bool] = None) -> "EncodedSplit":
    """A split from right-padded [N, S] arrays (tests, benchmarks, already tokenised data).

    Each row keeps the tokens its attention mask covers; max_length is S.
    """
    ids_NxS = np.asarray(input_ids, np.int32)
    mask_NxS = np.asarray(attention_mask)
    if ids_NxS.ndim != 2 or mask_NxS.shape != ids_NxS.shape:
      raise RomeFlaxError(f"input_ids and attention_mask must be [N, S] arrays of one shape, got "
                          f"{ids_NxS.shape} and {mask_NxS.shape}")
    types_NxS = np.zeros_like(ids_NxS) if token_type_ids is None else np.asarray(token_type_ids, np.int32)
    length_N = (mask_NxS != 0).sum(1)
    if not np.array_equal(mask_NxS != 0, np.arange(ids_NxS.shape[1])[None] < length_N[:, None]):
      raise RomeFlaxError("attention_mask must be right padding: ones, then zeros, in every row")
    labels = None if labels is None else np.asarray(labels)
    return cls([ids_NxS[r, :k] for r, k in enumerate(length_N)], [types_NxS[r, :k] for r, k in enumerate(length_N)],
               labels, ids_NxS.shape[1], int(pad_id), _is_regression(labels, is_regression))


def _head(split, n: int, fields: tuple[str, ...]):
  if n < 1:
    raise RomeFlaxError(f"need at least one example, got {n}")
  return dataclasses.replace(split, **{f: getattr(split, f)[:n] for f in fields if getattr(split, f) is not None})


def _is_regression(labels: Optional[np.ndarray], is_regression: Optional[bool]) -> bool:
  """The caller's word, else float labels mean regression."""
  if is_regression is not None:
    return bool(is_regression)
  return labels is not None and labels.dtype.kind == "f"


# ----------------------------------------------------------------------------- loading


def load_split(task: TaskSpec, split: str, data_dir: Optional[str] = None, **custom) -> Split:
  """Examples of `split` ('train', 'dev', 'dev_matched', 'test', ...) of `task`.

  GLUE tasks read `data_dir` (GLUE TSV layout) when given, else the hub's `glue` dataset.
  Custom tasks take `files={'train': path, ...}`, `text_a_column`, `text_b_column`, `label_column`.
  The synthetic task takes `seed`, `size` and `filler_words`.
  """
  if "files" in custom:   # a user's file, whatever the task (its labels must be the task's)
    out = _load_custom(task, split, **custom)
  elif task.name == "synthetic":
    if data_dir is not None:
      raise RomeFlaxError("task synthetic is generated, not read: drop data_dir")
    texts, labels = synthetic.make_split(split, seed=custom.get("seed", 0), size=custom.get("size"),
                                         filler_words=tuple(custom.get("filler_words", synthetic.FILLER_WORDS)))
    out = Split(task.name, split, texts, None, labels if split != "test" else None, np.arange(len(texts)))
  elif data_dir is not None:
    out = _load_tsv(task, split, Path(data_dir))
  else:
    out = _load_hub(task, split)
  if len(out) == 0:
    raise RomeFlaxError(f"split {split!r} of task {task.name} is empty")
  return out


_LONE_CR = re.compile(rb"(?<=\r)(?!\n)")


def text_lines(path: Path) -> Iterator[str]:
  """The lines of a UTF-8 text file, each with its line ending (a leading BOM dropped). A byte that
  is not UTF-8, or a file that cannot be read, is one RomeFlaxError naming the file and line."""
  try:
    f = open(path, "rb")
  except FileNotFoundError:
    raise RomeFlaxError(f"{path} is missing") from None
  except IsADirectoryError:
    raise RomeFlaxError(f"{path} is a directory, not a data file") from None
  except OSError as e:
    raise RomeFlaxError(f"cannot read {path}: {e.strerror or e}") from None
  with f:
    n = 0
    try:
      for chunk in f:
        # A lone '\r' ends a line too (old Mac files), as in Python's own universal newlines.
        for raw in (_LONE_CR.split(chunk) if b"\r" in chunk else (chunk,)):
          if not raw:
            continue
          n += 1
          if n == 1 and raw.startswith(codecs.BOM_UTF8):
            raw = raw[len(codecs.BOM_UTF8):]
          try:
            yield raw.decode("utf-8")
          except UnicodeDecodeError as e:
            column = len(raw[:e.start].decode("utf-8", errors="replace")) + 1
            raise RomeFlaxError(f"{path}:{n}: not UTF-8 text (byte 0x{raw[e.start]:02x} at column {column}); "
                                "save the file as UTF-8") from None
    except OSError as e:
      raise RomeFlaxError(f"cannot read {path} (line {n + 1}): {e.strerror or e}") from None


def _read_tsv_rows(path: Path) -> list[list[str]]:
  if not path.is_file():
    raise RomeFlaxError(f"{path} is {'a directory' if path.is_dir() else 'missing'} (expected the GLUE TSV "
                        f"layout in {path.parent})")
  return [line.rstrip("\r\n").split("\t") for line in text_lines(path)]


def _load_tsv(task: TaskSpec, split: str, data_dir: Path) -> Split:
  if not data_dir.is_dir():
    raise RomeFlaxError(f"data_dir {data_dir} is not a directory")
  if not task.tsv:
    raise RomeFlaxError(f"task {task.name} has no TSV layout; drop data_dir")
  layout = task.tsv_layout(split)
  path = data_dir / layout.file
  rows = _read_tsv_rows(path)
  first_line = 1
  if layout.header:
    if not rows:
      raise RomeFlaxError(f"{path} is empty (expected a header line)")
    header, rows, first_line = rows[0], rows[1:], 2
  cols = {}
  for field in ("text_a", "text_b", "label", "index"):
    col = getattr(layout, field)
    if col is None or isinstance(col, int):
      cols[field] = col
    elif col in header:
      cols[field] = header.index(col)
    elif field == "index":
      cols[field] = None
    else:
      raise RomeFlaxError(f"{path}:1: header has no column {col!r} (columns: {', '.join(header)})")
  return _rows_to_split(task, split, rows, cols, f"{path}", first_line)


def _rows_to_split(task: TaskSpec, split: str, rows, cols: dict, where: str, first_line: int) -> Split:
  need = max(c for c in cols.values() if c is not None) + 1
  texts_a, texts_b, labels, ids = [], [], [], []
  for n, row in enumerate(rows):
    line = first_line + n
    if len(row) == 1 and not row[0].strip():
      continue  # blank line (e.g. a trailing newline)
    if len(row) < need:
      raise RomeFlaxError(f"{where}:{line}: expected at least {need} columns, found {len(row)}")
    texts_a.append(str(row[cols["text_a"]]))
    if cols["text_b"] is not None:
      texts_b.append(str(row[cols["text_b"]]))
    if cols["label"] is not None:
      labels.append(_parse_label(task, row[cols["label"]], where, line))
    ids.append(_parse_id(row[cols["index"]]) if cols["index"] is not None else len(ids))
  lab = None
  if cols["label"] is not None:
    lab = np.asarray(labels, np.float32 if task.is_regression else np.int64)
  return Split(task.name, split, texts_a, texts_b if cols["text_b"] is not None else None, lab,
               np.asarray(ids, np.int64))


def label_text(raw) -> str:
  """A class label by value, as one name: JSON 1, 1.0 and "1" (or a CSV's "1.0") are all "1", 0.5
  and "0.50" are "0.5"; other text is itself (stripped). A boolean is "true" / "false"."""
  if isinstance(raw, bool):
    return "true" if raw else "false"
  if isinstance(raw, (int, float)):
    value = raw
  else:
    text = str(raw).strip()
    try:
      value = int(text)   # exact first: a long integer id must not round through float
    except ValueError:
      try:
        value = float(text)
      except ValueError:
        return text
    if not math.isfinite(value) or "_" in text:   # 'nan', 'inf', '1_0' are names, not numbers
      return text
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  return str(value) if isinstance(value, int) else repr(float(value))


def _label_key(raw) -> str:
  text = label_text(raw)
  return text.lower() if text.lower() in ("true", "false") else text


@functools.lru_cache(maxsize=64)
def _label_ids(label_names: tuple) -> dict:
  """_label_key -> the ids of the label names with that value (more than one: ambiguous)."""
  ids: dict = {}
  for i, name in enumerate(label_names):
    ids.setdefault(_label_key(name), []).append(i)
  return ids


def _json_form(raw) -> str:
  return json.dumps(raw) if isinstance(raw, (bool, int, float)) else repr(raw)


def _parse_label(task: TaskSpec, raw, where: str, line: int):
  """A label's id (classification: matched by value, `label_text`) or its value (regression)."""
  boolean = isinstance(raw, bool)
  if task.is_regression:
    try:
      value = float("nan") if boolean else float(raw)
    except (TypeError, ValueError):
      value = float("nan")
    if not math.isfinite(value):
      raise RomeFlaxError(f"{where}:{line}: label {_json_form(raw)} is not a number")
    return value
  ids = _label_ids(tuple(task.label_names)).get(_label_key(raw))
  if ids is None and boolean:
    raise RomeFlaxError(f"{where}:{line}: label {_json_form(raw)} is a boolean, which is a label only when the "
                        f"label names list it (e.g. --custom_labels false,true); the labels are {list(task.label_names)}")
  if ids is None:
    raise RomeFlaxError(f"{where}:{line}: label {raw!r} is not one of {list(task.label_names)}")
  if len(ids) > 1:
    raise RomeFlaxError(f"{where}:{line}: label {_json_form(raw)} matches label names "
                        f"{', '.join(repr(task.label_names[i]) for i in ids)}, which denote the same value; "
                        "name each class once")
  return ids[0]


def _parse_id(raw) -> int:
  try:
    return int(raw)
  except (TypeError, ValueError):
    return -1


def _load_hub(task: TaskSpec, split: str) -> Split:
  if task.hf_name is None:
    raise RomeFlaxError(f"task {task.name} has no hub dataset; pass data_dir or files")
  hub_split = dict(task.hf_splits).get(split)
  if hub_split is None:
    raise RomeFlaxError(f"task {task.name} has no split {split!r}; splits: {', '.join(dict(task.hf_splits))}")
  try:
    import datasets
    ds = datasets.load_dataset("nyu-mll/glue", task.hf_name, split=hub_split)
  except Exception as e:  # offline, or the hub refused: one line that says what to do instead
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise RomeFlaxError(f"cannot load glue/{task.hf_name} from the hub ({msg}); pass --data_dir with the "
                        "GLUE TSV files") from None
  text_cols = [c for c in ds.column_names if c not in ("label", "idx")]
  hub_labels = ds.features["label"]
  labels = np.asarray(ds["label"])
  if split.startswith("test") or (labels < 0).all():   # the hub marks unlabelled rows with -1
    labels = None
  elif not task.is_regression:
    # Map the hub's label ids onto this task's label order by name.
    names = [hub_labels.int2str(i) for i in range(hub_labels.num_classes)]
    remap = np.asarray([task.label_names.index(n) if n in task.label_names else i for i, n in enumerate(names)])
    labels = remap[labels]
  else:
    labels = labels.astype(np.float32)
  return Split(task.name, split, list(ds[text_cols[0]]), list(ds[text_cols[1]]) if len(text_cols) > 1 else None,
               labels, np.asarray(ds["idx"], np.int64))


def _load_custom(task: TaskSpec, split: str, files: dict, **columns) -> Split:
  return concat_splits(list(iter_custom(task, split, files, **columns)))


def iter_custom(task: TaskSpec, split: str, files: dict, text_a_column: str = "text",
                text_b_column: Optional[str] = None, label_column: Optional[str] = "label",
                chunk_rows: int = 8192, **_) -> Iterator[Split]:
  """A custom split's file as Splits of up to `chunk_rows` examples, read as a stream: memory holds one
  chunk's rows, whatever the file's size (`stream_split`; `load_split` joins the chunks)."""
  if split not in files or files[split] is None:
    raise RomeFlaxError(f"no file given for split {split!r} of the custom task")
  path = Path(files[split])
  if not path.is_file():
    raise RomeFlaxError(f"{path} is {'a directory, not a data file' if path.is_dir() else 'missing'}")
  has_label, count = None, 0
  texts_a, texts_b, labels, ids = [], [], [], []

  def chunk() -> Split:
    lab = np.asarray(labels, np.float32 if task.is_regression else np.int64) if has_label else None
    return Split(task.name, split, texts_a, texts_b if text_b_column else None, lab, np.asarray(ids, np.int64))

  for line, rec in iter_records(path):
    if has_label is None:   # the first row names the columns
      keys = [k for k in rec if k is not None]
      for col in (text_a_column, text_b_column):
        if col is not None and col not in keys:
          raise RomeFlaxError(f"{path}: no column {col!r} (columns: {', '.join(keys)})")
      has_label = label_column is not None and label_column in keys
      if not has_label and not split.startswith("test"):
        raise RomeFlaxError(f"{path}: no label column {label_column!r} (columns: {', '.join(keys)})")
    for col in (text_a_column, text_b_column, label_column if has_label else None):
      if col is not None and rec.get(col) is None:
        raise RomeFlaxError(f"{path}:{line}: missing value in column {col!r}")
    texts_a.append(str(rec[text_a_column]))
    if text_b_column is not None:
      texts_b.append(str(rec[text_b_column]))
    if has_label:
      labels.append(_parse_label(task, rec[label_column], str(path), line))
    ids.append(count)
    count += 1
    if len(texts_a) == chunk_rows:
      yield chunk()
      texts_a, texts_b, labels, ids = [], [], [], []
  if count == 0:
    raise RomeFlaxError(f"{path} has no rows")
  if texts_a:
    yield chunk()


def concat_splits(chunks: list[Split]) -> Split:
  """One Split from consecutive chunks of one split."""
  first = chunks[0]
  join = lambda field: None if getattr(first, field) is None else \
      [x for c in chunks for x in getattr(c, field)]
  return Split(first.task, first.split, join("texts_a"), join("texts_b"),
               None if first.labels is None else np.concatenate([c.labels for c in chunks]),
               np.concatenate([c.ids for c in chunks]))


def stream_split(task: TaskSpec, split: str, data_dir: Optional[str] = None, chunk_rows: int = 8192,
                 **custom) -> Iterator[Split]:
  """`load_split` as an iterator of Splits of up to `chunk_rows` examples. A custom file is read as a
  stream (memory holds one chunk); GLUE, hub and synthetic splits are bounded and read whole."""
  if "files" in custom and task.name != "synthetic":
    yield from iter_custom(task, split, chunk_rows=chunk_rows, **custom)
    return
  whole = load_split(task, split, data_dir, **custom)
  for start in range(0, len(whole), chunk_rows):
    yield whole.rows(start, start + chunk_rows)


def read_records(path: Path) -> list[tuple[int, dict]]:
  """(line number, row dict) of a .csv / .tsv (header row) or .jsonl / .json (one object per line) file."""
  return list(iter_records(path))


def iter_records(path: Path) -> Iterator[tuple[int, dict]]:
  """`read_records` as a stream, one row at a time."""
  suffix = path.suffix.lower()
  if suffix in (".jsonl", ".json"):
    for n, line in enumerate(text_lines(path), 1):
      if not line.strip():
        continue
      try:
        rec = json.loads(line)
      except json.JSONDecodeError as e:
        raise RomeFlaxError(f"{path}:{n}: not valid JSON ({e.msg})") from None
      except RecursionError:
        raise RomeFlaxError(f"{path}:{n}: JSON nested too deeply") from None
      if not isinstance(rec, dict):
        raise RomeFlaxError(f"{path}:{n}: expected one JSON object per line")
      yield n, rec
    return
  if suffix in (".csv", ".tsv"):
    reader = csv.DictReader(text_lines(path), delimiter="\t" if suffix == ".tsv" else ",")
    try:
      for row in reader:
        yield reader.line_num, row
      return
    except csv.Error as e:
      raise RomeFlaxError(f"{path}:{reader.line_num}: not valid {suffix[1:].upper()} ({e})") from None
  raise RomeFlaxError(f"{path}: unsupported file type {suffix!r} (use .csv, .tsv, .jsonl)")


def custom_label_names(path: str | Path, label_column: str = "label") -> tuple[str, ...]:
  """Sorted distinct labels of a custom training file (the label set when the user gives none)."""
  records = read_records(Path(path))
  if records and not any(label_column in rec for _, rec in records):
    columns = ", ".join(str(k) for k in records[0][1] if k is not None)
    raise RomeFlaxError(f"{path}: no label column {label_column!r} (columns: {columns}); name it with "
                        "label_column")
  for line, rec in records:
    if rec.get(label_column) is None:
      raise RomeFlaxError(f"{path}:{line}: missing value in column {label_column!r}")
    if isinstance(rec[label_column], bool):
      raise RomeFlaxError(f"{path}:{line}: label {_json_form(rec[label_column])} is a boolean; name the labels with "
                          "custom_labels (e.g. --custom_labels false,true) to use booleans as classes")
  names = sorted({label_text(rec[label_column]) for _, rec in records})   # 1, 1.0 and "1": one class
  if len(names) < 2:
    raise RomeFlaxError(f"{path}: column {label_column!r} has fewer than two distinct labels")
  return tuple(names)


# ----------------------------------------------------------------------------- tokenising


def encode_split(tokenizer, split: Split, max_length: int, is_regression: Optional[bool] = None) -> EncodedSplit:
  """Tokenises single sentences or pairs with the model's tokenizer, truncated to max_length."""
  if tokenizer is None:
    raise RomeFlaxError("the model has no tokenizer: use a checkpoint directory with tokenizer files")
  if max_length < 8:
    raise RomeFlaxError(f"max_length must be at least 8, got {max_length}")
  enc = tokenizer(split.texts_a, split.texts_b, truncation=True, max_length=max_length,
                  return_token_type_ids=True, return_attention_mask=False)
  ids = [np.asarray(x, np.int32) for x in enc["input_ids"]]
  types = [np.asarray(x, np.int32) for x in enc["token_type_ids"]]
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  return EncodedSplit(ids, types, split.labels, max_length, int(pad_id), _is_regression(split.labels, is_regression))


def encode_token_split(tokenizer, words: list[list[str]], tag_ids: Optional[list[np.ndarray]], max_length: int,
                       where=None) -> EncodedSplit:
  """Sentences given as words (sequence labelling) -> word pieces, each word's tag on its first piece.

  Each sentence is `[CLS] pieces [SEP]`, its words tokenised on their own (the fast tokenizer's
  word alignment); a word that tokenises to nothing (a stray control character) is read as the
  unknown token, so that every word has a first piece and a prediction. A sentence longer than
  max_length pieces is refused, never cut: `where(i)` names it (file and line) and the error says
  how many pieces it needs. tag_ids: per sentence, its words' tag ids (None: unlabelled).
  """
  if tokenizer is None:
    raise RomeFlaxError("the model has no tokenizer: use a checkpoint directory with tokenizer files")
  if not getattr(tokenizer, "is_fast", False):
    raise RomeFlaxError("sequence labelling needs a fast tokenizer (tokenizer.json or a vocab a fast one loads)")
  if max_length < 8:
    raise RomeFlaxError(f"max_length must be at least 8, got {max_length}")
  where = where or (lambda i: f"sentence {i + 1}")
  enc = tokenizer(words, is_split_into_words=True, truncation=False, return_token_type_ids=True,
                  return_attention_mask=False)
  ids, types, starts = [], [], []
  for i in range(len(words)):
    word_ids, piece_ids = enc.word_ids(i), enc["input_ids"][i]
    first = _first_pieces(word_ids, len(words[i]))
    if first is None:   # some word has no piece: read those as the unknown token
      # the unknown token of the tokenizer's config, else of its vocabulary model (artefact_runtime.py's rule too)
      unk = tokenizer.unk_token or getattr(tokenizer.backend_tokenizer.model, "unk_token", None)
      fixed = [w if any(tokenizer.tokenize(w)) else (unk or w) for w in words[i]]
      one = tokenizer([fixed], is_split_into_words=True, truncation=False, return_token_type_ids=True,
                      return_attention_mask=False)
      word_ids, piece_ids = one.word_ids(0), one["input_ids"][0]
      first = _first_pieces(word_ids, len(words[i]))
      if first is None:
        raise RomeFlaxError(f"{where(i)}: a word of this sentence has no word piece in the model's vocabulary")
      types_i = one["token_type_ids"][0]
    else:
      types_i = enc["token_type_ids"][i]
    if len(piece_ids) > max_length:
      raise RomeFlaxError(f"{where(i)}: a sentence of {len(words[i])} words is {len(piece_ids)} word pieces, more "
                          f"than max_length {max_length}; raise --max_length (sentences are never cut; infer.py "
                          "--truncate keeps the words that fit)")
    ids.append(np.asarray(piece_ids, np.int32))
    types.append(np.asarray(types_i, np.int32))
    starts.append(first)
  labels = None
  if tag_ids is not None:
    W = max((len(w) for w in words), default=0)
    labels = np.full((len(words), W), -1, np.int32)
    for i, t in enumerate(tag_ids):
      labels[i, :len(t)] = t
  pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
  return EncodedSplit(ids, types, labels, max_length, int(pad_id), False, starts)


def _first_pieces(word_ids: list, num_words: int) -> Optional[np.ndarray]:
  """Position of each word's first piece, from a fast tokenizer's word alignment; None when a word has none."""
  first = np.full(num_words, -1, np.int32)
  for pos, w in enumerate(word_ids):
    if w is not None and first[w] < 0:
      first[w] = pos
  return None if (first < 0).any() else first


# ----------------------------------------------------------------------------- batching


def bucket_length(n: int, cap: int) -> int:
  """Padded length of a batch whose longest example has n tokens: the next of BUCKETS, at most cap
  (a split's max_length), and cap beyond the last bucket. The one rule of training, evaluation and
  inference batches: a handful of lengths, so jit compiles a handful of programs."""
  for b in BUCKETS:
    if n <= b:
      return min(b, cap)
  return cap


def pad_batch(encoded: EncodedSplit, rows, num_rows: int, *, repeat_first: bool = False,
              seq: Optional[int] = None) -> dict[str, np.ndarray]:
  """Examples `rows` of a split as one fixed-shape batch: {input_ids, attention_mask, token_type_ids,
  labels, example_ids}, num_rows rows padded to the bucket (`bucket_length`) of the longest example.
  A token task's batch has labels [num_rows, S] (each word's tag at its first piece) and word_mask
  [num_rows, S] (1 at first pieces, also in repeated padding rows: a criterion reads it).

  Rows past len(rows) are padding: example_ids -1, label 0, and no tokens, or with repeat_first a
  copy of the first example's tokens, so that a rule over the whole batch (the latency path stops
  once every row has exited) waits for no padding row. An example's own row is the same whatever
  else is in the batch; only the padding length changes, and attention masks it out. `seq` pads to
  that length instead of the bucket (the open engine's slots all have one length).
  """
  rows = np.asarray(rows)
  seq = seq or bucket_length(max(len(encoded.input_ids[i]) for i in rows), encoded.max_length)
  input_ids = np.full((num_rows, seq), encoded.pad_id, np.int32)
  token_types = np.zeros((num_rows, seq), np.int32)
  mask = np.zeros((num_rows, seq), np.int32)
  filled = np.concatenate([rows, np.full(num_rows - len(rows), rows[0])]) if repeat_first else rows
  for row, i in enumerate(filled):
    k = len(encoded.input_ids[i])
    input_ids[row, :k] = encoded.input_ids[i]
    token_types[row, :k] = encoded.token_type_ids[i]
    mask[row, :k] = 1
  example_ids = np.full((num_rows,), -1, np.int32)
  example_ids[:len(rows)] = rows
  batch = {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": token_types,
           "example_ids": example_ids}
  if encoded.is_token_task:
    labels = np.zeros((num_rows, seq), np.int32)
    word_mask = np.zeros((num_rows, seq), np.int32)
    for row, i in enumerate(filled):
      starts = encoded.word_starts[i]
      word_mask[row, starts] = 1
      if encoded.labels is not None and row < len(rows):
        labels[row, starts] = encoded.labels[i, :len(starts)]
    return {**batch, "labels": labels, "word_mask": word_mask}
  labels = np.zeros((num_rows,), np.float32 if encoded.is_regression else np.int32)
  if encoded.labels is not None:
    labels[:len(rows)] = encoded.labels[rows]
  return {**batch, "labels": labels}


def num_batches(encoded: EncodedSplit, batch_size: int) -> int:
  return -(-len(encoded) // batch_size)


def _order(encoded: EncodedSplit, batch_size: int, shuffle: bool, seed: int, epoch: int) -> list[np.ndarray]:
  n = len(encoded)
  if not shuffle:
    return [np.arange(i, min(i + batch_size, n)) for i in range(0, n, batch_size)]
  rng = np.random.default_rng([seed, epoch])
  perm = rng.permutation(n)
  lengths = encoded.lengths
  window = batch_size * SORT_WINDOW
  groups = []
  for start in range(0, n, window):
    chunk = perm[start:start + window]
    chunk = chunk[np.argsort(lengths[chunk], kind="stable")]
    groups += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
  return [groups[i] for i in rng.permutation(len(groups))]


def batches(encoded: EncodedSplit, batch_size: int, *, shuffle: bool, seed: int = 0, epoch: int = 0,
            start: int = 0) -> Iterator[dict[str, np.ndarray]]:
  """Fixed-shape batches (`pad_batch`): {input_ids, attention_mask, token_type_ids, labels, example_ids}.

  With shuffle, the order is a function of (seed, epoch) alone, and examples of similar length are
  batched together. Every batch has batch_size rows (missing rows: example_ids -1, no tokens) and a
  bucketed length. `start` skips that many batches (resuming mid-epoch).
  """
  for idx in _order(encoded, batch_size, shuffle, seed, epoch)[start:]:
    yield pad_batch(encoded, idx, batch_size)
