"""Process-level tuning of the host allocator for XLA:CPU (and PyTorch) training and inference.

XLA:CPU allocates every execution's temporaries as one block (about 400 MB for a MiniLM train step
at batch 16), and glibc serves a block that size with a fresh `mmap` and gives it back with
`munmap` when the step ends. The next step then takes a page fault for every 4 KiB it touches:
about 100,000 faults and 150-250 ms of kernel CPU time per step on the project machine, a third of
the step. Keeping freed memory inside the process (one arena, no mmap, no trimming) makes the
second step reuse the first step's pages. This is what tcmalloc or jemalloc would give, without a
preloaded library; the price is that the process keeps its peak memory until it exits.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import sys

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
