"""Decisions about files that process 0 makes and every process follows.

Only process 0 touches the run's lock, checksum files and damaged checkpoints; the others must still
take the same branch (restore the same step, stop together), or the next collective hangs. A
single process just calls the function. (JAX is imported when used: the CLIs import this module
before they tune the host allocator.)
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from rome_flax.errors import RomeFlaxError


def decide(fn: Callable[[], Sequence[int]], what: str, size: int = 2) -> tuple[int, ...]:
  """Runs fn() (a tuple of `size` ints) on process 0 and returns its value on every process. A
  RomeFlaxError on process 0 is raised there and becomes a one-line error on the others."""
  import jax
  if jax.process_count() == 1:
    return tuple(int(v) for v in fn())
  from jax.experimental import multihost_utils
  error, values = None, np.zeros(size, np.int64)
  if jax.process_index() == 0:
    try:
      values[:] = np.asarray(fn(), np.int64)
    except RomeFlaxError as e:
      error = e
  ok = np.asarray([0 if error else 1, *values], np.int64)
  ok = np.asarray(multihost_utils.broadcast_one_to_all(ok))
  if error is not None:
    raise error
  if not ok[0]:
    raise RomeFlaxError(f"process 0 stopped while {what} (its error says why)")
  return tuple(int(v) for v in ok[1:])


def any_process(flag: bool) -> bool:
  """True on every process when flag is true on any (every process must call it at the same point)."""
  import jax
  if jax.process_count() == 1:
    return bool(flag)
  from jax.experimental import multihost_utils
  return bool(np.asarray(multihost_utils.process_allgather(np.asarray([int(bool(flag))], np.int32))).any())
