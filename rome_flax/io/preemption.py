"""SIGTERM (a preempted VM, a scheduler) and SIGINT (Ctrl-C) stop training cleanly.

While a `StopSignals` guard is active, the first signal only sets a flag: the trainer finishes the
step in flight, saves a checkpoint and raises `Preempted`, which the CLI prints as one line and
turns into exit code `EXIT_PREEMPTED` (3): "stopped, checkpoint saved, `--resume` continues". A
second signal gets the default action at once (the checkpoints on disk are never half-written).

Outside training (`interrupt_on_signals`, which `cli.run` holds around every program) SIGINT and
SIGTERM raise `Interrupted` at once: exit code 130 / 143, and whatever the program was staging is
discarded. A library may swallow that exception (JAX's garbage-collection callbacks print "Exception
ignored" and carry on), so `check_interrupted()` raises it again: callers run it in their loops and
before committing any output, and a signal is never lost. train.py and infer.py block the two signals
before loading their libraries (seconds, where Python's own KeyboardInterrupt would be a traceback or
be swallowed); `interrupt_on_signals` unblocks them, so one sent meanwhile arrives there, and blocks
them again when the program is over (its exit code decided, the exit is not interrupted).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Optional

from rome_flax.io import primary

EXIT_PREEMPTED = 3
SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(KeyboardInterrupt):
  """A program outside training stopped by SIGINT / SIGTERM (nothing to save): exit 128 + signal."""

  def __init__(self, signum: int):
    super().__init__(signal.Signals(signum).name)
    self.signum = signum
    self.exit_code = 128 + signum


_received: Optional[int] = None   # the signal interrupt_on_signals caught (None: none)


@contextlib.contextmanager
def interrupt_on_signals():
  """SIGINT / SIGTERM raise `Interrupted` (the first signal; later ones while stopping are only
  noted, so clean-up runs to its end) and are remembered for `check_interrupted`."""
  global _received
  if threading.current_thread() is not threading.main_thread():
    yield
    return

  def handle(signum, frame):
    global _received
    first = _received is None
    _received = _received or signum
    if first:
      raise Interrupted(signum)

  def unraisable(info):   # a swallowed Interrupted: check_interrupted raises it again, so no "Exception ignored"
    if not isinstance(info.exc_value, Interrupted):
      hook(info)

  mask = signal.pthread_sigmask(signal.SIG_BLOCK, [])   # train.py / infer.py hold SIGNALS while they load
  previous = {sig: signal.signal(sig, handle) for sig in SIGNALS}
  hook, sys.unraisablehook = sys.unraisablehook, unraisable
  _received = None
  try:
    signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)   # one held since then arrives now, here
    yield
  finally:
    signal.pthread_sigmask(signal.SIG_BLOCK, SIGNALS)
    for sig, handler in previous.items():
      signal.signal(sig, handler)
    sys.unraisablehook = hook
    _received = None
    signal.pthread_sigmask(signal.SIG_SETMASK, mask)   # held again from an entry point: its exit is quiet


def check_interrupted() -> None:
  """Raises `Interrupted` again when a signal arrived whose exception was swallowed on the way."""
  if _received is not None:
    raise Interrupted(_received)


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
    if self.received is not None:   # the second signal: the default action (a forced stop), at once
      signal.signal(signum, signal.SIG_DFL)
      signal.raise_signal(signum)
      return
    self.received = signum

  def __enter__(self) -> "StopSignals":
    if threading.current_thread() is threading.main_thread():
      for sig in SIGNALS:
        self._previous[sig] = signal.signal(sig, self._handle)
    self.received = _received   # a signal before training whose Interrupted was swallowed: stop at once
    return self

  def __exit__(self, *exc) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}

  def requested(self, step: int) -> bool:
    if self.processes == 1:
      return self.received is not None
    return step % self.sync_every == 0 and primary.any_process(self.received is not None)
