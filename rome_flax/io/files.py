"""Atomic file and directory writes: the one place that writes results, logs' rewrites and exports.

A file is written to a temporary name in the same directory, flushed and renamed over its target;
a directory is staged beside its target and swapped in. A crash, a full disk or a bad input
therefore never leaves a half-written result, and an earlier result stays intact until its
replacement is complete.

Output directories (a run, infer results, an export) are marked `rome_flax_output.json` by rome_flax:
`--overwrite` replaces only what carries that mark and holds nothing else (`check_replaceable`).
A locked directory's results are staged inside it and swapped in whole (`staged_output`); an
overwritten run is moved aside and put back if its replacement fails early (`move_aside`); a kill
at any moment of either is settled by the next rome_flax command there (`settle_output`).
Files and directories are created with the process's umask (`mkstemp`/`mkdtemp` alone would give
0600 / 0700).
"""

from __future__ import annotations

import contextlib
import fnmatch
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
from typing import Iterator, Optional, Sequence

import numpy as np

from rome_flax.errors import RomeFlaxError
from rome_flax.io.runlock import LOCK_FILE

log = logging.getLogger(__name__)


def atomic_write_bytes(path: str | os.PathLike, data) -> Path:
  """Writes `data` (bytes, or an iterable of bytes chunks written as they come, so a large file
  never has to exist in memory) to a temporary file beside `path`, then renames it over `path`."""
  path = Path(path)
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.fchmod(fd, 0o666 & ~umask())
  except OSError as e:
    raise RomeFlaxError(f"cannot write {path}: {e.strerror or e}") from None
  try:
    with os.fdopen(fd, "wb") as f:
      for chunk in ([data] if isinstance(data, (bytes, bytearray)) else data):
        write_chunk(f, chunk)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except OSError as e:
    _unlink_quietly(tmp)
    raise RomeFlaxError(f"cannot write {path}: {e.strerror or e}") from None
  except BaseException:
    _unlink_quietly(tmp)
    raise
  return path


def write_chunk(f, chunk: bytes) -> None:
  """Every byte a result file gets passes here (tests put a failing disk in its place)."""
  f.write(chunk)


def _unlink_quietly(path) -> None:
  try:
    os.unlink(path)
  except OSError:
    pass


def umask() -> int:
  """The process's umask, read without changing it (/proc; else set and put back at once)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  mask = os.umask(0o022)
  os.umask(mask)
  return mask


def make_temp_dir(prefix: str, parent: Path) -> Path:
  """tempfile.mkdtemp with the umask's permissions (mkdtemp alone makes it 0700)."""
  stage = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
  os.chmod(stage, 0o777 & ~umask())
  return stage


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
    stage = make_temp_dir(f".{target.name}.tmp-{_HOST}-{os.getpid()}-", target.parent)
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


# ----------------------------------------------------------------------------- output directories

OUTPUT_MARKER = "rome_flax_output.json"   # {"written_by": "rome_flax", "kind": "train" | "infer" | ...}
STAGE_PREFIX = ".rome_flax_stage-"        # a locked directory's next results, until swapped in
SWAPPED_OUT = ".rome_flax_swapped_out"    # its previous results, during the swap
REPLACED = ".rome_flax_replaced"          # an overwritten run, until its replacement holds
MOVED = ".moved"                          # in SWAPPED_OUT / REPLACED: every entry has been moved there
# "." + STAGE_PREFIX: the staging directory of a directory written inside a stage (an export's).
OWN_ENTRIES = (OUTPUT_MARKER, LOCK_FILE, STAGE_PREFIX + "*", "." + STAGE_PREFIX + "*", SWAPPED_OUT, REPLACED, ".*.tmp")


def check_output_value(value) -> Path:
  """An --output_dir value as a path; empty (which would mean the current directory) is refused."""
  if value is None or not str(value).strip():
    raise RomeFlaxError("--output_dir is empty: name a directory (an empty value would mean the current one)")
  return Path(os.path.expanduser(str(value)))


