"""GLUE metrics (method.md): CoLA Matthews corr., accuracy, F1, STS-B Pearson / Spearman; and the
sequence-labelling metrics: entity span F1 (conlleval) and token accuracy."""

from __future__ import annotations

import numpy as np

from rome_flax.errors import RomeFlaxError
from rome_flax.kinds.tasks import ENTITY_PREFIXES, TaskSpec, is_entity_tagging
from rome_flax.model import heads


def primary_metric(task: TaskSpec) -> str:
  """The metric that ranks checkpoints and that tables report first."""
  return task.primary_metric


def compute_metrics(task: TaskSpec, predictions, labels) -> dict[str, float]:
  """The task's metrics (percentages as GLUE reports them; mse as is) of predictions against labels.

  `predictions` are class ids or scores, or logits ([N, C]), which are turned into predictions.
  A token task's are word-level: tag ids [N, W] or logits [N, W, C], against labels [N, W] (-1 past
  each sentence's words), scored by `sequence_metrics`.
  """
  pred = np.asarray(predictions)
  if task.is_token_task:
    return sequence_metrics(task.label_names, *word_sequences(pred, labels))
  if pred.ndim == 2:
    pred = heads.predictions(pred, task.is_regression)
  labels = np.asarray(labels)
  if pred.shape != labels.shape:
    raise RomeFlaxError(f"{len(pred)} predictions for {len(labels)} labels")
  if len(labels) == 0:
    raise RomeFlaxError("no examples to score")
  out = {}
  for name in task.metric_names:
    scale = 1.0 if name == "mse" else 100.0
    out[name] = scale * float(_METRICS[name](pred, labels))
  return out


def _corr(name: str):
  def metric(pred, labels):
    if np.std(pred) == 0 or np.std(labels) == 0:
      return 0.0  # a constant prediction has no correlation (scipy would warn and give nan)
    from scipy import stats
    return getattr(stats, name)(pred, labels)[0]
  return metric


def _sklearn(name: str, **kw):
  # scikit-learn and scipy.stats are imported when a metric first needs them: importing them with this module
  # cost every train.py / infer.py start 1.2 s (python -X importtime, AMD EPYC), most of it pandas.
  def metric(pred, labels):
    from sklearn import metrics as skm
    return getattr(skm, name)(labels, pred, **kw)
  return metric


_METRICS = {
    "accuracy": lambda p, y: np.mean(p == y),
    "f1": _sklearn("f1_score", zero_division=0.0),
    "macro_f1": _sklearn("f1_score", average="macro", zero_division=0.0),
    "mcc": _sklearn("matthews_corrcoef"),
    "pearson": _corr("pearsonr"),
    "spearman": _corr("spearmanr"),
    "mse": lambda p, y: np.mean((p - y) ** 2),
}


def word_sequences(predictions, labels_NxW) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """(gold, predicted) tag-id sequences per sentence from word-level predictions (ids [N, W] or
  logits [N, W, C]) and labels [N, W] padded with -1."""
  pred = np.asarray(predictions)
  if pred.ndim == 3:
    pred = pred.argmax(-1)
  labels = np.asarray(labels_NxW)
  if pred.shape != labels.shape:
    raise RomeFlaxError(f"word predictions {pred.shape} and labels {labels.shape} do not match")
  counts = (labels >= 0).sum(1)
  return [labels[i, :k] for i, k in enumerate(counts)], [pred[i, :k] for i, k in enumerate(counts)]


def per_exit_metrics(task: TaskSpec, logits_ExNxC, labels_N) -> list[dict]:
  """The task's metrics of every exit used alone: [{"exit": 1, <metric>: ...}, ..., {"exit": L, ...}]."""
  return [{"exit": e + 1, **compute_metrics(task, z_NxC, labels_N)} for e, z_NxC in enumerate(np.asarray(logits_ExNxC))]


# ----------------------------------------------------------------------------- sequence labelling



def _split_tag(tag: str) -> tuple[str, str]:
  """('B'|'I'|'E'|'S', type) of an entity tag, ('O', '') of 'O'."""
  if tag == "O":
    return "O", ""
  prefix, sep, kind = tag.partition("-")
  if not (sep and kind and prefix in ENTITY_PREFIXES):
    raise RomeFlaxError(f"tag {tag!r} is not an entity tag (O, or B-/I-/E-/S- and a type)")
  return prefix, kind


