"""Orbax checkpoints of a training run: the last N states plus the best one by dev metric.

A saved state is the whole `TrainState` (parameters, optimizer state, step, base rng); with the
data order and dropout keys derived from (seed, step), that is all `--resume` needs to continue a
killed run bit for bit. Orbax writes each step to a temporary directory and renames it, so a run
killed mid-save leaves the earlier checkpoints intact.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

import jax
import orbax.checkpoint as ocp

from rome_flax.errors import RomeFlaxError
from rome_flax.train_step import TrainState


def write_json_atomic(path: Path, obj) -> None:
  tmp = path.with_name(f".{path.name}.tmp")
  tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
  os.replace(tmp, path)


class RunCheckpoints:
  """`<dir>/last` keeps the newest `keep` states, `<dir>/best` the best one (with best.json)."""

  def __init__(self, directory: Path, keep: int):
    self.directory = Path(directory).absolute()
    opts = lambda n: ocp.CheckpointManagerOptions(max_to_keep=n, create=True, enable_async_checkpointing=False)
    self.last = ocp.CheckpointManager(self.directory / "last", options=opts(max(keep, 1)))
    self.best = ocp.CheckpointManager(self.directory / "best", options=opts(1))
    self.best_info_path = self.directory / "best.json"

  def latest_step(self) -> Optional[int]:
    return self.last.latest_step()

  def save(self, state: TrainState) -> int:
    step = int(state.step)
    if step not in self.last.all_steps():
      self.last.save(step, args=ocp.args.StandardSave(_as_tree(state)))
      self.last.wait_until_finished()
    return step

  def save_best(self, state: TrainState, value: float, info: dict) -> None:
    step = int(state.step)
    self.best.save(step, args=ocp.args.StandardSave(_as_tree(state)), force=True)
    self.best.wait_until_finished()
    write_json_atomic(self.best_info_path, {"step": step, "value": value, **info})

  def best_value(self) -> Optional[float]:
    if not self.best_info_path.is_file():
      return None
    return json.loads(self.best_info_path.read_text())["value"]

  def restore(self, like: TrainState, step: Optional[int] = None, which: str = "last") -> TrainState:
    manager = self.last if which == "last" else self.best
    step = manager.latest_step() if step is None else step
    if step is None:
      raise RomeFlaxError(f"no checkpoint in {manager.directory}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, _as_tree(like))
    try:
      tree = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:
      raise RomeFlaxError(f"cannot restore checkpoint {step} from {manager.directory}: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return TrainState(tree["step"], tree["params"], tree["opt_state"], tree["rng"])

  def close(self) -> None:
    self.last.close()
    self.best.close()


def _as_tree(state: TrainState) -> dict:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}
