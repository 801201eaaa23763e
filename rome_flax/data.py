"""Reading, tokenising and batching a task's examples.

Sources: the hub's `glue` dataset (online), a directory of GLUE TSV files (`data_dir`), CSV / JSON
Lines files for a custom task, and the embedded synthetic task. Batches have fixed shapes per
length bucket (so jit compiles a handful of programs) and a deterministic order from (seed, epoch).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
from pathlib import Path
from typing import Iterator, Optional

import numpy as np

from rome_flax import synthetic
from rome_flax.errors import RomeFlaxError
from rome_flax.tasks import TaskSpec, TsvLayout

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


@dataclasses.dataclass
class EncodedSplit:
  """Token ids per example (ragged, truncated to max_length) plus labels: the one encoded form of a
  split, batched by `batches` for training and evaluation and by `inference.plan` for inference."""
  input_ids: list[np.ndarray]
  token_type_ids: list[np.ndarray]
  labels: Optional[np.ndarray]
  max_length: int
  pad_id: int
  is_regression: bool

  def __len__(self) -> int:
    return len(self.input_ids)

  @property
  def lengths(self) -> np.ndarray:
    return np.fromiter((len(x) for x in self.input_ids), np.int64, len(self.input_ids))

  def head(self, n: int) -> "EncodedSplit":
    """The first n examples."""
    return _head(self, n, ("input_ids", "token_type_ids", "labels"))

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
  The synthetic task takes `seed` and `size`.
  """
  if task.name == "synthetic":
    texts, labels = synthetic.make_split(split, seed=custom.get("seed", 0), size=custom.get("size"))
    out = Split(task.name, split, texts, None, labels if split != "test" else None, np.arange(len(texts)))
  elif "files" in custom:
    out = _load_custom(task, split, **custom)
  elif data_dir is not None:
    out = _load_tsv(task, split, Path(data_dir))
  else:
    out = _load_hub(task, split)
  if len(out) == 0:
    raise RomeFlaxError(f"split {split!r} of task {task.name} is empty")
  return out


def _read_tsv_rows(path: Path) -> list[list[str]]:
  if not path.is_file():
    raise RomeFlaxError(f"{path} is missing (expected the GLUE TSV layout in {path.parent})")
  with open(path, encoding="utf-8-sig") as f:
    return [line.rstrip("\r\n").split("\t") for line in f]


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


def _parse_label(task: TaskSpec, raw, where: str, line: int):
  if task.is_regression:
    try:
      value = float(raw)
    except (TypeError, ValueError):
      value = float("nan")
    if not math.isfinite(value):
      raise RomeFlaxError(f"{where}:{line}: label {raw!r} is not a number")
    return value
  label = task.label_id(str(raw))
  if label is None:
    raise RomeFlaxError(f"{where}:{line}: label {raw!r} is not one of {list(task.label_names)}")
  return label


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


def _load_custom(task: TaskSpec, split: str, files: dict, text_a_column: str = "text",
                 text_b_column: Optional[str] = None, label_column: Optional[str] = "label", **_) -> Split:
  if split not in files or files[split] is None:
    raise RomeFlaxError(f"no file given for split {split!r} of the custom task")
  path = Path(files[split])
  if not path.is_file():
    raise RomeFlaxError(f"{path} is missing")
  records = read_records(path)
  if not records:
    raise RomeFlaxError(f"{path} has no rows")
  keys = list(records[0][1])
  for col in (text_a_column, text_b_column):
    if col is not None and col not in keys:
      raise RomeFlaxError(f"{path}: no column {col!r} (columns: {', '.join(keys)})")
  has_label = label_column is not None and label_column in keys
  if not has_label and not split.startswith("test"):
    raise RomeFlaxError(f"{path}: no label column {label_column!r} (columns: {', '.join(keys)})")
  texts_a, texts_b, labels = [], [], []
  for line, rec in records:
    for col in (text_a_column, text_b_column, label_column if has_label else None):
      if col is not None and rec.get(col) is None:
        raise RomeFlaxError(f"{path}:{line}: missing value in column {col!r}")
    texts_a.append(str(rec[text_a_column]))
    if text_b_column is not None:
      texts_b.append(str(rec[text_b_column]))
    if has_label:
      labels.append(_parse_label(task, rec[label_column], str(path), line))
  lab = np.asarray(labels, np.float32 if task.is_regression else np.int64) if has_label else None
  return Split(task.name, split, texts_a, texts_b if text_b_column else None, lab, np.arange(len(texts_a)))


def read_records(path: Path) -> list[tuple[int, dict]]:
  """(line number, row dict) of a .csv / .tsv (header row) or .jsonl / .json (one object per line) file."""
  suffix = path.suffix.lower()
  if suffix in (".jsonl", ".json"):
    out = []
    with open(path, encoding="utf-8") as f:
      for n, line in enumerate(f, 1):
        if not line.strip():
          continue
        try:
          rec = json.loads(line)
        except json.JSONDecodeError as e:
          raise RomeFlaxError(f"{path}:{n}: not valid JSON ({e.msg})") from None
        if not isinstance(rec, dict):
          raise RomeFlaxError(f"{path}:{n}: expected one JSON object per line")
        out.append((n, rec))
    return out
  if suffix in (".csv", ".tsv"):
    with open(path, encoding="utf-8-sig", newline="") as f:
      reader = csv.DictReader(f, delimiter="\t" if suffix == ".tsv" else ",")
      return [(reader.line_num, row) for row in reader]
  raise RomeFlaxError(f"{path}: unsupported file type {suffix!r} (use .csv, .tsv, .jsonl)")


def custom_label_names(path: str | Path, label_column: str = "label") -> tuple[str, ...]:
  """Sorted distinct labels of a custom training file (the label set when the user gives none)."""
  names = sorted({str(rec.get(label_column)) for _, rec in read_records(Path(path))
                  if rec.get(label_column) is not None})
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


# ----------------------------------------------------------------------------- batching


def bucket_length(n: int, cap: int) -> int:
  """Padded length of a batch whose longest example has n tokens: the next of BUCKETS, at most cap
  (a split's max_length), and cap beyond the last bucket. The one rule of training, evaluation and
  inference batches: a handful of lengths, so jit compiles a handful of programs."""
  for b in BUCKETS:
    if n <= b:
      return min(b, cap)
  return cap


def pad_batch(encoded: EncodedSplit, rows, num_rows: int, *, repeat_first: bool = False) -> dict[str, np.ndarray]:
  """Examples `rows` of a split as one fixed-shape batch: {input_ids, attention_mask, token_type_ids,
  labels, example_ids}, num_rows rows padded to the bucket (`bucket_length`) of the longest example.

  Rows past len(rows) are padding: example_ids -1, label 0, and no tokens, or with repeat_first a
  copy of the first example's tokens, so that a rule over the whole batch (the latency path stops
  once every row has exited) waits for no padding row. An example's own row is the same whatever
  else is in the batch; only the padding length changes, and attention masks it out.
  """
  rows = np.asarray(rows)
  seq = bucket_length(max(len(encoded.input_ids[i]) for i in rows), encoded.max_length)
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
  labels = np.zeros((num_rows,), np.float32 if encoded.is_regression else np.int32)
  if encoded.labels is not None:
    labels[:len(rows)] = encoded.labels[rows]
  return {"input_ids": input_ids, "attention_mask": mask, "token_type_ids": token_types,
          "labels": labels, "example_ids": example_ids}


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
