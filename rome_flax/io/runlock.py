"""One run per output directory: `rome_flax.lock` (holder's pid and host) held for the whole run.

The kernel's `flock` on the file is the proof of life: it is released when the holder exits, however
it exits (SIGKILL included), so a lock file whose flock is free is stale. A stale lock written on
this host is taken over (and said so); one written on another host is refused, since a file system
that does not share locks between machines would make a live run there look stale. The holder
deletes the file when it ends, and the directory too when it created it and nothing else was
written there (a refused or failed command leaves no empty directory behind).

Every command that writes an output directory takes it: train.py, infer.py, the study, convert.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
from pathlib import Path
from typing import Optional

from rome_flax.errors import RomeFlaxError

log = logging.getLogger(__name__)

LOCK_FILE = "rome_flax.lock"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _read_holder(fd: int) -> dict:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    holder = json.loads(os.read(fd, 4096).decode("utf-8"))
    return holder if isinstance(holder, dict) else {}
  except (OSError, ValueError):
    return {}


def describe(holder: dict) -> str:
  if not holder:
    return "a process that has not written its name yet"
  since = f", since {holder['started']}" if holder.get("started") else ""
  return f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}{since}"


class RunLock:
  """Held by this process from `acquire` until `release` (or its exit)."""

  def __init__(self, directory: str | os.PathLike):
    self.path = Path(directory) / LOCK_FILE
    self.fd: Optional[int] = None
    self.created: list[Path] = []   # directories acquire made, innermost first

  def acquire(self) -> "RunLock":
    host = socket.gethostname()
    try:
      missing = [d for d in (self.path.parent, *self.path.parent.parents) if not d.exists()]
      self.path.parent.mkdir(parents=True, exist_ok=True)
      self.created = missing
    except OSError as e:
      raise RomeFlaxError(f"cannot create output_dir {self.path.parent}: {e.strerror or e}") from None
    for _ in range(20):   # the holder may delete the file between our open and our lock: try again
      try:
        self.path.parent.mkdir(parents=True, exist_ok=True)   # a releasing holder may have removed it
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
      except OSError as e:
        raise RomeFlaxError(f"cannot create the lock file {self.path}: {e.strerror or e}") from None
      kernel_lock = True
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
      except OSError as e:
        if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
          holder = _read_holder(fd)
          os.close(fd)
          raise RomeFlaxError(f"output_dir {self.path.parent} is in use by another run ({describe(holder)}); "
                              "wait for it to end or stop it first") from None
        kernel_lock = False   # no locks on this file system: the pid is all there is to go by
      try:
        same_file = os.stat(self.path).st_ino == os.fstat(fd).st_ino
      except FileNotFoundError:
        same_file = False
      if not same_file:
        os.close(fd)
        continue
      holder = _read_holder(fd)
      if holder and holder.get("pid") != os.getpid():
        self._check_stale(fd, holder, host, kernel_lock)
      os.ftruncate(fd, 0)
      os.lseek(fd, 0, os.SEEK_SET)
      os.write(fd, json.dumps({"pid": os.getpid(), "host": host, "started": datetime.datetime.now()
                               .isoformat(timespec="seconds")}).encode("utf-8"))
      os.fsync(fd)
      self.fd = fd
      return self
    raise RomeFlaxError(f"cannot take the lock {self.path}: it keeps changing hands")

  def _check_stale(self, fd: int, holder: dict, host: str, kernel_lock: bool) -> None:
    """A lock file whose holder no longer holds it: taken over when provably stale, else refused."""
    pid = holder.get("pid")
    same_host = holder.get("host") == host
    if same_host and isinstance(pid, int) and (kernel_lock or not _pid_alive(pid)):
      log.warning("took over the stale lock %s of %s (%s)", self.path, describe(holder),
                  "that process has ended" if not _pid_alive(pid) else "that process no longer holds it")
      return
    os.close(fd)
    if same_host:
      raise RomeFlaxError(f"output_dir {self.path.parent} is in use by another run ({describe(holder)})")
    raise RomeFlaxError(f"output_dir {self.path.parent} is locked by {describe(holder)}, another machine whose "
                        f"processes this one cannot see; if that run is gone, delete {self.path}")

  def release(self) -> None:
    if self.fd is None:
      return
    try:
      if os.stat(self.path).st_ino == os.fstat(self.fd).st_ino:
        os.unlink(self.path)
    except OSError:
      pass
    os.close(self.fd)
    self.fd = None
    for d in self.created:   # innermost first; rmdir refuses a directory that holds anything
      try:
        d.rmdir()
      except OSError:
        break
    self.created = []

  def __enter__(self) -> "RunLock":
    return self.acquire()

  def __exit__(self, *exc) -> None:
    self.release()
