"""Task kinds: the one seam between "a label per example", "a value per example" and "a tag per word".

A `TaskKind` owns everything that differs between them outside the exit head (model/heads.py):
  - its head and its *unit* (what takes an exit and a prediction: an example, or a word),
  - the logits shape of a padded batch at one exit, and per example (`unit_shape`),
  - encoding a chunk of a split and the padding extras of a batch (the word mask),
  - pieces to units: a batch's exit logits -> per-example logits (`to_units`: a word's first piece),
  - joining chunks of different widths, turning logits into predictions, per-type scores (metrics.py),
  - the prediction / submission files of a setting (writers.py),
  - the exit criteria that apply, how a sentence-level criterion reads its units (SENTEE pools words) and
    its default thresholds, whether token-level criteria (TOKEE) apply and which trade-off plots mean something,
  - serving: a request's payload (texts or word lists), what the slots take besides the pieces (the word
    mask), one row's answer (`Prediction`, `WordPredictions`) and the server's default policy.
Evaluation, inference, the scheduler, the exit policy, serving, the report and the trainer ask the kind
(`kind_of(cfg or task)`) and do not branch on token vs sentence themselves.

Adding a kind (e.g. extractive QA spans, multi-label classification): a `TaskKind` subclass here,
its head in model/heads.py (a `HEAD_KINDS` row, with its HF Auto class, problem type and whether its classifier
rows are a tag set), a line in `KINDS` and in `_BY_HEAD`, and its `TaskSpec`s in tasks.py.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import numpy as np

from rome_flax.errors import RequestError, RomeFlaxError
from rome_flax.io import files
from rome_flax.kinds import data, metrics, synthetic, token_data, writers
from rome_flax.kinds.sources import DataSources

log = logging.getLogger(__name__)

# Sentence-level exit criteria (engine/exit_policy.py implements them); each kind lists those that apply to it.
SENTENCE_CRITERIA = ("entropy", "maxprob", "patience")
POOLS = ("max", "avg")   # how a sentence pools its words' uncertainties (SENTEE)

# The reference sweep of entropy thresholds (RomeBERT / DeeBERT scripts).
REFERENCE_ENTROPIES = (0.0, 0.001, 0.005, 0.01, 0.05, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7)
# SENTEE's sweep of normalised-entropy thresholds (H / log C lies in [0, 1]): the reference's
# sampled tau list (.01 .. .25, method-seqlab.md section 4) widened at both ends; a sentence's
# uncertainty is its most uncertain word's, so 2x-3x speed-ups need tau up to ~0.9 on CoNLL-2003.
SENTEE_ENTROPIES = (0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.075, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7,
                    0.8, 0.9)


class Prediction(NamedTuple):
  """A served example's answer (engine/serving.py)."""
  label: Any                    # class id or name; the value for regression
  probabilities: Optional[list]
  exit_layer: int               # 1-based


class WordPredictions(NamedTuple):
  """A token task's answer for one sentence: per word, its tag, tag probabilities and exit layer."""
  tags: list
  probabilities: list
  exit_layers: list             # 1-based


