"""Orbax checkpoints of a training run: the last N states plus the best one by dev metric.

A saved state is the whole `TrainState` (parameters, optimizer state, step, base rng); with the
data order and dropout keys derived from (seed, step), that is all `--resume` needs to continue a
killed run bit for bit. Orbax writes each step to a temporary directory and renames it, so a run
killed mid-save leaves the earlier checkpoints intact.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import jax
import orbax.checkpoint as ocp

from rome_flax.errors import RomeFlaxError
from rome_flax.files import write_json
from rome_flax.train_step import TrainState


class RunCheckpoints:
  """`<dir>/last` keeps the newest `keep` states, `<dir>/best` the best one (with best.json)."""

  def __init__(self, directory: Path, keep: int):
    self.directory = Path(directory).absolute()
    opts = lambda n: ocp.CheckpointManagerOptions(max_to_keep=n, create=True, enable_async_checkpointing=False)
    manager = lambda name, n: ocp.CheckpointManager(self.directory / name, options=opts(n),
                                                    item_handlers=ocp.StandardCheckpointHandler())
    self.last = manager("last", max(keep, 1))
    self.best = manager("best", 1)
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
    if jax.process_index() == 0:   # Orbax saves collectively; the side file has one writer
      write_json(self.best_info_path, {"step": step, "value": value, **info}, sort_keys=True)

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
    mismatch = _first_mismatch(manager.item_metadata(step), abstract)
    if mismatch:
      raise RomeFlaxError(f"checkpoint {step} in {manager.directory} does not fit this model: {mismatch} "
                          f"(a different model or config, or a checkpoint from an older rome_flax layout; "
                          f"its export, if one was written, still loads)")
    try:
      tree = manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as e:
      raise RomeFlaxError(f"cannot restore checkpoint {step} from {manager.directory}: "
                          f"{str(e).splitlines()[0] if str(e) else type(e).__name__}") from None
    return TrainState(tree["step"], tree["params"], tree["opt_state"], tree["rng"])

  def close(self) -> None:
    self.last.close()
    self.best.close()


def _shapes_by_path(tree) -> dict:
  """'params/layers/0/qkv/kernel' -> shape, whatever the containers (dicts, tuples, NamedTuples)."""
  name = lambda k: str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
  return {"/".join(name(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree) if hasattr(leaf, "shape")}


def _first_mismatch(stored_tree, abstract) -> Optional[str]:
  """What of the checkpoint's arrays differs from the state to restore (None when it fits)."""
  if stored_tree is None:
    return None   # no metadata to check: Orbax's restore reports any problem
  stored, wanted = _shapes_by_path(stored_tree), _shapes_by_path(abstract)
  for path, shape in sorted(wanted.items(), key=lambda item: not item[0].startswith("params/")):
    if path not in stored:
      return f"it has no {path}"
    if stored[path] != shape:
      return f"{path} is stored with shape {stored[path]}, this run needs {shape}"
  extra = sorted(set(stored) - set(wanted))
  return f"it holds {extra[0]}, which this run does not have" if extra else None


def _as_tree(state: TrainState) -> dict:
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "rng": state.rng}
