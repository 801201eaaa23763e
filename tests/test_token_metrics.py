"""Sequence-labelling metrics: entity spans and span F1 against seqeval (conlleval), token accuracy."""

import warnings

import numpy as np
import pytest
from seqeval.metrics import classification_report, f1_score, precision_score, recall_score
from seqeval.metrics.sequence_labeling import get_entities

from rome_flax.errors import RomeFlaxError
from rome_flax.kinds import metrics


def seqeval_scores(gold, pred):
  with warnings.catch_warnings():
    warnings.simplefilter("ignore")   # seqeval warns where a denominator is 0 (and scores 0, as we do)
    return (100 * f1_score(gold, pred), 100 * precision_score(gold, pred), 100 * recall_score(gold, pred),
            classification_report(gold, pred, output_dict=True))


def assert_matches_seqeval(gold, pred):
  ours = metrics.span_scores(gold, pred)
  f1, p, r, report = seqeval_scores(gold, pred)
  assert ours["f1"] == pytest.approx(f1) and ours["precision"] == pytest.approx(p)
  assert ours["recall"] == pytest.approx(r)
  types = sorted(k for k in report if k not in ("micro avg", "macro avg", "weighted avg"))
  assert sorted(ours["per_type"]) == types
  for kind in types:
    mine, theirs = ours["per_type"][kind], report[kind]
    assert mine["support"] == theirs["support"]
    for k in ("f1", "precision", "recall"):
      assert mine[k] == pytest.approx(100 * theirs[k if k != "f1" else "f1-score"])
  assert ours["gold_entities"] == sum(len(get_entities(s)) for s in gold)
  assert ours["pred_entities"] == sum(len(get_entities(s)) for s in pred)


@pytest.mark.parametrize("tags, spans", [
    (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 1), ("LOC", 3, 3)]),
    (["O", "I-PER", "I-PER", "O"], [("PER", 1, 2)]),                        # I- after O starts an entity
    (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 0), ("LOC", 1, 2)]),          # type change inside a run
    (["I-PER", "B-PER", "I-PER"], [("PER", 0, 0), ("PER", 1, 2)]),          # B- always starts
    (["O", "O", "B-ORG", "I-ORG"], [("ORG", 2, 3)]),                        # entity at sentence end
    (["I-MISC"], [("MISC", 0, 0)]),
    (["O", "O"], []),
    (["B-PER", "E-PER", "S-LOC", "B-ORG", "I-ORG", "E-ORG", "O"], [("PER", 0, 1), ("LOC", 2, 2), ("ORG", 3, 5)]),
    (["E-PER", "E-PER", "I-PER", "S-PER", "I-PER"], [("PER", 0, 0), ("PER", 1, 1), ("PER", 2, 2), ("PER", 3, 3),
                                                      ("PER", 4, 4)]),
    (["B-FOO-BAR", "I-FOO-BAR"], [("FOO-BAR", 0, 1)]),
])
def test_entity_spans_hand_checked(tags, spans):
  assert metrics.entity_spans(tags) == spans
  assert metrics.entity_spans(tags) == get_entities(tags)


def test_entity_spans_bad_tag():
  with pytest.raises(RomeFlaxError, match="'NN' is not an entity tag"):
    metrics.entity_spans(["O", "NN"])


def test_span_scores_hand_checked():
  gold = [["B-PER", "I-PER", "O", "B-LOC"], ["O", "B-ORG"]]
  pred = [["B-PER", "I-PER", "O", "O"], ["O", "I-ORG"]]   # PER right, LOC missed, I-ORG read as an entity: right
  s = metrics.span_scores(gold, pred)
  assert (s["gold_entities"], s["pred_entities"]) == (3, 2)
  assert s["precision"] == pytest.approx(100) and s["recall"] == pytest.approx(200 / 3)
  assert s["f1"] == pytest.approx(80)
  assert s["per_type"]["LOC"] == {"f1": 0.0, "precision": 0.0, "recall": 0.0, "support": 1}
  # entities never span sentences: I-PER at the start of a sentence is a new entity
  s = metrics.span_scores([["B-PER"], ["I-PER"]], [["B-PER"], ["O"]])
  assert (s["gold_entities"], s["pred_entities"], s["recall"]) == (2, 1, 50.0)
  assert_matches_seqeval([["B-PER"], ["I-PER"]], [["B-PER"], ["O"]])


