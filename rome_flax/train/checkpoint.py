"""Orbax checkpoints of a training run: the last N states plus the best one by dev metric, each
with a checksum manifest (integrity.py) so that a resume never loads damaged bytes.

A saved state is the whole `TrainState` (parameters, optimizer state, step, base rng); with the
data order and dropout keys derived from (seed, step), that is all `--resume` needs to continue a
killed run bit for bit. Orbax writes each step to a temporary directory and renames it; process 0
then checksums the step's files. `resume_point` verifies the checkpoints newest first and resumes
from the newest intact one, moving newer damaged or unfinished ones to `damaged/` (Orbax would
otherwise never save those steps again) and saying so in one line.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
from pathlib import Path
from typing import NamedTuple, Optional

import jax
import orbax.checkpoint as ocp

from rome_flax.errors import RomeFlaxError
from rome_flax.io import integrity, primary
from rome_flax.io.files import write_json
from rome_flax.train.train_step import TrainState

log = logging.getLogger(__name__)

_WHICH = ("last", "best")   # broadcast as index + 1 (0: no resume point)


class ResumePoint(NamedTuple):
  which: str        # "last" or "best"
  step: int
  verified: bool    # False only for a checkpoint written by an older rome_flax (no checksums)


class RunCheckpoints:
  """`<dir>/last` keeps the newest `keep` states, `<dir>/best` the best one (with best.json)."""

  def __init__(self, directory: Path, keep: int):
    self.directory = Path(directory).absolute()
    opts = lambda n: ocp.CheckpointManagerOptions(max_to_keep=n, create=True, enable_async_checkpointing=False,
                                                  cleanup_tmp_directories=True)   # a save cut off by a kill
    manager = lambda name, n: ocp.CheckpointManager(self.directory / name, options=opts(n),
                                                    item_handlers=ocp.StandardCheckpointHandler())
    _quiet_failed_saves()
    with _orbax_quiet():
      self.last = manager("last", max(keep, 1))
      self.best = manager("best", 1)
    self.best_info_path = self.directory / "best.json"

  def _manager(self, which: str):
    return self.last if which == "last" else self.best

  def step_dir(self, which: str, step: int) -> Path:
    return Path(str(self._manager(which).directory)) / str(step)

  def latest_step(self) -> Optional[int]:
    return self.last.latest_step()

  # ------------------------------------------------------------------ saving
  def save(self, state: TrainState) -> int:
    step = int(state.step)
    if step not in self.last.all_steps():
      if not self.last.save(step, args=ocp.args.StandardSave(_as_tree(state))):
        raise RomeFlaxError(f"Orbax refused to save step {step} in {self.last.directory} (a newer step is there)")
      self.last.wait_until_finished()
      self._seal("last", step)
    return step

  def save_best(self, state: TrainState, value: float, info: dict) -> None:
    step = int(state.step)
    self.best.save(step, args=ocp.args.StandardSave(_as_tree(state)), force=True)
    self.best.wait_until_finished()
    self._seal("best", step)
    if jax.process_index() == 0:   # Orbax saves collectively; the side file has one writer
      write_json(self.best_info_path, {"step": step, "value": value, **info}, sort_keys=True)

  def _seal(self, which: str, step: int) -> None:
    """The checksum manifest of a finished save (process 0; every process's part is on disk by now)."""
    if jax.process_index() == 0:
      integrity.write_manifest(self.step_dir(which, step))

  def best_value(self) -> Optional[float]:
    """The best checkpoint's selection value; None (a fresh start of best selection) when there is no
    best checkpoint or best.json is unreadable."""
    if not self.best_info_path.is_file() or self.best.latest_step() is None:
      return None
    try:
      value = json.loads(self.best_info_path.read_text(encoding="utf-8"))["value"]
      return float(value)
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError) as e:
      log.warning("%s is unreadable (%s); the best checkpoint is chosen afresh from here on",
                  self.best_info_path, type(e).__name__)
      return None

  # ------------------------------------------------------------------ resuming
  def resume_point(self) -> Optional[ResumePoint]:
    """The newest intact checkpoint, or None when there is none at all; the same on every process
    (process 0 verifies and moves damaged ones aside)."""
    code, step, verified = primary.decide(self._choose_resume_point, "checking the checkpoints", size=3)
    with _orbax_quiet():
      self.last.reload()
      self.best.reload()
    return ResumePoint(_WHICH[code - 1], step, bool(verified)) if code else None

  def verify(self, which: str, step: int) -> integrity.Verdict:
    verdict = integrity.verify(self.step_dir(which, step))
    if verdict.status == integrity.UNVERIFIED and self._unreadable(which, step):
      return integrity.Verdict(integrity.DAMAGED, f"{verdict.problem}, and Orbax cannot read its metadata")
    return verdict

  def _unreadable(self, which: str, step: int) -> bool:
    try:
      with _orbax_quiet():
        return self._manager(which).item_metadata(step) is None
    except Exception:   # Orbax raises whatever the damaged file makes its parser raise
      return True

  def _choose_resume_point(self) -> tuple[int, int]:
    candidates = sorted([(s, 1, "last") for s in self.last.all_steps()] +
                        [(s, 0, "best") for s in self.best.all_steps()], reverse=True)
    verdicts = [(which, step, self.verify(which, step)) for step, _, which in candidates]
    sealed = [step for _, step, v in verdicts if v.status != integrity.UNVERIFIED]
    chosen, skipped = None, []
    for which, step, v in verdicts:
      # An unverified checkpoint older than every sealed one was written by an older rome_flax;
      # a newer one is a save that was cut off before its manifest.
      legacy = v.status == integrity.UNVERIFIED and (not sealed or step < min(sealed))
      if v.intact or legacy:
        chosen = (which, step, v)
        break
      skipped.append((which, step, v))
    if chosen is None:
      if skipped:
        raise RomeFlaxError(f"no intact checkpoint to resume from in {self.directory}: " + "; ".join(
            f"{which} step {step} is {v.status} ({v.problem})" for which, step, v in skipped)
                            + "; start again with --overwrite")
      return 0, 0, 0
    which, step, verdict = chosen
    notes = [f"checkpoint {w} step {s} is {v.status} ({v.problem}; moved to {self._move_aside(w, s)})"
             for w, s, v in skipped]
    if verdict.status == integrity.UNVERIFIED:
      notes.append(f"checkpoint {which} step {step} has no checksums (an older rome_flax wrote it): not verified")
    if notes:
      log.warning("%s; resuming from step %d (%s)", "; ".join(notes), step, self.step_dir(which, step).parent)
    return _WHICH.index(which) + 1, step, int(verdict.intact)

  def _move_aside(self, which: str, step: int) -> Path:
    """Moves a damaged checkpoint out of Orbax's sight (kept for inspection) and returns where."""
    dest = self.directory / "damaged" / f"{which}-{step}"
    n = 1
    while dest.exists():
      n += 1
      dest = self.directory / "damaged" / f"{which}-{step}-{n}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.move(str(self.step_dir(which, step)), str(dest))
    if which == "best" and self.best_info_path.is_file():
      shutil.move(str(self.best_info_path), str(dest / "best.json"))
    return dest

  def restore(self, like: TrainState, step: Optional[int] = None, which: str = "last") -> TrainState:
    manager = self._manager(which)
    step = manager.latest_step() if step is None else step
    if step is None:
      raise RomeFlaxError(f"no checkpoint in {manager.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _as_tree(like))
    try:
      mismatch = integrity.first_mismatch(manager.item_metadata(step), abstract)
    except Exception as e:
      raise RomeFlaxError(f"cannot read checkpoint {step} in {manager.directory}: {_first_line(e)}") from None
    if mismatch:
      raise RomeFlaxError(f"checkpoint {step} in {manager.directory} does not fit this model: {mismatch} "
                          f"(a different model or config, or a checkpoint from an older rome_flax layout; "
                          f"its export, if one was written, still loads)")
    try:
      tree = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:
      raise RomeFlaxError(f"cannot restore checkpoint {step} from {manager.directory}: {_first_line(e)}") from None
    return TrainState(tree["step"], tree["params"], tree["opt_state"], tree["rng"])

  def close(self) -> None:
    self.last.close()
    self.best.close()


@contextlib.contextmanager
def _orbax_quiet():
  """Orbax logs (through absl) what it cannot read in a damaged step directory, besides raising or
  skipping it; resume_point says that once, in its own line."""
  absl = logging.getLogger("absl")
  level = absl.level
  absl.setLevel(logging.ERROR)
  try:
    yield
  finally:
    absl.setLevel(level)


class _FailedSaveNoise(logging.Filter):
  """Orbax's worker threads log the write error of a failed save (ERROR, with a traceback) before it is
  raised in the main thread, where it becomes the run's one `error:` line (a full disk, a file size limit);
  asyncio logs the same error again for each of Orbax's abandoned write tasks when they are collected."""

  def filter(self, record: logging.LogRecord) -> bool:
    message = record.getMessage()
    if "orbax" in record.pathname and "raised an exception" in message:
      return False
    return not ("exception was never retrieved" in message and "orbax" in message)   # Task, _GatheringFuture


def _quiet_failed_saves() -> None:
  """After a failed save, only the error line: Orbax's worker threads' and asyncio's logs of the write
  error (`_FailedSaveNoise`) and TensorStore callbacks that reach asyncio's loop after Orbax closed it
  ("Event loop is closed", reported as unraisable, a hundred tracebacks for one failed save), and at exit
  the never-awaited write coroutines of the abandoned save (a RuntimeWarning). The filters are narrow: every other log record and unraisable exception is reported as before.
  scripts/chaos.py found them in 13 of 200 rounds, beside a right exit code and error line."""
  import sys
  import traceback
  import warnings
  absl = logging.getLogger("absl")
  if any(isinstance(f, _FailedSaveNoise) for f in absl.filters):
    return
  for name in ("absl", "asyncio"):
    logging.getLogger(name).addFilter(_FailedSaveNoise())
  warnings.filterwarnings("ignore", message=r"coroutine 'async_serialize", category=RuntimeWarning)  # Orbax's
  previous = sys.unraisablehook

  def hook(unraisable):
    e = unraisable.exc_value
    if (isinstance(e, RuntimeError) and str(e) == "Event loop is closed"
        and any(f.name == "call_soon_threadsafe" for f in traceback.extract_tb(unraisable.exc_traceback))):
      return   # a callback scheduling onto the loop Orbax already closed
    previous(unraisable)

  sys.unraisablehook = hook


def _first_line(e: Exception) -> str:
  return str(e).splitlines()[0] if str(e).strip() else type(e).__name__


def _as_tree(state: TrainState) -> dict:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}