def softmax(logits_xC: np.ndarray) -> np.ndarray:
  """Probabilities over the last axis, in float64 (what a served answer carries)."""
  z = np.asarray(logits_xC).astype(np.float64)
  e = np.exp(z - z.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


class TaskKind:
  """A sentence-level classification task: one label per example, read from the pooled exit."""
  name = "classification"
  head = "sequence"            # model/heads.py HEAD_KINDS key
  unit = "example"             # what takes an exit and a prediction
  exits = "one prediction per sentence"   # what its model's exits give (messages: a task and a model that differ)
  token_level_exit = False     # TOKEE (a word halts on its own) applies
  is_regression = False
  criteria = SENTENCE_CRITERIA   # the sentence-level criteria a sweep's 'all' runs
  default_entropies = REFERENCE_ENTROPIES   # a sweep's entropy thresholds when the user names none
  # why a criterion outside `criteria` is refused (str.format: criterion, name, criteria)
  criterion_refusal = "criterion {criterion!r} does not apply to {name} tasks; use {criteria}"
  serving_policy: Optional[str] = "entropy:0.3"   # a server's policy when none is given (None: it must be given)

  def check_criterion(self, criterion: str) -> None:
    """Refuses a sentence-level criterion (one of SENTENCE_CRITERIA) that does not apply to this kind."""
    if criterion not in self.criteria:
      raise RomeFlaxError(self.criterion_refusal.format(criterion=criterion, name=self.name,
                                                        criteria=" or ".join(self.criteria)))

  def sentence_pool(self, pool: Optional[str]) -> Optional[str]:
    """How a sentence-level criterion pools a sentence's units into its one decision: None here (one logit
    vector per example, nothing to pool)."""
    if pool is not None:
      raise RomeFlaxError("pool (how a sentence pools its words' uncertainties) is for token tasks; this model has "
                          "one prediction per sentence")
    return None

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

  def labels_in_data(self, task, sources: DataSources) -> Optional[tuple]:
    """The label names the task's training split defines (a token task's tag set); None where a task names
    its classes otherwise (a custom task: its --custom_labels or its label column)."""
    return None

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

  # ------------------------------------------------------------------ serving (engine/serving.py)
  def request_rows(self, encoder, texts, text_pairs, tokens) -> list:
    """A request's rows (input ids, token types[, each word's first piece]) from its payload; `encoder` is
    the engine (`encode(texts, text_pairs)`, `encode_words(sentences)`: the tokenizer's fast path)."""
    if tokens is not None:
      raise RequestError("'tokens' is for token tasks (sequence labelling); this server labels sentences: "
                         "send 'texts'")
    return encoder.encode(texts, text_pairs)

  def slot_inputs(self, word_mask_BxS) -> tuple:
    """What the engine's slots take besides ids, mask and token types: nothing where units are examples."""
    return ()

  def answer(self, row: tuple, exit_index, logits_xC: np.ndarray, label: Callable[[int], Any]) -> tuple:
    """One row's answer and its units' exit layers, from its slot's exit (0-based) and that exit's logits;
    `label`: class id -> what the answer names it by."""
    k = int(np.argmax(logits_xC))
    result = Prediction(label(k), softmax(logits_xC).tolist(), int(exit_index) + 1)
    return result, [result.exit_layer]

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
  criterion_refusal = "criterion {criterion!r} needs class probabilities; a regression task can only use 'patience' " \
                      "(with --delta)"
  serving_policy = None          # patience needs a tolerance in the label's units: no default fits every task

  def predictions(self, logits):
    return logits[..., 0]

  def answer(self, row: tuple, exit_index, logits_xC: np.ndarray, label: Callable[[int], Any]) -> tuple:
    """The value (the head's one output); no probabilities."""
    layer = int(exit_index) + 1
    return Prediction(float(logits_xC[0]), None, layer), [layer]

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
  criterion_refusal = "criterion {criterion!r} is for sentence tasks; a token task (sequence labelling) exits " \
                      "sentences by {criteria}"
  default_entropies = SENTEE_ENTROPIES   # normalised entropies (H / log C)
  serving_policy = "tokee:0.1"

  def sentence_pool(self, pool: Optional[str]) -> Optional[str]:
    """SENTEE: a sentence's uncertainty is its words' pooled by max (default) or mean."""
    pool = pool or "max"
    if pool not in POOLS:
      raise RomeFlaxError(f"pool must be one of {', '.join(POOLS)}, got {pool!r}")
    return pool

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

  def labels_in_data(self, task, sources: DataSources) -> Optional[tuple]:
    """The tag set of the training split (`task` may carry stand-in tags: they are what is being read)."""
    return token_data.tag_set(self.read(task, "train", sources))

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

  def request_rows(self, encoder, texts, text_pairs, tokens) -> list:
    """Sentences given as word lists (each row also carries its words' first pieces)."""
    if texts is not None or text_pairs is not None:
      raise RequestError("this server labels words (a token task): send 'tokens', a list of word lists")
    return encoder.encode_words(tokens)

  def slot_inputs(self, word_mask_BxS) -> tuple:
    """The word mask (each word's first piece): SENTEE pools words by it, TOKEE halts words by it."""
    return (word_mask_BxS,)

  def answer(self, row: tuple, exit_index, logits_xC: np.ndarray, label: Callable[[int], Any]) -> tuple:
    """A sentence's WordPredictions: logits_xC is per piece (the sentence's exit, or the full model's last),
    or with TOKEE per word, words first, with exit_index one exit per word."""
    starts, exit_index = row[2], np.asarray(exit_index)
    W = len(starts)
    if exit_index.ndim:   # TOKEE: each word its own exit
      word_logits_WxC, layers = logits_xC[:W], exit_index[:W] + 1
    else:
      word_logits_WxC, layers = logits_xC[starts], np.full(W, int(exit_index) + 1)
    layers = [int(v) for v in layers]
    tags = [label(int(k)) for k in word_logits_WxC.argmax(-1)]
    return WordPredictions(tags, softmax(word_logits_WxC).tolist(), layers), layers

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
    return kind_named("token" if x.word_starts is not None else "sequence", x.is_regression)
  return kind_named(getattr(x, "head", None) or getattr(x, "kind", None), getattr(x, "num_labels", 2) == 1)


def kind_named(head: str, regression: bool) -> TaskKind:
  """The kind of a head (model/heads.py HEAD_KINDS key) that is, or is not, a regression's."""
  if head not in _BY_HEAD:
    raise RomeFlaxError(f"unknown task kind {head!r}; kinds: {', '.join(_BY_HEAD)}")
  kind = _BY_HEAD[head]
  return REGRESSION if kind is CLASSIFICATION and regression else kind


def kind_of_manifest(model: dict) -> TaskKind:
  """The kind of an exported artefact from its manifest's "model" entry (artefact_runtime.py imports
  nothing of rome_flax, so the manifest records the kind as two flags; a flag that is absent is False)."""
  return kind_named(TOKEN.head if model.get("is_token_task") else CLASSIFICATION.head,
                    bool(model.get("is_regression")))


def kind_of_steps(steps) -> TaskKind:
  """The kind of the model behind a serving engine's steps (engine/serving.py): their `kind` (LocalSteps), an
  artefact's manifest flags (ArtefactSteps), or the same flags as attributes of a steps object of one's own."""
  kind = getattr(steps, "kind", None)
  if kind is not None:
    return kind
  manifest = getattr(steps, "manifest", None)
  return kind_of_manifest(manifest["model"] if manifest else {
      "is_token_task": getattr(steps, "is_token_task", False), "is_regression": getattr(steps, "is_regression", False)})


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


__all__ = ("SENTENCE_CRITERIA", "POOLS", "REFERENCE_ENTROPIES", "SENTEE_ENTROPIES", "Prediction", "WordPredictions",
           "softmax", "TaskKind", "RegressionKind", "TokenKind", "CLASSIFICATION", "REGRESSION", "TOKEN", "KINDS",
           "kind_of", "kind_named", "kind_of_manifest", "kind_of_steps", "to_words", "check_matches")