def test_span_scores_empty_cases():
  none = metrics.span_scores([["O", "O"]], [["O", "O"]])
  assert (none["f1"], none["precision"], none["recall"], none["per_type"]) == (0.0, 0.0, 0.0, {})
  nothing_predicted = metrics.span_scores([["B-PER"]], [["O"]])
  assert (nothing_predicted["f1"], nothing_predicted["precision"], nothing_predicted["recall"]) == (0.0, 0.0, 0.0)
  assert_matches_seqeval([["B-PER"]], [["O"]])
  assert_matches_seqeval([["O"]], [["B-PER"]])
  assert metrics.span_scores([], [])["f1"] == 0.0


@pytest.mark.parametrize("tags", [
    ("O", "B-PER", "I-PER", "B-LOC", "I-LOC", "I-MISC"),
    ("O", "B-PER", "I-PER", "E-PER", "S-PER", "B-LOC", "I-LOC", "E-LOC", "S-LOC"),
])
def test_random_against_seqeval(tags):
  rng = np.random.default_rng(0)
  gold, pred = [], []
  for _ in range(200):
    n = int(rng.integers(1, 12))
    g = [tags[i] for i in rng.integers(0, len(tags), n)]
    # a prediction near the gold: about 40% of the words re-drawn, so some entities match
    p = [tags[rng.integers(0, len(tags))] if rng.random() < 0.4 else t for t in g]
    gold.append(g)
    pred.append(p)
  for g in gold + pred:
    assert metrics.entity_spans(g) == get_entities(g)
  assert_matches_seqeval(gold, pred)
  s = metrics.span_scores(gold, pred)
  assert 0 < s["f1"] < 100 and s["gold_entities"] > 100


def test_misaligned():
  with pytest.raises(RomeFlaxError, match="1 predicted sentences for 2 gold sentences"):
    metrics.span_scores([["O"], ["O"]], [["O"]])
  with pytest.raises(RomeFlaxError, match="sentence 1: 1 predicted tags for 2 words"):
    metrics.token_accuracy([["O"], ["O", "O"]], [["O"], ["O"]])


def test_token_accuracy():
  assert metrics.token_accuracy([["NN", "VB"], ["DT"]], [["NN", "NN"], ["DT"]]) == pytest.approx(200 / 3)
  with pytest.raises(RomeFlaxError, match="no words"):
    metrics.token_accuracy([], [])


def test_is_entity_tagging():
  assert metrics.is_entity_tagging(("O", "B-PER", "I-PER"))
  assert metrics.is_entity_tagging(["B-NP", "I-NP", "E-NP", "S-NP"])
  assert not metrics.is_entity_tagging(("NN", "VB"))
  assert not metrics.is_entity_tagging(("O", "B-PER", "NN"))
  assert not metrics.is_entity_tagging(("O", "B-"))
  assert not metrics.is_entity_tagging(("O",))
  assert not metrics.is_entity_tagging(())


def test_sequence_metrics():
  names = ("O", "B-PER", "I-PER", "B-LOC")
  gold = [["B-PER", "I-PER", "O", "B-LOC"]]
  pred = [["B-PER", "I-PER", "O", "O"]]
  m = metrics.sequence_metrics(names, gold, pred)
  assert set(m) == {"f1", "precision", "recall"} and m["precision"] == 100.0 and m["recall"] == 50.0
  ids = metrics.sequence_metrics(names, [np.array([1, 2, 0, 3], np.int32)], [np.array([1, 2, 0, 0])])
  assert ids == m
  pos = metrics.sequence_metrics(("DT", "NN", "VB"), [["DT", "NN"]], [np.array([0, 2])])
  assert pos == {"accuracy": 50.0}
  with pytest.raises(RomeFlaxError, match="tag ids must be integers"):
    metrics.sequence_metrics(("DT", "NN"), [["DT"]], [[5]])
