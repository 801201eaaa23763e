"""Atomic file and directory writes: the one place that writes results, logs' rewrites and exports.

A file is written to a temporary name in the same directory, flushed and renamed over its target;
a directory is staged beside its target and swapped in. A crash, a full disk or a bad input
therefore never leaves a half-written result, and an earlier result stays intact until its
replacement is complete.
"""

from __future__ import annotations

import contextlib
import glob
import json
import logging
import os
import re
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Iterator

import numpy as np

from rome_flax.errors import RomeFlaxError

log = logging.getLogger(__name__)


def atomic_write_bytes(path: str | os.PathLike, data) -> Path:
  """Writes `data` (bytes, or an iterable of bytes chunks written as they come, so a large file
  never has to exist in memory) to a temporary file beside `path`, then renames it over `path`."""
  path = Path(path)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
  except OSError as e:
    raise RomeFlaxError(f"cannot write {path}: {e.strerror or e}") from None
  try:
    with os.fdopen(fd, "wb") as f:
      for chunk in ([data] if isinstance(data, (bytes, bytearray)) else data):
        f.write(chunk)
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


def atomic_write_lines(path: str | os.PathLike, lines, lines_per_chunk: int = 4096) -> Path:
  """Writes an iterable of lines (each ending in a newline) a chunk at a time (streamed outputs)."""
  def chunks():
    buf = []
    for line in lines:
      buf.append(line)
      if len(buf) == lines_per_chunk:
        yield "".join(buf).encode("utf-8")
        buf = []
    if buf:
      yield "".join(buf).encode("utf-8")
  return atomic_write_bytes(path, chunks())


def _json_default(x):
  if isinstance(x, np.generic):
    return x.item()
  if isinstance(x, np.ndarray):
    return x.tolist()
  raise TypeError(f"not JSON serialisable: {type(x).__name__}")


def write_json(path: str | os.PathLike, obj, *, sort_keys: bool = False) -> Path:
  return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=sort_keys, default=_json_default) + "\n")


_HOST = re.sub(r"[^A-Za-z0-9.]", "_", socket.gethostname()) or "host"
LEGACY_STAGE_AGE_S = 600   # stages named without their writer (older rome_flax) count as stale after this


def _stale_stage(stage: Path) -> bool:
  """A staging directory whose writer is gone: a dead pid of this host, or an old unnamed stage."""
  m = re.search(r"\.tmp-(.+)-(\d+)-[^-]+$", stage.name)
  try:
    age = time.time() - stage.stat().st_mtime
  except OSError:
    return False
  if m is None:
    return age > LEGACY_STAGE_AGE_S
  if m.group(1) != _HOST:
    return age > 24 * 3600
  try:
    os.kill(int(m.group(2)), 0)
  except ProcessLookupError:
    return True
  except (PermissionError, OverflowError):
    return False
  return False


def clean_stale_stages(target: Path) -> None:
  """What a killed `staged_directory` left beside `target`: stages of dead writers are removed, and
  a target caught mid-swap (moved aside, its replacement not yet in place) is put back."""
  old = target.with_name(target.name + ".old")
  if not target.exists() and old.is_dir():
    old.rename(target)
    log.warning("restored %s from %s (a replacement was cut off mid-swap)", target, old.name)
  for stage in target.parent.glob(f".{glob.escape(target.name)}.tmp-*"):
    if stage.is_dir() and _stale_stage(stage):
      shutil.rmtree(stage, ignore_errors=True)


@contextlib.contextmanager
def staged_directory(target: str | os.PathLike) -> Iterator[Path]:
  """Yields an empty staging directory beside `target`; on success it replaces `target` (an
  existing one is moved aside first and deleted only once the new one is in place); on any
  failure the stage is removed and `target` is untouched. Stages left by killed writers are
  cleaned first (`clean_stale_stages`)."""
  target = Path(target).absolute()
  try:
    target.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_stages(target)
    stage = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{_HOST}-{os.getpid()}-", dir=target.parent))
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
