"""Checksum manifests: how a reader tells an intact checkpoint or export from a damaged one.

Orbax verifies nothing on restore: 64 garbled bytes in a data file load as wrong numbers without a
word. So every saved checkpoint step and every export gets `rome_flax_checksums.json` (SHA-256 and
size of each of its files), written atomically once the save has finished; a directory whose files
no longer match it is damaged, and one without it was either cut off before its save finished or
written by an older rome_flax (`unverified`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any, Optional

import jax

from rome_flax.io.files import write_json

MANIFEST = "rome_flax_checksums.json"
FORMAT = "rome_flax_checksums/1"
INTACT, UNVERIFIED, DAMAGED = "intact", "unverified", "damaged"


@dataclasses.dataclass(frozen=True)
class Verdict:
  status: str                      # INTACT, UNVERIFIED or DAMAGED
  problem: Optional[str] = None    # what is wrong (DAMAGED) or missing (UNVERIFIED)

  @property
  def intact(self) -> bool:
    return self.status == INTACT


def sha256_of(path: Path) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for block in iter(lambda: f.read(1 << 20), b""):
      h.update(block)
  return h.hexdigest()


def _files(directory: Path) -> list[str]:
  """Every file under directory (relative, '/'-separated, sorted), the manifest itself excepted."""
  out = []
  for root, dirs, names in os.walk(directory):
    dirs.sort()
    for name in names:
      rel = os.path.relpath(os.path.join(root, name), directory).replace(os.sep, "/")
      if rel != MANIFEST:
        out.append(rel)
  return sorted(out)


def write_manifest(directory: str | os.PathLike) -> Path:
  """Checksums every file of `directory` into its manifest (atomically: a reader sees all or none)."""
  directory = Path(directory)
  files = {rel: {"size": (directory / rel).stat().st_size, "sha256": sha256_of(directory / rel)}
           for rel in _files(directory)}
  return write_json(directory / MANIFEST, {"format": FORMAT, "files": files}, sort_keys=True)


def verify(directory: str | os.PathLike) -> Verdict:
  """Whether `directory`'s files are the ones its manifest lists, byte for byte (files added
  since are ignored: no reader looks at them)."""
  directory = Path(directory)
  if not directory.is_dir():
    return Verdict(DAMAGED, "it is missing")
  path = directory / MANIFEST
  if not path.is_file():
    return Verdict(UNVERIFIED, f"it has no {MANIFEST}" + ("" if _files(directory) else " and no files"))
  try:
    manifest = json.loads(path.read_text(encoding="utf-8"))
    files = manifest["files"]
    if manifest.get("format") != FORMAT or not isinstance(files, dict) or not files:
      raise ValueError("not a rome_flax checksum file")
    expected = {str(rel): (int(entry["size"]), str(entry["sha256"])) for rel, entry in files.items()}
  except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError) as e:
    return Verdict(DAMAGED, f"its {MANIFEST} is unreadable ({type(e).__name__})")
  for rel, (size, digest) in sorted(expected.items()):
    f = directory / rel
    if not f.is_file():
      return Verdict(DAMAGED, f"{rel} is missing")
    if f.stat().st_size != size:
      return Verdict(DAMAGED, f"{rel} has {f.stat().st_size} bytes, {size} were saved")
    try:
      if sha256_of(f) != digest:
        return Verdict(DAMAGED, f"{rel} differs from what was saved (SHA-256 mismatch)")
    except OSError as e:
      return Verdict(DAMAGED, f"{rel} cannot be read ({e.strerror or e})")
  return Verdict(INTACT)


def shapes_by_path(tree) -> dict:
  """'params/layers/0/qkv/kernel' -> shape, whatever the containers (dicts, tuples, NamedTuples)."""
  name = lambda k: str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
  return {"/".join(name(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree) if hasattr(leaf, "shape")}


def first_mismatch(stored: Any, wanted: Any) -> Optional[str]:
  """What of the stored arrays (Orbax metadata) differs from the tree to restore; None when it fits
  or there is no metadata to compare (the restore itself then reports any problem). Orbax would
  load a differently shaped array, and the failure would surface far from its cause."""
  stored = getattr(stored, "item_metadata", stored)
  stored = getattr(stored, "tree", stored)
  if stored is None:
    return None
  have, want = shapes_by_path(stored), shapes_by_path(wanted)
  if not have:
    return None
  for path, shape in sorted(want.items(), key=lambda item: not item[0].startswith("params/")):
    if path not in have:
      return f"it has no {path}"
    if have[path] != shape:
      return f"{path} is stored with shape {have[path]}, this model needs {shape}"
  extra = sorted(set(have) - set(want))
  return f"it holds {extra[0]}, which this model does not have" if extra else None
