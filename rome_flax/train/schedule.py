"""Where a run is at any step: stage, epoch, data epoch, position in the epoch's batch order.

A pure function of the step, so the loop, a resume and the tests agree on it without replaying
anything: step s of a run is always the same batch of the same epoch, with the same dropout key.
"""

from __future__ import annotations

import dataclasses

from rome_flax.errors import RomeFlaxError


@dataclasses.dataclass(frozen=True)
class Position:
  """What step `step` (0-based: `step` steps were taken before it) trains on."""
  step: int
  stage: int        # 1-based; each stage has its own optimizer and learning-rate schedule
  stage_step: int   # steps of this stage taken before it
  epoch: int        # 0-based epoch within the stage
  data_epoch: int   # the epoch number the batch order is drawn from (counts on across stages)
  batch: int        # position in that epoch's batch order

  @property
  def starts_stage(self) -> bool:
    return self.stage_step == 0


@dataclasses.dataclass(frozen=True)
class Schedule:
  """`num_stages` stages of `epochs` epochs of `steps_per_epoch` steps each."""
  steps_per_epoch: int
  epochs: int
  num_stages: int = 1

  def __post_init__(self):
    if min(self.steps_per_epoch, self.epochs, self.num_stages) < 1:
      raise RomeFlaxError(f"a schedule needs at least one step, epoch and stage, got {self}")

  @property
  def stage_steps(self) -> int:
    return self.steps_per_epoch * self.epochs

  @property
  def total_steps(self) -> int:
    return self.stage_steps * self.num_stages

  def at(self, step: int) -> Position:
    if not 0 <= step < self.total_steps:
      raise RomeFlaxError(f"step {step} is outside the schedule's {self.total_steps} steps")
    stage0, stage_step = divmod(step, self.stage_steps)
    epoch, batch = divmod(stage_step, self.steps_per_epoch)
    return Position(step, stage0 + 1, stage_step, epoch, stage0 * self.epochs + epoch, batch)

  def stage_after(self, steps_done: int) -> int:
    """The stage of the last step taken (1 before any): whose optimizer state a checkpoint holds."""
    return self.at(min(max(steps_done - 1, 0), self.total_steps - 1)).stage
