"""SIGTERM (a preempted VM, a scheduler) and SIGINT (Ctrl-C) stop training cleanly.

While a `StopSignals` guard is active, the first signal only sets a flag: the trainer finishes the
step in flight, saves a checkpoint and raises `Preempted`, which the CLI prints as one line and
turns into exit code `EXIT_PREEMPTED` (3): "stopped, checkpoint saved, `--resume` continues". A
second signal gets the default action at once (the checkpoints on disk are never half-written).
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

from rome_flax import primary

EXIT_PREEMPTED = 3
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Preempted(Exception):
  """Training stopped on a signal after saving its state; not an error of the user's."""
  exit_code = EXIT_PREEMPTED


class StopSignals:
  """Context manager: catches SIGTERM / SIGINT in the main thread (elsewhere it does nothing).

  `requested(step)` says whether to stop after `step`. In a multi-process job every process must
  stop after the same step (checkpoints are collective), so the processes compare their flags every
  `sync_every` steps (one tiny collective, at steps every process reaches); one process alone
  checks after every step for free.
  """

  def __init__(self, sync_every: int = 1):
    import jax
    self.sync_every = max(int(sync_every), 1)
    self.processes = jax.process_count()
    self.received: Optional[int] = None
    self._previous: dict = {}

  @property
  def signal_name(self) -> str:
    return signal.Signals(self.received).name if self.received is not None else "a signal to another process"

  def _handle(self, signum, frame):
    if self.received is not None:   # the second signal: do what it would have done without us
      signal.signal(signum, self._previous.get(signum, signal.SIG_DFL))
      signal.raise_signal(signum)
      return
    self.received = signum

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}

  def requested(self, step: int) -> bool:
    if self.processes == 1:
      return self.received is not None
    return step % self.sync_every == 0 and primary.any_process(self.received is not None)