def mark_output(directory: Path, kind: str) -> Path:
  return write_json(Path(directory) / OUTPUT_MARKER, {"written_by": "rome_flax", "kind": kind})


def output_kind(directory: Path) -> Optional[str]:
  """The kind of output rome_flax marked `directory` as holding; None when unmarked or unreadable."""
  try:
    mark = json.loads((Path(directory) / OUTPUT_MARKER).read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, ValueError):
    return None
  return str(mark.get("kind")) if isinstance(mark, dict) and mark.get("written_by") == "rome_flax" else None


def _listed(names: Sequence[str], limit: int = 5) -> str:
  shown = ", ".join(sorted(names)[:limit])
  return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def entries(directory: Path) -> list[str]:
  """The names in `directory` besides rome_flax's own bookkeeping (lock, marker, stages)."""
  if not Path(directory).is_dir():
    return []
  return sorted(p.name for p in Path(directory).iterdir() if not any(fnmatch.fnmatch(p.name, g) for g in OWN_ENTRIES))


def check_output_target(directory: Path, shown: str, overwrite: bool, kind: str, ours: Sequence[str],
                        legacy: Optional[str] = None, occupied: str = "already exists") -> None:
  """A directory a command is about to fill: not a file; empty, unless `overwrite`, which replaces only
  rome_flax output of `kind` (`check_replaceable`). `shown` names it in the messages (e.g. '--out DIR')."""
  directory = Path(directory)
  if directory.exists() and not directory.is_dir():
    raise RomeFlaxError(f"{shown} is a file")
  if entries(directory) and not overwrite:
    raise RomeFlaxError(f"{shown} {occupied}; pass --overwrite to replace it")
  if overwrite:
    check_replaceable(directory, kind, ours, legacy=legacy)


def check_replaceable(directory: Path, kind: str, ours: Sequence[str], legacy: Optional[str] = None) -> None:
  """--overwrite's rule: a directory is replaced only when rome_flax marked it as `kind` output (or,
  written before the mark existed, it holds `legacy`) and it holds nothing but such output (the
  glob patterns `ours`); otherwise one error names what is not ours."""
  directory = Path(directory)
  found = entries(directory)
  if not found:
    return
  marked = output_kind(directory)
  if marked is None and legacy is not None and (directory / legacy).exists():
    marked = kind
  if marked is None:
    raise RomeFlaxError(f"--overwrite: {directory} was not written by rome_flax (no {OUTPUT_MARKER}); it holds "
                        f"{_listed(found)}, which --overwrite never deletes: move them or choose another directory")
  if marked != kind:
    raise RomeFlaxError(f"--overwrite: {directory} holds rome_flax {marked} output, not {kind} output; choose "
                        "another directory")
  # A directory rome_flax marked as its own output (infer results written inside a run, as the README's
  # first command does) is ours too: it goes with the run it was made from.
  foreign = [n for n in found if not any(fnmatch.fnmatch(n, g) for g in ours)
             and not ((directory / n).is_dir() and output_kind(directory / n) is not None)]
  if foreign:
    raise RomeFlaxError(f"--overwrite: {directory} also holds {_listed(foreign)}, which rome_flax did not write "
                        "and --overwrite never deletes: move them or choose another directory")


def _move_all(src: Path, dst: Path, skip: Sequence[str]) -> None:
  """Every entry of src but `skip` into dst (created), then dst/.moved: a kill leaves either some
  entries moved and no .moved, or all moved."""
  dst.mkdir(exist_ok=True)
  for p in sorted(src.iterdir()):
    if p.name in skip or p == dst:
      continue
    if p.is_dir() and (dst / p.name).is_dir():
      _replace_dir(p, dst / p.name)
    else:
      os.replace(p, dst / p.name)
  atomic_write_text(dst / MOVED, "")


def _replace_dir(src: Path, dst: Path) -> None:
  shutil.rmtree(dst)
  src.rename(dst)


def _remove(p: Path) -> None:
  if p.is_dir() and not p.is_symlink():
    shutil.rmtree(p)
  elif p.exists() or p.is_symlink():
    p.unlink()


