"""Prediction and GLUE submission files, line by line: what each task kind writes per setting
(`kind.TaskKind.write_predictions`). Generators, so a large split's file is streamed through
`files.atomic_write_lines`."""

from __future__ import annotations

from typing import Iterator, Sequence

import numpy as np

# GLUE leaderboard file names per task and split.
SUBMISSION_NAMES = {"cola": "CoLA", "sst-2": "SST-2", "mrpc": "MRPC", "qqp": "QQP", "sts-b": "STS-B",
                    "qnli": "QNLI", "rte": "RTE", "wnli": "WNLI"}
MNLI_SUBMISSION = {"test_matched": "MNLI-m", "test_mismatched": "MNLI-mm"}

def _label_cell(prediction, label_names: Sequence[str]) -> str:
  """A prediction as files show it: its label name (classification) or its value (regression)."""
  return label_names[int(prediction)] if label_names else f"{float(prediction):.6g}"


def submission_tsv(example_ids, predictions, label_names: Sequence[str]) -> Iterator[str]:
  """GLUE submission file's lines: `index<TAB>prediction`, label names for classification, values for
  regression. A generator, so a large split's file is streamed (`files.atomic_write_lines`)."""
  yield "index\tprediction\n"
  for i, p in zip(example_ids, predictions):
    yield f"{int(i)}\t{_label_cell(p, label_names)}\n"


def predictions_tsv(example_ids, predictions, exit_index, label_names: Sequence[str]) -> Iterator[str]:
  """Lines `index<TAB>prediction<TAB>exit_layer` per example (exit_layer 1-based), streamed."""
  yield "index\tprediction\texit_layer\n"
  for i, p, e in zip(example_ids, predictions, exit_index):
    yield f"{int(i)}\t{_label_cell(p, label_names)}\t{int(e) + 1}\n"


def predictions_conll(words, predictions_NxW, exit_index, label_names: Sequence[str], labels_NxW=None
                      ) -> Iterator[str]:
  """A token task's predictions in CoNLL format: a header line `# columns: word gold predicted
  exit_layer`, then one line per word (no gold column for an unlabelled split), a blank line after each
  sentence; streamed. For conlleval drop the header and the exit column:
  `grep -v '^#' FILE | cut -d' ' -f1-3`. exit_index: 0-based, per sentence [N] (SENTEE) or per word
  [N, W] (TOKEE)."""
  exit_index = np.asarray(exit_index)
  yield f"# columns: word{' gold' if labels_NxW is not None else ''} predicted exit_layer\n"
  for i, sentence in enumerate(words):
    for k, word in enumerate(sentence):
      layer = int(exit_index[i] if exit_index.ndim == 1 else exit_index[i, k]) + 1
      pred = label_names[int(predictions_NxW[i, k])]
      gold = f" {label_names[int(labels_NxW[i, k])]}" if labels_NxW is not None else ""
      yield f"{word}{gold} {pred} {layer}\n"
    yield "\n"


def submission_file(task: str, split: str) -> str:
  """The GLUE leaderboard's file name for a task's test split."""
  name = MNLI_SUBMISSION.get(split) if task == "mnli" else SUBMISSION_NAMES.get(task)
  return f"{name or task}.tsv"
