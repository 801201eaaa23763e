"""Task registry: what each task's labels and metrics are, and where its files and columns live.

One `TaskSpec` per GLUE task, the embedded 'synthetic' task, 'custom' (a user's CSV / JSON Lines
files), and the sequence-labelling tasks (`kind='token'`: 'conll2003', 'ner', 'pos'), whose tag set
is read from their training split (`token_task`). The GLUE column layouts are the ones the GLUE download script writes (the layout of
../shared/glue): CoLA's train/dev files have no header, every other file has one.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional, Sequence

from rome_flax.errors import RomeFlaxError


@dataclasses.dataclass(frozen=True)
class TsvLayout:
  """Columns of one split's TSV file: a header name, or an int position for headerless files."""
  file: str
  text_a: str | int
  text_b: str | int | None = None
  label: str | int | None = None       # None: an unlabelled (test) split
  index: str | int | None = None       # example id column; None: the row number
  header: bool = True


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  name: str
  num_labels: int                          # 1 = regression
  label_names: tuple[str, ...]             # label id -> name as written in the data; () for regression
  metric_names: tuple[str, ...]
  primary_metric: str
  eval_splits: tuple[str, ...] = ("dev",)  # dev split(s) evaluated during training
  hf_name: Optional[str] = None            # config of the `glue` dataset on the hub
  hf_splits: tuple[tuple[str, str], ...] = ()   # rome_flax split -> hub split
  tsv: tuple[tuple[str, TsvLayout], ...] = ()   # rome_flax split -> TSV layout
  protect_final: bool = False              # GR default: protect the final exit (MNLI, QQP) or the highways
  kind: str = "sequence"                   # 'sequence': a label per example; 'token': a tag per word

  @property
  def is_token_task(self) -> bool:
    return self.kind == "token"

  @property
  def is_regression(self) -> bool:
    return self.num_labels == 1

  def tsv_layout(self, split: str) -> TsvLayout:
    layouts = dict(self.tsv)
    if split not in layouts:
      raise RomeFlaxError(f"task {self.name} has no split {split!r}; splits: {', '.join(layouts)}")
    return layouts[split]

  def label_id(self, raw: str) -> Optional[int]:
    """Label id of a label as written in a file ('1', 'entailment'); None when not in the label set."""
    raw = raw.strip()
    if raw in self.label_names:
      return self.label_names.index(raw)
    return None


_ACC = (("accuracy",), "accuracy")
_ACC_F1 = (("accuracy", "f1"), "f1")


def _single(text: str, label: str):
  return (("train", TsvLayout("train.tsv", text, None, label)),
          ("dev", TsvLayout("dev.tsv", text, None, label)),
          ("test", TsvLayout("test.tsv", text, None, None, "index")))


def _pair(a, b, label, index="index", test_index="index"):
  return (("train", TsvLayout("train.tsv", a, b, label, index)),
          ("dev", TsvLayout("dev.tsv", a, b, label, index)),
          ("test", TsvLayout("test.tsv", a, b, None, test_index)))


_GLUE = [
    TaskSpec("cola", 2, ("0", "1"), ("mcc",), "mcc", hf_name="cola",
             tsv=(("train", TsvLayout("train.tsv", 3, None, 1, None, header=False)),
                  ("dev", TsvLayout("dev.tsv", 3, None, 1, None, header=False)),
                  ("test", TsvLayout("test.tsv", "sentence", None, None, "index")))),
    TaskSpec("sst-2", 2, ("0", "1"), *_ACC, hf_name="sst2", tsv=_single("sentence", "label")),
    TaskSpec("mrpc", 2, ("0", "1"), *_ACC_F1, hf_name="mrpc",
             tsv=(("train", TsvLayout("train.tsv", "#1 String", "#2 String", "Quality")),
                  ("dev", TsvLayout("dev.tsv", "#1 String", "#2 String", "Quality")),
                  ("test", TsvLayout("test.tsv", "#1 String", "#2 String", None, "index")))),
    TaskSpec("qqp", 2, ("0", "1"), *_ACC_F1, hf_name="qqp", protect_final=True,
             tsv=_pair("question1", "question2", "is_duplicate", index="id", test_index="id")),
    TaskSpec("sts-b", 1, (), ("pearson", "spearman"), "pearson", hf_name="stsb",
             tsv=_pair("sentence1", "sentence2", "score")),
    TaskSpec("mnli", 3, ("entailment", "neutral", "contradiction"), ("accuracy",), "accuracy",
             eval_splits=("dev_matched", "dev_mismatched"), hf_name="mnli", protect_final=True,
             tsv=(("train", TsvLayout("train.tsv", "sentence1", "sentence2", "gold_label", "index")),
                  ("dev_matched", TsvLayout("dev_matched.tsv", "sentence1", "sentence2", "gold_label", "index")),
                  ("dev_mismatched", TsvLayout("dev_mismatched.tsv", "sentence1", "sentence2", "gold_label",
                                               "index")),
                  ("test_matched", TsvLayout("test_matched.tsv", "sentence1", "sentence2", None, "index")),
                  ("test_mismatched", TsvLayout("test_mismatched.tsv", "sentence1", "sentence2", None,
                                                "index"))),
             hf_splits=(("train", "train"), ("dev_matched", "validation_matched"),
                        ("dev_mismatched", "validation_mismatched"), ("test_matched", "test_matched"),
                        ("test_mismatched", "test_mismatched"))),
    TaskSpec("qnli", 2, ("entailment", "not_entailment"), *_ACC, hf_name="qnli",
             tsv=_pair("question", "sentence", "label")),
    TaskSpec("rte", 2, ("entailment", "not_entailment"), *_ACC, hf_name="rte",
             tsv=_pair("sentence1", "sentence2", "label")),
    TaskSpec("wnli", 2, ("0", "1"), *_ACC, hf_name="wnli", tsv=_pair("sentence1", "sentence2", "label")),
]
_DEFAULT_HF_SPLITS = (("train", "train"), ("dev", "validation"), ("test", "test"))
_GLUE = [t if t.hf_splits else dataclasses.replace(t, hf_splits=_DEFAULT_HF_SPLITS) for t in _GLUE]