def entity_spans(tags) -> list[tuple[str, int, int]]:
  """(type, start, end inclusive) of the entities of one sentence, exactly as conlleval (and seqeval's
  default mode) reads them: B-X and S-X start an entity, so does an I-X or E-X after O, after an
  entity's end or after another type (accepted, as conlleval does); E-X and S-X end one."""
  spans = []
  prev_tag, prev_type, begin = "O", "", 0
  for i, tag in enumerate(list(tags) + ["O"]):
    cur, kind = _split_tag(tag)
    ended = (prev_tag in ("E", "S")
             or (prev_tag in ("B", "I") and cur in ("B", "S", "O"))
             or (prev_tag != "O" and prev_type != kind))
    if ended:
      spans.append((prev_type, begin, i - 1))
    started = (cur in ("B", "S")
               or (prev_tag in ("E", "S", "O") and cur in ("E", "I"))
               or (cur != "O" and prev_type != kind))
    if started:
      begin = i
    prev_tag, prev_type = cur, kind
  return spans


def _check_aligned(gold, pred) -> None:
  if len(gold) != len(pred):
    raise RomeFlaxError(f"{len(pred)} predicted sentences for {len(gold)} gold sentences")
  for i, (g, p) in enumerate(zip(gold, pred)):
    if len(g) != len(p):
      raise RomeFlaxError(f"sentence {i}: {len(p)} predicted tags for {len(g)} words")


def _prf(tp: int, n_pred: int, n_gold: int) -> dict[str, float]:
  """Percent precision, recall, F1; 0 where a denominator is 0 (nothing predicted, nothing to find)."""
  precision = tp / n_pred if n_pred else 0.0
  recall = tp / n_gold if n_gold else 0.0
  f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
  return {"f1": 100.0 * f1, "precision": 100.0 * precision, "recall": 100.0 * recall}


def span_scores(gold, pred) -> dict:
  """Entity-level micro precision / recall / F1 (percent) over sentences of tag strings: an entity
  counts when its type, start and end all match (the CoNLL shared tasks' metric). Also per type
  ({"f1", "precision", "recall", "support"}) and the entity counts."""
  _check_aligned(gold, pred)
  gold_set = {(i, *s) for i, sent in enumerate(gold) for s in entity_spans(sent)}
  pred_set = {(i, *s) for i, sent in enumerate(pred) for s in entity_spans(sent)}
  hits = gold_set & pred_set
  per_type = {}
  for kind in sorted({s[1] for s in gold_set | pred_set}):
    n_gold = sum(s[1] == kind for s in gold_set)
    per_type[kind] = {**_prf(sum(s[1] == kind for s in hits), sum(s[1] == kind for s in pred_set), n_gold),
                      "support": n_gold}
  return {**_prf(len(hits), len(pred_set), len(gold_set)), "per_type": per_type,
          "gold_entities": len(gold_set), "pred_entities": len(pred_set)}


def token_accuracy(gold, pred) -> float:
  """Percent of words whose predicted tag is the gold tag (the POS tagging metric)."""
  _check_aligned(gold, pred)
  total = sum(len(g) for g in gold)
  if total == 0:
    raise RomeFlaxError("no words to score")
  right = sum(a == b for g, p in zip(gold, pred) for a, b in zip(g, p))
  return 100.0 * right / total


def sequence_metrics(tag_names, gold, pred) -> dict[str, float]:
  """The metrics of a token-classification task: entity span F1 / precision / recall for an entity tag
  set (`is_entity_tagging`), else {"accuracy"}. Sentences hold tag strings or tag ids (into tag_names)."""
  names = list(tag_names)
  gold, pred = tag_strings(names, gold), tag_strings(names, pred)
  if is_entity_tagging(names):
    scores = span_scores(gold, pred)
    return {k: scores[k] for k in ("f1", "precision", "recall")}
  return {"accuracy": token_accuracy(gold, pred)}


def tag_strings(names: list[str], sentences) -> list[list[str]]:
  out = []
  for sent in sentences:
    sent = list(sent)
    if sent and not isinstance(sent[0], str):
      ids = np.asarray(sent)
      if ids.dtype.kind not in "iu" or ids.min() < 0 or ids.max() >= len(names):
        raise RomeFlaxError(f"tag ids must be integers in [0, {len(names)}), got {sent[:8]}")
      sent = [names[t] for t in ids]
    out.append(sent)
  return out
