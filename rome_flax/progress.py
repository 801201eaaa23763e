"""Progress of long loops (training steps, inference batches): a tqdm bar on a terminal, or with
`--no_progress` a heartbeat line every few minutes, so a long run is never silent (issue 25: infer.py
was silent for 40 minutes), and no bar at all for an empty loop."""

from __future__ import annotations

import sys
import time
from typing import Callable, Iterable, Optional

HEARTBEAT_SECONDS = 120.0


def duration(seconds: float) -> str:
  """`42 s`, `3.5 min`, `2.1 h`: what a reader of a log line wants."""
  if seconds < 100:
    return f"{seconds:.0f} s"
  if seconds < 5400:
    return f"{seconds / 60:.1f} min"
  return f"{seconds / 3600:.1f} h"


class Heartbeat:
  """The part of tqdm's interface the loops use (update, set_postfix, write, close), printing one line
  every `every` seconds: position, elapsed time, an estimate of the time left and the latest postfix."""

  def __init__(self, total: Optional[int], initial: int = 0, desc: str = "", unit: str = "step",
               every: float = HEARTBEAT_SECONDS, clock: Callable[[], float] = time.monotonic, file=None):
    self.total, self.n, self.initial, self.desc, self.unit = total, initial, initial, desc, unit
    self.every, self.clock, self.file = every, clock, file
    self.start = self.last = clock()
    self.postfix: dict = {}

  def update(self, n: int = 1) -> None:
    self.n += n
    now = self.clock()
    if now - self.last >= self.every:
      self.last = now
      self.write(self.line(now))

  def line(self, now: float) -> str:
    elapsed = now - self.start
    done = self.n - self.initial
    where = f"{self.n}/{self.total}" if self.total else f"{self.n}"
    text = f"{self.desc + ': ' if self.desc else ''}{where} {self.unit}s, {duration(elapsed)}"
    if self.total and done > 0:
      text += f", about {duration((self.total - self.n) * elapsed / done)} left"
    if self.postfix:
      text += " (" + ", ".join(f"{k} {v}" for k, v in self.postfix.items()) + ")"
    return text

  def set_postfix(self, **shown) -> None:
    self.postfix = shown

  def write(self, text: str) -> None:
    print(text, file=self.file or sys.stdout, flush=True)

  def close(self) -> None:
    pass


def bar(total: Optional[int], initial: int = 0, desc: str = "", unit: str = "step", show: bool = True,
        silent: bool = False):
  """A tqdm bar (`show`), else a `Heartbeat`; `silent` (a process other than the first) prints nothing."""
  from tqdm.auto import tqdm
  if silent or (show and total == 0):
    return tqdm(total=total, disable=True)
  if show:
    return tqdm(total=total, initial=initial, desc=desc or None, unit=unit, dynamic_ncols=True)
  return Heartbeat(total, initial, desc, unit)


def iterate(items: Iterable, desc: str, unit: str = "batch", show: bool = True) -> Iterable:
  """`items` with progress shown as `bar` does; an empty sized iterable is returned as it is (no empty bar)."""
  total = len(items) if hasattr(items, "__len__") else None
  if total == 0:
    return items
  return _counted(items, bar(total, desc=desc, unit=unit, show=show))


def _counted(items: Iterable, shown) -> Iterable:
  try:
    for item in items:
      yield item
      shown.update(1)
  finally:
    shown.close()