def move_aside(directory: Path) -> None:
  """An overwritten run's entries into directory/.rome_flax_replaced (the caller holds the lock);
  `restore_aside` puts them back, `drop_aside` deletes them once the new run holds."""
  directory = Path(directory)
  _move_all(directory, directory / REPLACED, skip=(LOCK_FILE, REPLACED))


def restore_aside(directory: Path) -> bool:
  """Puts an overwritten run back in place of its replacement (a kill while it was being moved aside
  leaves part of it in place: that part stays). True when there was one to put back."""
  directory, aside = Path(directory), Path(directory) / REPLACED
  if not aside.is_dir():
    return False
  if (aside / MOVED).exists():   # everything in the directory besides it is the replacement's
    for p in directory.iterdir():
      if p.name not in (LOCK_FILE, REPLACED):
        _remove(p)
    (aside / MOVED).unlink()
  for p in sorted(aside.iterdir()):
    if p.name != MOVED and not (directory / p.name).exists():
      p.rename(directory / p.name)
  shutil.rmtree(aside)
  return True


def drop_aside(directory: Path) -> None:
  shutil.rmtree(Path(directory) / REPLACED, ignore_errors=True)


def _swap_in(directory: Path, stage: Path) -> None:
  """A complete stage's entries replace the directory's: the old ones moved out (all, then .moved),
  the new ones in (the marker last), the old ones deleted. `settle_output` finishes it after a kill."""
  out = directory / SWAPPED_OUT
  if not (out / MOVED).exists():
    _move_all(directory, out, skip=(LOCK_FILE, SWAPPED_OUT, stage.name))
  for p in sorted(stage.iterdir(), key=lambda p: p.name == OUTPUT_MARKER):
    target = directory / p.name
    if p.is_dir() and target.is_dir():
      _replace_dir(p, target)
    else:
      os.replace(p, target)
  stage.rmdir()
  shutil.rmtree(out)


def settle_output(directory: Path) -> None:
  """What a kill left in a locked output directory (the caller holds its lock, so every writer there
  has ended): a complete stage (marked) is swapped in, an incomplete one deleted; a run moved aside
  for --overwrite is left to its caller (`restore_aside` / `drop_aside`)."""
  directory = Path(directory)
  if not directory.is_dir():
    return
  for stage in sorted(directory.glob(glob.escape(STAGE_PREFIX) + "*")):
    if (stage / OUTPUT_MARKER).is_file():
      _swap_in(directory, stage)
      log.warning("finished swapping in the results in %s (the writer was stopped mid-swap)", directory)
    else:
      shutil.rmtree(stage, ignore_errors=True)
  for nested in directory.glob(glob.escape("." + STAGE_PREFIX) + "*"):   # a killed writer's inner stage
    shutil.rmtree(nested, ignore_errors=True)
  if (directory / SWAPPED_OUT).is_dir():   # the swap had moved the stage's last entry in
    shutil.rmtree(directory / SWAPPED_OUT)


@contextlib.contextmanager
def staged_output(directory: Path, kind: str, commit_if=lambda: True) -> Iterator[Path]:
  """Yields an empty stage inside the (locked) `directory`; when the block succeeds the stage, marked
  as `kind` output, replaces everything the directory held but its lock, so the directory holds one
  run's complete output before and after (a kill mid-swap is finished by `settle_output`). On any
  failure, or when `commit_if()` raises, the stage is deleted and the directory is as it was."""
  directory = Path(directory)
  try:
    stage = make_temp_dir(STAGE_PREFIX, directory)
  except OSError as e:
    raise RomeFlaxError(f"cannot write in {directory}: {e.strerror or e}") from None
  try:
    yield stage
    commit_if()
    mark_output(stage, kind)   # last: a marked stage is complete
  except BaseException:
    shutil.rmtree(stage, ignore_errors=True)
    raise
  try:
    _swap_in(directory, stage)
  except OSError as e:   # e.g. a full disk for .moved: the next rome_flax command there finishes the swap
    raise RomeFlaxError(f"cannot swap the new results into {directory}: {e.strerror or e}") from None
