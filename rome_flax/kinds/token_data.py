"""Reading token-classification (sequence-labelling: NER, POS, chunking) data.

Sources: CoNLL column files (one word per line, a blank line between sentences), JSON Lines (one
sentence per line: a token list and a tag list), a directory of CoNLL `train/dev/test.txt` files,
and the hub (online). Reading only: tokenising and batching happen elsewhere. Every problem with a
file is one RomeFlaxError naming the file and line, so a user can fix the file without a traceback.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from rome_flax.errors import RomeFlaxError
from rome_flax.kinds.data import EncodedSplit, encode_token_split, iter_records, text_lines

DOCSTART = "-DOCSTART-"
# File names tried in a data_dir, in order: the common names of CoNLL-2003 copies.
DIR_FILES = {"train": ("train.txt",), "dev": ("dev.txt", "valid.txt", "testa.txt"), "test": ("test.txt", "testb.txt")}
HUB_SPLITS = {"train": "train", "dev": "validation", "test": "test"}
HUB_TAG_COLUMNS = {"ner": "ner_tags", "pos": "pos_tags", "chunk": "chunk_tags"}
_PREFIX_ORDER = {"B": 0, "I": 1, "E": 2, "S": 3}


@dataclasses.dataclass
class TokenSplit:
  """One split of a token-classification task: sentences as word lists and, when labelled, tag lists."""
  task: str
  split: str
  words: list[list[str]]
  tags: Optional[list[list[str]]]     # raw tag strings per word; None for an unlabelled split
  ids: np.ndarray                     # int64 sentence index within the file (0..N-1); the row on the hub
  lines: np.ndarray                   # int64 1-based line of each sentence's first word in its file
  source: str                         # the file (or 'hub:conll2003/...'), for messages
  # True for CoNLL files, where word k of sentence i is on line lines[i] + k; else every word of a
  # sentence is on the sentence's line (JSON Lines) or row (hub). Lets errors name a word's line.
  _word_per_line: bool = dataclasses.field(default=False, repr=False)

  def __len__(self) -> int:
    return len(self.words)

  def head(self, n: int) -> "TokenSplit":
    """The first n sentences (quick checks)."""
    if n < 1:
      raise RomeFlaxError(f"need at least one sentence, got {n}")
    return self.rows(0, n)

  def rows(self, start: int, stop: int) -> "TokenSplit":
    """Sentences start..stop-1 (a chunk of a split)."""
    return dataclasses.replace(self, words=self.words[start:stop],
                               tags=None if self.tags is None else self.tags[start:stop],
                               ids=self.ids[start:stop], lines=self.lines[start:stop])

  def where(self, i: int) -> str:
    """'file:line' of sentence i, for messages."""
    return f"{self.source}:{self.lines[i]}"

  def word_line(self, i: int, k: int) -> int:
    """The line (or row) of word k of sentence i."""
    return int(self.lines[i]) + (k if self._word_per_line else 0)


def _split(task, split, words, tags, lines, source, word_per_line=False) -> TokenSplit:
  return TokenSplit(task, split, words, tags, np.arange(len(words), dtype=np.int64), np.asarray(lines, np.int64),
                    source, word_per_line)


# ----------------------------------------------------------------------------- CoNLL columns


def read_conll(path, split: str = "train", *, task: str = "ner", tag_column: int = -1, word_column: int = 0,
               labelled: Optional[bool] = None) -> TokenSplit:
  """A CoNLL column file: one word per line, columns separated by whitespace, a blank line between
  sentences, `-DOCSTART-` lines skipped (they end a sentence). `WORD TAG` and the four-column
  CoNLL-2003 layout (`WORD POS CHUNK NER`) both work: `tag_column` picks the tag (-1: the last).

  The first word line fixes the number of columns. `labelled=None`: labelled when it has two or more
  columns; a one-column file is then an unlabelled (test) split.
  """
  path = Path(path)
  words, tags, lines = [], [], []
  sent_words, sent_tags = [], []
  ncols = first = None
  word_col = tag_col = None

  def end_sentence():
    nonlocal sent_words, sent_tags
    if sent_words:
      words.append(sent_words)
      tags.append(sent_tags)
      sent_words, sent_tags = [], []

  for n, line in enumerate(text_lines(path), 1):
    cols = line.split()
    if not cols:
      end_sentence()   # runs of blank lines are one boundary
      continue
    if cols[0] == DOCSTART:
      end_sentence()   # a document boundary, not a sentence
      continue
    if ncols is None:   # the first word line fixes the layout
      ncols, first = len(cols), n
      if labelled is None:
        labelled = ncols >= 2
      word_col = _column(word_column, ncols, "word_column", path, n)
      if labelled:
        if ncols == 1:
          raise RomeFlaxError(f"{path}:{n}: one column: no tag (expected WORD TAG, or WORD ... TAG columns)")
        tag_col = _column(tag_column, ncols, "tag_column", path, n)
        if tag_col == word_col:
          raise RomeFlaxError(f"{path}:{n}: tag_column {tag_column} and word_column {word_column} are the same column")
    elif len(cols) != ncols:
      raise RomeFlaxError(f"{path}:{n}: expected {ncols} columns (as on line {first}), found {len(cols)}")
    if not sent_words:
      lines.append(n)
    sent_words.append(cols[word_col])
    if labelled:
      sent_tags.append(cols[tag_col])
  end_sentence()
  if not words:
    raise RomeFlaxError(f"{path} has no sentences")
  return _split(task, split, words, tags if labelled else None, lines, str(path), word_per_line=True)


def _column(index: int, ncols: int, name: str, path: Path, line: int) -> int:
  if not -ncols <= index < ncols:
    raise RomeFlaxError(f"{path}:{line}: {name} {index} is out of range for {ncols} columns")
  return index % ncols


# ----------------------------------------------------------------------------- JSON Lines


def read_jsonl(path, split: str = "train", *, task: str = "ner", tokens_column: str = "tokens",
               tags_column: str = "tags", labelled: Optional[bool] = None) -> TokenSplit:
  """A JSON Lines file, one sentence per line: {"tokens": [...], "tags": [...]} (column names as
  given). Tags are tag names (strings), one per token. When the first row has no tags column the
  split is unlabelled (not allowed with labelled=True)."""
  path = Path(path)
  if path.suffix.lower() not in (".jsonl", ".json"):
    raise RomeFlaxError(f"{path}: read_jsonl reads .jsonl / .json files (one JSON object per line)")
  words, tags, lines = [], [], []
  for n, rec in iter_records(path):
    if not lines:   # the first row decides whether the split is labelled
      has_tags = tags_column in rec
      if labelled and not has_tags:
        raise RomeFlaxError(f"{path}:{n}: no tags column {tags_column!r} (columns: {_keys(rec)})")
      labelled = has_tags if labelled is None else labelled
    toks = rec.get(tokens_column)
    if toks is None:
      raise RomeFlaxError(f"{path}:{n}: no tokens column {tokens_column!r} (columns: {_keys(rec)})")
    _check_strings(toks, tokens_column, "token", path, n)
    if not toks:
      raise RomeFlaxError(f"{path}:{n}: empty sentence (column {tokens_column!r} is an empty list)")
    if labelled:
      row_tags = rec.get(tags_column)
      if row_tags is None:
        raise RomeFlaxError(f"{path}:{n}: no tags in column {tags_column!r} (a labelled split needs them on every row)")
      _check_strings(row_tags, tags_column, "tag", path, n)
      if len(row_tags) != len(toks):
        raise RomeFlaxError(f"{path}:{n}: {len(row_tags)} tags for {len(toks)} tokens")
      tags.append(list(row_tags))
    words.append(list(toks))
    lines.append(n)
  if not words:
    raise RomeFlaxError(f"{path} has no sentences")
  return _split(task, split, words, tags if labelled else None, lines, str(path))


def _keys(rec: dict) -> str:
  return ", ".join(str(k) for k in rec)


def _check_strings(values, column: str, what: str, path: Path, line: int) -> None:
  """A list of non-empty strings without whitespace (a word with a space in it would tokenise as two
  words; an empty one as none, leaving its tag with no token)."""
  if not isinstance(values, list):
    raise RomeFlaxError(f"{path}:{line}: column {column!r} must be a list of strings, found {type(values).__name__}")
  for k, v in enumerate(values):
    if not isinstance(v, str):
      hint = " (give tag names, not ids)" if what == "tag" and isinstance(v, (int, float)) else ""
      raise RomeFlaxError(f"{path}:{line}: {what} {k} in column {column!r} is {type(v).__name__} {v!r}, "
                          f"not a string{hint}")
    if not v or any(c.isspace() for c in v):
      raise RomeFlaxError(f"{path}:{line}: {what} {k} in column {column!r} is {v!r}: "
                          f"{'empty' if not v else 'contains whitespace'}")


# ----------------------------------------------------------------------------- loading


def load_token_split(split: str, *, data_dir: Optional[str] = None, files: Optional[dict] = None,
                     task: str = "ner", tag_column: int = -1, tokens_column: str = "tokens",
                     tags_column: str = "tags", hub_name: Optional[str] = None) -> TokenSplit:
  """Sentences of `split` ('train', 'dev', 'test') from one source: `data_dir` (CoNLL train.txt,
  dev.txt, test.txt; also valid.txt / testa.txt for dev and testb.txt for test), `files`
  ({split: path}; .jsonl / .json as JSON Lines, anything else as CoNLL columns) or `hub_name` (the
  `datasets` hub, online). Train and dev must be labelled; a test split may be unlabelled."""
  given = [name for name, v in (("data_dir", data_dir), ("files", files), ("hub_name", hub_name)) if v is not None]
  if len(given) != 1:
    raise RomeFlaxError(f"give one of data_dir, files, hub_name for the token data (got "
                        f"{', '.join(given) or 'none'})")
  labelled = None if split.startswith("test") else True
  if files is not None:
    if files.get(split) is None:
      raise RomeFlaxError(f"no file given for split {split!r} (files for: {', '.join(files) or 'none'})")
    path = Path(files[split])
    if path.suffix.lower() in (".jsonl", ".json"):
      return read_jsonl(path, split, task=task, tokens_column=tokens_column, tags_column=tags_column,
                        labelled=labelled)
    return read_conll(path, split, task=task, tag_column=tag_column, labelled=labelled)
  if data_dir is not None:
    root = Path(data_dir)
    if not root.is_dir():
      raise RomeFlaxError(f"data_dir {root} is not a directory")
    names = DIR_FILES.get(split, (f"{split}.txt",))
    for name in names:
      if (root / name).is_file():
        return read_conll(root / name, split, task=task, tag_column=tag_column, labelled=labelled)
    raise RomeFlaxError(f"{root} has no {split} file (looked for {', '.join(names)})")
  return _load_hub(hub_name, split, task)


def _load_hub(hub_name: str, split: str, task: str) -> TokenSplit:
  hub_split = HUB_SPLITS.get(split, split)
  try:
    import datasets
    ds = datasets.load_dataset(hub_name, split=hub_split)
  except Exception as e:  # offline, or the hub refused: one line that says what to do instead
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise RomeFlaxError(f"cannot load {hub_name} from the hub ({msg}); pass --data_dir with CoNLL "
                        "train.txt, dev.txt, test.txt files instead") from None
  source = f"hub:{hub_name}/{hub_split}"
  tag_col = HUB_TAG_COLUMNS.get(task, f"{task}_tags")
  if "tokens" not in ds.column_names:
    raise RomeFlaxError(f"{source}: no column 'tokens' (columns: {', '.join(ds.column_names)})")
  labelled = tag_col in ds.column_names
  if not labelled and not split.startswith("test"):
    raise RomeFlaxError(f"{source}: no column {tag_col!r} for task {task} (columns: {', '.join(ds.column_names)})")
  names = getattr(getattr(ds.features[tag_col], "feature", None), "names", None) if labelled else None
  words, tags, lines = [], [], []
  all_tags = ds[tag_col] if labelled else None
  for row, toks in enumerate(ds["tokens"]):
    if not toks:
      continue  # the hub's copies keep a few empty rows (document breaks); they are no sentences
    words.append([str(t) for t in toks])
    if labelled:
      row_tags = all_tags[row]
      tags.append([names[t] if names is not None else str(t) for t in row_tags])
    lines.append(row + 1)   # 1-based row: where() names the hub row
  if not words:
    raise RomeFlaxError(f"{source} has no sentences")
  return TokenSplit(task, split, words, tags if labelled else None, np.asarray(lines, np.int64) - 1,
                    np.asarray(lines, np.int64), source)


# ----------------------------------------------------------------------------- tag sets


def _tag_key(tag: str):
  prefix, sep, kind = tag.partition("-")
  if sep and kind and prefix in _PREFIX_ORDER:
    return (kind, _PREFIX_ORDER[prefix])
  return (tag, -1)


def tag_set(train: TokenSplit) -> tuple[str, ...]:
  """The tag set of a training split in a fixed order: 'O' first, then the others by (entity type,
  prefix B, I, E, S); plain tags (POS: 'NN', 'VB') by name. The order of the model's output classes,
  so it must not depend on the order in which tags first appear."""
  if train.tags is None:
    raise RomeFlaxError(f"{train.source} is unlabelled: the tag set comes from a labelled training split")
  seen = {t for sent in train.tags for t in sent}
  if len(seen) < 2:
    raise RomeFlaxError(f"{train.source} has fewer than two distinct tags ({', '.join(sorted(seen))})")
  rest = sorted(seen - {"O"}, key=_tag_key)
  return (("O",) if "O" in seen else ()) + tuple(rest)


def tag_ids(split: TokenSplit, tag_names: Sequence[str]) -> list[np.ndarray]:
  """Per sentence, the int32 ids of its tags in `tag_names`. A tag outside the set (one that only dev
  or test uses) is an error naming the line of that word."""
  if split.tags is None:
    raise RomeFlaxError(f"{split.source} is unlabelled: it has no tags to score")
  index = {t: i for i, t in enumerate(tag_names)}
  out = []
  for i, sent in enumerate(split.tags):
    try:
      out.append(np.fromiter((index[t] for t in sent), np.int32, len(sent)))
    except KeyError:
      k = next(k for k, t in enumerate(sent) if t not in index)
      raise RomeFlaxError(f"{split.source}:{split.word_line(i, k)}: tag {sent[k]!r} is not in the training tag set "
                          f"({', '.join(tag_names)})") from None
  return out


def fit_to_length(split: TokenSplit, tokenizer, max_length: int) -> tuple[TokenSplit, Optional[str]]:
  """`infer.py --truncate`: each sentence longer than max_length word pieces (special tokens included)
  keeps its longest prefix of whole words that fits; its other words are not predicted. Returns the
  split and a warning that counts the cut sentences and words and names the first file:line (None
  when nothing was cut). Without it such a sentence is an error (`encode`)."""
  if not split.words:
    return split, None
  enc = tokenizer(split.words, is_split_into_words=True, truncation=False, return_attention_mask=False)
  words, tags, cut, dropped = list(split.words), None if split.tags is None else list(split.tags), [], 0
  for i, sentence in enumerate(split.words):
    if len(enc["input_ids"][i]) <= max_length:
      continue
    word_ids = enc.word_ids(i)
    special = sum(w is None for w in word_ids)
    pieces = np.bincount([w for w in word_ids if w is not None], minlength=len(sentence))
    used = special + np.cumsum(np.maximum(pieces, 1))   # a word with no piece is read as the unknown token
    keep = int(np.searchsorted(used, max_length, side="right"))
    if keep == 0:
      raise RomeFlaxError(f"{split.where(i)}: its first word alone is more than max_length {max_length} word pieces")
    words[i] = sentence[:keep]
    if tags is not None:
      tags[i] = tags[i][:keep]
    cut.append(i)
    dropped += len(sentence) - keep
  if not cut:
    return split, None
  return (dataclasses.replace(split, words=words, tags=tags),
          f"--truncate: {len(cut)} of {len(split)} sentences were longer than max_length {max_length} word pieces and "
          f"were cut ({dropped} words not predicted); the first: {split.where(cut[0])}")


def encode(tokenizer, split: TokenSplit, tag_names: Sequence[str], max_length: int) -> EncodedSplit:
  """A split tokenised for the model (`data.encode_token_split`: each word's tag on its first piece),
  its tags as ids of the task's tag set; a tag the training split lacks, or a sentence longer than
  max_length pieces, is an error naming its file and line."""
  tags = tag_ids(split, tag_names) if split.tags is not None else None
  return encode_token_split(tokenizer, split.words, tags, max_length, where=split.where)
