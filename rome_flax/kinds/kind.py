"""Task kinds: the one seam between "a label per example", "a value per example" and "a tag per word".

A `TaskKind` owns everything that differs between them outside the exit head (model/heads.py):
  - its head and its *unit* (what takes an exit and a prediction: an example, or a word),
  - the logits shape of a padded batch at one exit, and per example (`unit_shape`),
  - encoding a chunk of a split and the padding extras of a batch (the word mask),
  - pieces to units: a batch's exit logits -> per-example logits (`to_units`: a word's first piece),
  - joining chunks of different widths, turning logits into predictions, per-type scores (metrics.py),
  - the prediction / submission files of a setting (writers.py),
  - whether token-level criteria (TOKEE) apply and which trade-off plots mean something.
Evaluation, inference, the scheduler, the report and the trainer ask the kind (`kind_of(cfg or task)`)
and do not branch on token vs sentence themselves.

Adding a kind (e.g. extractive QA spans, multi-label classification): a `TaskKind` subclass here,
its head in model/heads.py (`HEAD_KINDS`), a line in `KINDS`, and its `TaskSpec`s in tasks.py.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional

import numpy as np

from rome_flax.errors import RomeFlaxError
from rome_flax.io import files
from rome_flax.kinds import data, metrics, synthetic, token_data, writers
from rome_flax.kinds.sources import DataSources

log = logging.getLogger(__name__)

# Sentence-level exit criteria (engine/exit_policy.py implements them); each kind lists those that apply to it.
SENTENCE_CRITERIA = ("entropy", "maxprob", "patience")


class TaskKind:
  """A sentence-level classification task: one label per example, read from the pooled exit."""
  name = "classification"
  head = "sequence"            # model/heads.py HEAD_KINDS key
  unit = "example"             # what takes an exit and a prediction
  exits = "one prediction per sentence"   # what its model's exits give (messages: a task and a model that differ)
  token_level_exit = False     # TOKEE (a word halts on its own) applies
  is_regression = False
  criteria = SENTENCE_CRITERIA   # the sentence-level criteria a sweep's 'all' runs

  def entropy_top(self, num_labels: int) -> float:
    """The largest uncertainty its entropy criterion scores (log C here; a calibration grid's top)."""
    return math.log(max(num_labels, 2))

  def __repr__(self) -> str:
    return f"TaskKind({self.name})"

  # ------------------------------------------------------------------ shapes
  def unit_shape(self, num_units: int) -> tuple:
    """Dimensions between the example axis and the class axis of per-example logits / labels."""
    return ()

  def logits_shape(self, batch: int, seq: int, num_labels: int) -> tuple:
    """One exit's logits for a padded batch [B, S] (what the head returns)."""
    return (batch, num_labels)

  def batch_pad(self, batch: int, seq: int, b: int, s: int) -> tuple:
    """np/jnp.pad widths taking one exit's logits of a [b, s] cut back to the batch's [B, S] shape."""
    return ((0, batch - b), (0, 0))

  def num_units(self, encoded: data.EncodedSplit) -> int:
    """Width of the unit axis for an encoded split (0: no unit axis)."""
    return 0

  # ------------------------------------------------------------------ data
  def read(self, task, split: str, sources: DataSources, *, first_rows: int = 0, stream: bool = False):
    """A split of the task from its sources: a data.Split, or with stream=True and a user's file an
    iterator of Splits (the file read as a stream: memory holds one chunk). first_rows: only the first N
    examples (the synthetic task then generates no more)."""
    if sources.files or task.name == "custom":
      if not sources.files:
        raise RomeFlaxError(f"a custom task needs {sources.file_options}")
      custom = sources.custom_columns()
    elif task.name == "synthetic":
      custom = {"seed": 0} if sources.synthetic_fillers is None else \
          {"seed": 0, "filler_words": sources.synthetic_fillers}
      if first_rows:
        custom["size"] = min(first_rows, synthetic.SPLIT_SIZES.get(split, first_rows))
    else:
      custom = {}
      if sources.data_dir is None:
        log.info("no data_dir: loading glue/%s %s from the hub", task.hf_name, split)
    if stream and sources.files:   # a user's file: read as a stream (memory holds one chunk)
      return data.stream_split(task, split, sources.data_dir, **custom)
    out = data.load_split(task, split, sources.data_dir, **custom)
    return out.head(first_rows) if first_rows else out

  def encode(self, tokenizer, chunk, task, max_length: int) -> data.EncodedSplit:
    """A chunk of a split (data.Split) tokenised for the model."""
    return data.encode_split(tokenizer, chunk, max_length, is_regression=task.is_regression)

  def labelled(self, chunk) -> bool:
    """Whether a chunk of a split (data.Split) carries its gold labels."""
    return chunk.labels is not None

  def chunk_labels(self, chunk, encoded: data.EncodedSplit) -> Optional[np.ndarray]:
    """The chunk's labels as the metrics read them; None: unlabelled."""
    return chunk.labels

  def chunk_words(self, chunk) -> list:
    """Each example's words (what word-level prediction files print); [] where units are examples."""
    return []

  def fit_to_length(self, examples, tokenizer, max_length: int):
    """(examples, warning or None) for --truncate: sentence tasks are always cut to max_length by the tokenizer."""
    return examples, None

  def check_model_labels(self, task, model_labels, source: str) -> None:
    """A model's own label names must fit the task where the task reads them from its data (a tag set)."""

  def to_units(self, logits_xBxSxC, piece: dict, num_units: int) -> np.ndarray:
    """A piece's exit logits [..., B, C] as per-example logits (the identity here)."""
    return np.asarray(logits_xBxSxC)

  def join(self, logits_chunks: list, label_chunks: list, words: list):
    """Chunks' exit logits [E, n, ...] and labels joined along the examples: (logits, labels or None,
    unit mask or None)."""
    labelled = all(y is not None for y in label_chunks)
    return np.concatenate(logits_chunks, axis=1), np.concatenate(label_chunks) if labelled else None, None

  # ------------------------------------------------------------------ scoring and files
  def predictions(self, logits):
    """Class ids (argmax over the last axis); NumPy or JAX arrays."""
    return logits.argmax(-1)

  def per_type_scores(self, task, final_logits, labels) -> Optional[dict]:
    """Per entity type scores of the final exit where the tag set has entities; None otherwise."""
    return None

  def evaluation_extras(self, words: list, labels) -> dict:
    """What an evaluation keeps for this kind's prediction files besides ids and predictions."""
    return {"words": None, "labels": None}

  def write_predictions(self, out: Path, name: str, ev, predictions, exits) -> list[Path]:
    """A setting's prediction file (and, unlabelled, its GLUE submission file)."""
    written = [files.atomic_write_lines(out / "predictions" / f"{name}.tsv", writers.predictions_tsv(
        ev.example_ids, predictions, exits, ev.task.label_names))]
    if not ev.labelled:
      written.append(files.atomic_write_lines(
          out / "submission" / name / writers.submission_file(ev.task.name, ev.split),
          writers.submission_tsv(ev.example_ids, predictions, ev.task.label_names)))
    return written

  def plots(self) -> tuple[str, ...]:
    """The speed axes of its trade-off plots (layer ratio always; FLOPs where units exit apart)."""
    return ("layer_ratio",)

  # ------------------------------------------------------------------ calibration
  def example_agrees(self, same, unit_mask):
    """Per example: does the early exit agree with the final exit (`same` per unit)?"""
    return same

  def example_share(self, flags, unit_mask):
    """Per example: the share of its units flagged (an example is its one unit: 0 or 1)."""
    return flags

  def agreement(self, tolerance: Optional[float] = None) -> str:
    """What agreeing with the final exit means, in a guarantee's words."""
    return "the early-exit prediction equals the final exit's"

  def loss_units(self) -> str:
    """What a calibration loss is a share of."""
    return "examples"


class RegressionKind(TaskKind):
  """A sentence-level regression task: one value per example (the head's single output)."""
  name = "regression"
  is_regression = True
  criteria = ("patience",)       # entropy and max-probability need class probabilities

  def predictions(self, logits):
    return logits[..., 0]

  def agreement(self, tolerance: Optional[float] = None) -> str:
    return f"the early-exit prediction is within {tolerance:g} of the final exit's"


class TokenKind(TaskKind):
  """Sequence labelling: a tag per word, read at the word's first piece (method-seqlab.md section 1)."""
  name = "token"
  head = "token"
  unit = "word"
  exits = "token exits (sequence labelling)"
  token_level_exit = True
  criteria = ("entropy", "maxprob")   # SENTEE: a sentence exits when its words' pooled uncertainty is low

  def entropy_top(self, num_labels: int) -> float:
    return 1.0   # SENTEE and TOKEE score normalised entropy, H / log C

  def unit_shape(self, num_units: int) -> tuple:
    return (num_units,)

  def logits_shape(self, batch: int, seq: int, num_labels: int) -> tuple:
    return (batch, seq, num_labels)

  def batch_pad(self, batch: int, seq: int, b: int, s: int) -> tuple:
    return ((0, batch - b), (0, seq - s), (0, 0))

  def num_units(self, encoded: data.EncodedSplit) -> int:
    return encoded.max_words

  def read(self, task, split: str, sources: DataSources, *, first_rows: int = 0, stream: bool = False):
    """A split of CoNLL / JSON Lines sentences from the user's files, a directory or (CoNLL-2003) the hub,
    read whole (stream is accepted and ignored)."""
    files = sources.file_map
    if sources.data_dir is not None and files:
      raise RomeFlaxError(f"give --data_dir or {sources.file_options}, not both")
    if sources.data_dir is None and not files and task.hf_name is None:
      raise RomeFlaxError(f"task {task.name} reads your files: pass --data_dir (train.txt, dev.txt, test.txt) or "
                          f"{sources.file_options}")
    if files and split not in files:
      raise RomeFlaxError(f"no file given for the {split} split ({sources.file_options})")
    out = token_data.load_token_split(split, data_dir=sources.data_dir, files=files or None, task=task.name,
                                      tag_column=sources.tag_column, tokens_column=sources.tokens_column,
                                      tags_column=sources.tags_column,
                                      hub_name=task.hf_name if sources.data_dir is None and not files else None)
    return out.head(first_rows) if first_rows else out

  def encode(self, tokenizer, chunk, task, max_length: int) -> data.EncodedSplit:
    return token_data.encode(tokenizer, chunk, task.label_names, max_length)

  def labelled(self, chunk) -> bool:
    return chunk.tags is not None

  def chunk_labels(self, chunk, encoded: data.EncodedSplit) -> Optional[np.ndarray]:
    return encoded.labels if self.labelled(chunk) else None

  def chunk_words(self, chunk) -> list:
    return list(chunk.words)

  def fit_to_length(self, examples, tokenizer, max_length: int):
    """Sentences longer than max_length pieces keep the words that fit (token_data.fit_to_length)."""
    return token_data.fit_to_length(examples, tokenizer, max_length)

  def check_model_labels(self, task, model_labels, source: str) -> None:
    if tuple(model_labels or task.label_names) != task.label_names:
      raise RomeFlaxError(f"{source} was trained on tags {list(model_labels)}, the training split has "
                          f"{list(task.label_names)}")

  def to_units(self, logits_xBxSxC, piece: dict, num_units: int) -> np.ndarray:
    """Token logits at each word's first piece (a per-device group's mask [D, N, S] is read as D*N rows)."""
    word_mask = piece["word_mask"]
    return to_words(logits_xBxSxC, word_mask.reshape(-1, word_mask.shape[-1]), num_units)

  def join(self, logits_chunks: list, label_chunks: list, words: list):
    """Chunks hold different word counts: word slots padded to the widest (labels with -1)."""
    labelled = all(y is not None for y in label_chunks)
    width = max(len(w) for w in words)
    logits = [np.pad(z, ((0, 0), (0, 0), (0, width - z.shape[2]), (0, 0))) for z in logits_chunks]
    labels = [np.pad(y, ((0, 0), (0, width - y.shape[1])), constant_values=-1) for y in label_chunks] \
        if labelled else None
    unit_mask = np.arange(width)[None, :] < np.asarray([len(w) for w in words])[:, None]
    return np.concatenate(logits, axis=1), np.concatenate(labels) if labelled else None, unit_mask

  def per_type_scores(self, task, final_logits, labels) -> Optional[dict]:
    if "f1" not in task.metric_names:
      return None
    gold, pred = metrics.word_sequences(final_logits, labels)
    return metrics.span_scores(*(metrics.tag_strings(list(task.label_names), s) for s in (gold, pred)))["per_type"]

  def evaluation_extras(self, words: list, labels) -> dict:
    return {"words": words, "labels": labels}

  def write_predictions(self, out: Path, name: str, ev, predictions, exits) -> list[Path]:
    """CoNLL lines: word, gold (labelled), predicted tag, exit layer (per sentence or per word)."""
    return [files.atomic_write_lines(out / "predictions" / f"{name}.conll", writers.predictions_conll(
        ev.words, predictions, exits, ev.task.label_names, ev.labels))]

  def plots(self) -> tuple[str, ...]:
    return ("layer_ratio", "flops_ratio")   # SENTEE, TOKEE and the static exit on one currency: FLOPs

  def example_agrees(self, same, unit_mask):
    """A sentence agrees when every word does."""
    return np.all(same | ~unit_mask, axis=1)

  def example_share(self, flags, unit_mask):
    """The share of a sentence's words flagged (not 0/1: a binomial p-value does not apply)."""
    return np.sum(flags & unit_mask, 1) / np.maximum(unit_mask.sum(1), 1)

  def agreement(self, tolerance: Optional[float] = None) -> str:
    return "every word's tag equals the final exit's"

  def loss_units(self) -> str:
    return "words (averaged per sentence)"


CLASSIFICATION, REGRESSION, TOKEN = TaskKind(), RegressionKind(), TokenKind()
KINDS: dict[str, TaskKind] = {k.name: k for k in (CLASSIFICATION, REGRESSION, TOKEN)}
_BY_HEAD = {"sequence": CLASSIFICATION, "token": TOKEN}


def kind_of(x) -> TaskKind:
  """The kind of a TaskSpec, a ModelConfig (its head and number of labels) or an EncodedSplit."""
  if isinstance(x, data.EncodedSplit):
    head = "token" if x.word_starts is not None else "sequence"
    regression = x.is_regression
  else:
    head = getattr(x, "head", None) or getattr(x, "kind", None)
    regression = getattr(x, "num_labels", 2) == 1
  if head not in _BY_HEAD:
    raise RomeFlaxError(f"unknown task kind {head!r}; kinds: {', '.join(_BY_HEAD)}")
  kind = _BY_HEAD[head]
  return REGRESSION if kind is CLASSIFICATION and regression else kind


def to_words(logits_xBxSxC, word_mask_BxS, num_words: int) -> np.ndarray:
  """Token logits [..., B, S, C] at each word's first piece -> word-level [..., B, W, C] (W =
  num_words; slots past an example's words are zeros): what metrics, sweeps and files read."""
  mask_BxS = np.asarray(word_mask_BxS) > 0
  order_BxS = np.argsort(~mask_BxS, axis=1, kind="stable")   # each row's word positions first, in order
  S = mask_BxS.shape[1]
  idx_BxW = order_BxS[:, :num_words] if num_words <= S else np.pad(order_BxS, ((0, 0), (0, num_words - S)))
  logits = np.asarray(logits_xBxSxC)
  words = np.take_along_axis(logits, np.broadcast_to(idx_BxW[..., None], logits.shape[:-3] + idx_BxW.shape + (1,)),
                             axis=-2)
  present_BxW = np.arange(num_words)[None, :] < mask_BxS.sum(1)[:, None]
  return np.where(present_BxW[..., None], words, 0.0).astype(np.float32)


def check_matches(task, cfg) -> None:
  """A task runs only on a model whose exits are of its kind's head."""
  if kind_of(task).head != kind_of(cfg).head:
    raise RomeFlaxError(f"task {task.name} needs {kind_of(task).head} exits; the model has {cfg.head} exits")


__all__ = ("SENTENCE_CRITERIA", "TaskKind", "RegressionKind", "TokenKind", "CLASSIFICATION", "REGRESSION", "TOKEN",
           "KINDS", "kind_of", "to_words", "check_matches")
