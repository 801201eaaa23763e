"""Where a task's examples come from: one `DataSources` for train.py (its `DataOptions`), infer.py and
`python -m rome_flax calibrate` (--data_dir / --data_file), and the study.

A split is read from exactly one place: the user's files ({split: path}), a directory (GLUE TSVs, or
CoNLL train.txt / dev.txt / test.txt), the generator (the synthetic task) or the hub (GLUE, CoNLL-2003).
`TaskKind.read` (kind.py) reads a split of its kind from these sources; which splits a run evaluates
follows from them too (`eval_splits`).
"""

from __future__ import annotations

import dataclasses
from typing import Optional


@dataclasses.dataclass(frozen=True)
class DataSources:
  data_dir: Optional[str] = None
  files: tuple[tuple[str, str], ...] = ()   # (split, path) pairs: the user's files
  text_a_column: str = "text"               # custom files: the (first) text's column
  text_b_column: Optional[str] = None       # custom files: the second text of a pair
  label_column: str = "label"               # custom files: the label's column
  tag_column: int = -1                      # CoNLL files: the tag column (-1: the last)
  tokens_column: str = "tokens"             # token tasks, JSON Lines: the words' column
  tags_column: str = "tags"                 # token tasks, JSON Lines: the tags' column
  synthetic_fillers: Optional[tuple] = None   # synthetic task: fewest and most filler words (None: its default)
  file_options: str = "--data_file"         # how messages name the file options of the caller

  @classmethod
  def of(cls, files: Optional[dict] = None, **fields) -> "DataSources":
    """Sources from a {split: path} dict (None paths dropped) and the other fields."""
    return cls(files=tuple((k, str(v)) for k, v in (files or {}).items() if v is not None), **fields)

  @property
  def file_map(self) -> dict:
    return dict(self.files)

  def custom_columns(self) -> dict:
    """`data.load_split`'s keyword arguments for the user's files."""
    return {"files": self.file_map, "text_a_column": self.text_a_column, "text_b_column": self.text_b_column,
            "label_column": self.label_column}

  def provides(self, split: str) -> bool:
    """Whether the sources hold `split` (files name theirs; a directory, the hub or the generator hold all)."""
    return split in self.file_map if self.files else True


def eval_splits(task, sources: DataSources) -> tuple[str, ...]:
  """The task's dev split(s) that the sources hold: what a training run evaluates."""
  return tuple(split for split in task.eval_splits if sources.provides(split))