SYNTHETIC = TaskSpec("synthetic", 2, ("negative", "positive"), ("accuracy",), "accuracy",
                     hf_splits=(("train", "train"), ("dev", "dev"), ("test", "test")))

_REGISTRY = {t.name: t for t in _GLUE + [SYNTHETIC]}
_ALIASES = {"sst2": "sst-2", "stsb": "sts-b", "sts": "sts-b", "mnli-m": "mnli", "mnli-mm": "mnli",
            "conll": "conll2003", "conll-2003": "conll2003"}
GLUE_TASKS = tuple(t.name for t in _GLUE)
# Sequence labelling: 'conll2003' (NER; --data_dir with train/dev/test.txt, or the hub), 'ner' and
# 'pos' (a user's CoNLL column or JSON Lines files). Their tag sets come from the training split.
TOKEN_TASKS = ("conll2003", "ner", "pos")
TASK_NAMES = GLUE_TASKS + ("synthetic", "custom") + TOKEN_TASKS


def is_token_task_name(name: str) -> bool:
  key = str(name).strip().lower()
  return _ALIASES.get(key, key) in TOKEN_TASKS


ENTITY_PREFIXES = ("B", "I", "E", "S")


def is_entity_tagging(tag_names) -> bool:
  """True when every tag is 'O' or <B|I|E|S>-<type> (BIO / IOB2 / IOBES): entity-level F1 applies."""
  def entity_tag(tag: str) -> bool:
    prefix, dash, kind = str(tag).partition("-")
    return tag == "O" or (bool(dash) and prefix in ENTITY_PREFIXES and bool(kind))
  tags = list(tag_names)
  return bool(tags) and all(entity_tag(t) for t in tags) and any(t != "O" for t in tags)


def token_task(name: str, tag_names) -> TaskSpec:
  """A sequence-labelling task over `tag_names` (the training split's tag set, in its saved order).

  The metric follows the tag set: entity-level micro F1 / precision / recall (conlleval) when every
  tag is O or B-/I-/E-/S-<type>, else token accuracy (POS)."""
  key = str(name).strip().lower()
  key = _ALIASES.get(key, key)
  tag_names = tuple(str(t) for t in tag_names)
  if len(tag_names) < 2 or len(set(tag_names)) != len(tag_names):
    raise RomeFlaxError(f"a tag set needs at least two distinct tags, got {list(tag_names)}")
  entities = is_entity_tagging(tag_names)
  names, primary = (("f1", "precision", "recall"), "f1") if entities else (("accuracy",), "accuracy")
  return TaskSpec(key, len(tag_names), tag_names, names, primary, kind="token",
                  hf_name="conll2003" if key == "conll2003" else None)


def custom_task(label_names: Optional[tuple[str, ...]] = None, regression: bool = False,
                name: str = "custom") -> TaskSpec:
  """A user's own task from CSV / JSON Lines files: classification over `label_names`, or regression."""
  if regression:
    return TaskSpec(name, 1, (), ("pearson", "spearman", "mse"), "pearson")
  if not label_names or len(label_names) < 2:
    raise RomeFlaxError("a custom classification task needs at least two label names (custom_labels)")
  if len(set(label_names)) != len(label_names):
    raise RomeFlaxError(f"custom label names repeat: {list(label_names)}")
  metrics = ("accuracy", "f1") if len(label_names) == 2 else ("accuracy", "macro_f1")
  return TaskSpec(name, len(label_names), tuple(str(x) for x in label_names), metrics, "accuracy")


def labels_from_data(name: str) -> bool:
  """True when the registry does not fix a task's label names: a token task's tag set and a custom
  task's classes come from its data (train.py) or its export (infer.py)."""
  key = str(name).strip().lower()
  return _ALIASES.get(key, key) in TOKEN_TASKS or key == "custom"


def resolve_task(name: str, labels: Callable[[], Sequence[str]], regression: bool = False) -> TaskSpec:
  """A task by name, completed by what only its data or its model can say: the label names when the
  registry has none (`labels_from_data`; `labels()` is called only then) and whether a custom task is a
  regression. train.py reads them from the training data, infer.py from the export; both resolve here."""
  if not labels_from_data(name):
    return get_task(name)
  if is_token_task_name(name):
    return get_task(name, tag_names=labels())
  return custom_task(regression=True) if regression else custom_task(tuple(labels() or ()) or None)


STAND_IN_LABELS = ("O", "B-X")


def stand_in(name: str, regression: bool = False) -> TaskSpec:
  """The task with placeholder labels where its data would give them: its kind, metric family and whether
  it regresses, before (or without) reading any data."""
  return resolve_task(name, lambda: STAND_IN_LABELS, regression)


def get_task(name: str, **custom) -> TaskSpec:
  """The TaskSpec of a GLUE task ('sst-2', 'SST2', 'MNLI', ...), 'synthetic', or 'custom' (see custom_task)."""
  key = str(name).strip().lower()
  key = _ALIASES.get(key, key)
  if key == "custom":
    return custom_task(**custom)
  if key in TOKEN_TASKS:
    return token_task(key, **custom)
  if key not in _REGISTRY:
    raise RomeFlaxError(f"unknown task {name!r}; known tasks: {', '.join(TASK_NAMES)}")
  return _REGISTRY[key]
