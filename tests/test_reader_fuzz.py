"""The data readers on arbitrary bytes: each file loads or is refused with a RomeFlaxError (one line
for the CLI), never any other exception. A few hundred generated files in all, a few seconds."""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rome_flax.errors import RomeFlaxError
from rome_flax.kinds import data
from rome_flax.kinds.tasks import get_task

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DIR = Path(tempfile.mkdtemp(prefix="rome_flax_fuzz_"))   # made at import (each xdist worker collects the module)
atexit.register(shutil.rmtree, DIR, ignore_errors=True)

# Text that hits the readers' seams: separators, quotes, newlines, BOMs, NULs, bad UTF-8 once encoded.
SEAMS = list(',\t"\'\n\r{}[]:;\\ 01.5e-') + ["\x00", "\ufeff", "é", "label", "text", "pos", "neg", "NaN", "null"]
texts = st.lists(st.sampled_from(SEAMS) | st.text(max_size=4), max_size=60).map("".join)
raw = st.binary(max_size=400) | texts.map(lambda t: t.encode("utf-8")) | texts.map(
    lambda t: t.encode("utf-8", errors="replace")[:-1])
json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
                           lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=5), inner,
                                                                                        max_size=3), max_leaves=8)
records = st.lists(st.dictionaries(st.sampled_from(["text", "label", "other", "text_b"]), json_values, max_size=4),
                   max_size=6)


def write(name: str, content: bytes) -> Path:
  path = DIR / name
  path.write_bytes(content)
  return path


def loads_or_refuses(fn) -> None:
  try:
    fn()
  except RomeFlaxError as e:
    assert str(e) and "\n" not in str(e)


@FUZZ
@given(content=raw, suffix=st.sampled_from([".csv", ".tsv", ".jsonl"]))
def test_read_records(content, suffix):
  path = write("f" + suffix, content)
  loads_or_refuses(lambda: data.read_records(path))


@FUZZ
@given(content=raw, suffix=st.sampled_from([".csv", ".jsonl"]), regression=st.booleans())
def test_custom_split(content, suffix, regression):
  path = write("train" + suffix, content)

  def load():
    task = (get_task("custom", regression=True) if regression
            else get_task("custom", label_names=data.custom_label_names(path)))
    files = {"train": str(path)}
    split = data.load_split(task, "train", files=files, text_a_column="text", label_column="label")
    assert len(split) == len(split.labels) and split.labels.dtype == (np.float32 if regression else np.int64)
    streamed = list(data.stream_split(task, "train", files=files, text_a_column="text", chunk_rows=2))
    assert sum(len(c) for c in streamed) == len(split)

  loads_or_refuses(load)


@FUZZ
@given(rows=records)
def test_custom_jsonl_records(rows):
  path = write("train.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8"))
  loads_or_refuses(lambda: data.load_split(get_task("custom", label_names=("pos", "neg")), "dev",
                                           files={"dev": str(path)}, text_a_column="text", text_b_column="text_b"))


@FUZZ
@given(content=raw, task=st.sampled_from(["sst-2", "cola", "sts-b", "mnli"]), split=st.sampled_from(["train", "test"]))
def test_glue_tsv(content, task, split):
  spec = get_task(task)
  glue = DIR / "glue"
  glue.mkdir(exist_ok=True)
  file = spec.tsv_layout(split if split in dict(spec.tsv) else f"{split}_matched").file
  write(f"glue/{file}", content)
  loads_or_refuses(lambda: data.load_split(spec, split if split in dict(spec.tsv) else f"{split}_matched",
                                           data_dir=str(glue)))
