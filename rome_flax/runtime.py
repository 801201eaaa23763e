"""Process-level settings every entry point applies before JAX starts: the host allocator, and XLA's
persistent compilation cache.

The allocator. XLA:CPU allocates every execution's temporaries as one block (about 400 MB for a MiniLM train step
at batch 16), and glibc serves a block that size with a fresh `mmap` and gives it back with
`munmap` when the step ends. The next step then takes a page fault for every 4 KiB it touches:
about 100,000 faults and 150-250 ms of kernel CPU time per step on the project machine, a third of
the step. Keeping freed memory inside the process (one arena, no mmap, no trimming) makes the
second step reuse the first step's pages. This is what tcmalloc or jemalloc would give, without a
preloaded library; the price is that the process keeps its peak memory until it exits.

The compilation cache. A server compiles every shape it will run before it answers (a TOKEE server on
CoNLL-2003: 83 s), a training run its steps, infer.py its buckets; the same programs again on every start.
XLA keeps compiled programs on disk and reuses them when the program, JAX, the flags and the device
match (`compilation_cache`); rome_flax turns that on by default, in a folder per CPU type.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import hashlib
import importlib.util
import logging
import os
import platform
import sys
from pathlib import Path
from typing import Optional

from rome_flax.errors import RomeFlaxError, os_error_text

log = logging.getLogger(__name__)

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
_applied = False

ENV_DISABLE = "ROME_FLAX_DEFAULT_MALLOC"


def retain_host_memory() -> bool:
  """Makes glibc malloc keep freed memory for reuse. Returns whether it is in effect.

  Call it at the start of a process, before JAX or PyTorch start their thread pools (threads that
  already have a malloc arena keep it). A no-op off Linux/glibc, or with ROME_FLAX_DEFAULT_MALLOC=1.
  """
  global _applied
  if _applied:
    return True
  if os.environ.get(ENV_DISABLE, "") not in ("", "0") or not sys.platform.startswith("linux"):
    return False
  try:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    mallopt = libc.mallopt
  except (OSError, AttributeError):  # musl and other libcs have no mallopt
    return False
  mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
  # All three are needed: without a single arena, worker threads' blocks come from per-thread heaps
  # that glibc unmaps; without M_MMAP_MAX=0 big blocks bypass the heap; without the trim threshold
  # the heap top is handed back to the kernel at every free.
  ok = (mallopt(_M_ARENA_MAX, 1) == 1 and mallopt(_M_MMAP_MAX, 0) == 1
        and mallopt(_M_TRIM_THRESHOLD, 2 ** 31 - 1) == 1)
  if not ok:
    log.warning("mallopt refused a setting; host allocator left as it was")
  _applied = ok
  return ok


# ----------------------------------------------------------------------------- the compilation cache

ENV_CACHE = "ROME_FLAX_COMPILATION_CACHE"   # a folder, or "off"
JAX_ENV_CACHE = "JAX_COMPILATION_CACHE_DIR"  # JAX's own: when set, JAX's settings are left as they are
CACHE_OFF = "off"
CACHE_MAX_BYTES = 2 << 30                    # least recently used programs go first past this
CACHE_MIN_COMPILE_S = 0.2                    # programs that compile faster are not worth a file


def default_compilation_cache() -> str:
  """$ROME_FLAX_COMPILATION_CACHE, else $XDG_CACHE_HOME/rome_flax/xla (~/.cache/rome_flax/xla)."""
  if os.environ.get(ENV_CACHE):
    return os.environ[ENV_CACHE]
  try:
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
  except RuntimeError:   # no home folder to name
    return CACHE_OFF
  return str(base / "rome_flax" / "xla")


def host_fingerprint() -> str:
  """A short name for this kind of host CPU: its architecture, model and instruction-set flags.

  JAX's cache key names the program, JAX, the flags and the device kind ('cpu'), not which CPU: XLA:CPU
  compiles for the host's instruction set, so a cache in a home folder shared by Intel and AMD nodes
  keeps one folder per CPU type."""
  fields = {}
  try:   # the first processor's lines (x86: 'model name', 'flags'; Arm: 'CPU part', 'Features')
    for line in Path("/proc/cpuinfo").read_text(errors="replace").split("\n\n")[0].splitlines():
      key, _, value = line.partition(":")
      fields[key.strip()] = value.strip()
  except OSError:
    pass
  model = fields.get("model name") or fields.get("CPU part") or platform.processor()
  flags = fields.get("flags") or fields.get("Features", "")
  digest = hashlib.sha256(f"{platform.machine()}|{model}|{flags}".encode()).hexdigest()[:16]
  return f"{platform.machine() or 'host'}-{digest}"


def compilation_cache(folder: Optional[str] = None) -> Optional[Path]:
  """Turns XLA's persistent compilation cache on in `folder`/<host_fingerprint()> (None: $ROME_FLAX_COMPILATION_CACHE,
  else JAX's own JAX_COMPILATION_CACHE_DIR when set, else ~/.cache/rome_flax/xla; "off": not at all). Returns
  the folder in use, or None.

  Call it before the first compilation. A folder given by option or by $ROME_FLAX_COMPILATION_CACHE that cannot
  be made or written to is bad input (`RomeFlaxError`); the default folder failing only turns the cache off.
  Second start against the first (AMD EPYC, 2 cores, MiniLM): a TOKEE server's warm-up on CoNLL-2003
  83 -> 20 s, an SST-2 server's 28 -> 9 s, the README's default training run 63 -> 38 s, its infer.py run
  13.8 -> 10.0 s (what is left is tracing and lowering, which the cache cannot skip).
  """
  source = "--compilation_cache" if folder is not None else f"${ENV_CACHE}" if os.environ.get(ENV_CACHE) else None
  if source is None and os.environ.get(JAX_ENV_CACHE):
    return None   # JAX's own variable: JAX's settings, as JAX reads them
  folder = default_compilation_cache() if folder is None else folder
  if folder.strip().lower() == CACHE_OFF:
    if source is not None:   # off means off, JAX's own variable too
      import jax
      jax.config.update("jax_enable_compilation_cache", False)
    return None
  if not folder.strip():
    raise RomeFlaxError(f"{source or 'the compilation cache'}: give a folder, or {CACHE_OFF}")
  try:
    path = Path(folder).expanduser().absolute() / host_fingerprint()
    path.mkdir(parents=True, exist_ok=True)
    if not os.access(path, os.W_OK | os.X_OK):
      raise PermissionError(13, "Permission denied", str(path))
  except (OSError, RuntimeError) as e:   # RuntimeError: '~' without a home folder
    reason = os_error_text(e) if isinstance(e, OSError) else str(e)
    if source is not None:
      raise RomeFlaxError(f"{source} {folder}: the compilation cache cannot be used: {reason} "
                          f"(give another folder, or {CACHE_OFF})") from None
    log.info("no compilation cache: %s", reason)
    return None
  import jax
  jax.config.update("jax_compilation_cache_dir", str(path))
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:   # JAX's own settings win
    jax.config.update("jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_S)
  if "JAX_COMPILATION_CACHE_MAX_SIZE" not in os.environ:
    if importlib.util.find_spec("filelock"):   # eviction needs it (huggingface_hub's dependency); else no bound
      jax.config.update("jax_compilation_cache_max_size", CACHE_MAX_BYTES)
  return path


def compilation_cache_in_use() -> Optional[str]:
  """The folder XLA's compiled programs are kept in for this process, or None (what a server's start says)."""
  import jax
  on = jax.config.jax_enable_compilation_cache and jax.config.jax_compilation_cache_dir
  return on or None
