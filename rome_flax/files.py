"""Atomic file and directory writes: the one place that writes results, logs' rewrites and exports.

A file is written to a temporary name in the same directory, flushed and renamed over its target;
a directory is staged beside its target and swapped in. A crash, a full disk or a bad input
therefore never leaves a half-written result, and an earlier result stays intact until its
replacement is complete.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np

from rome_flax.errors import RomeFlaxError


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
  path = Path(path)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  except OSError as e:
    raise RomeFlaxError(f"cannot write {path}: {e.strerror or e}") from None
  try:
    with os.fdopen(fd, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.unlink(tmp)
    raise
  return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
  return atomic_write_bytes(path, text.encode("utf-8"))


def _json_default(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def write_json(path: str | os.PathLike, obj, *, sort_keys: bool = False) -> Path:
  return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=_json_default) + "\n")


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike) -> Iterator[Path]:
  """Yields an empty staging directory beside `target`; on success it replaces `target` (an
  existing one is moved aside first and deleted only once the new one is in place); on any
  failure the stage is removed and `target` is untouched."""
  target = Path(target).absolute()
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
  except OSError as e:
    raise RomeFlaxError(f"cannot write {target}: {e.strerror or e}") from None
  try:
    yield stage
    if target.exists():
      old = target.with_name(target.name + ".old")
      shutil.rmtree(old, ignore_errors=True)
      target.rename(old)
      stage.rename(target)
      shutil.rmtree(old, ignore_errors=True)
    else:
      stage.rename(target)
  except BaseException:
    shutil.rmtree(stage, ignore_errors=True)
    raise
