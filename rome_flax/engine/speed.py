"""Wall-clock speed, measured so that a shared machine cannot skew a ratio: the one timing helper of
infer.py and bench/.

`compare` warms every contender up (compile, caches; timed apart, never counted), then times them
in interleaved rounds A, B, A, B, ...: load that changes during the run hits every contender alike,
round by round. `early_exit_speed` is the measurement infer.py reports and bench/early_exit.py
prints: the throughput path and the latency path of one policy, each against the full model on
the same examples.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from typing import Any, Callable, Mapping, NamedTuple, Optional

from rome_flax.engine import exit_policy as ep
from rome_flax.engine import inference, token_exit
from rome_flax.errors import RomeFlaxError
from rome_flax.kinds import data
from rome_flax.model.config import ModelConfig


@dataclasses.dataclass
class Timing:
  """One contender's timed calls (a speed-up is a ratio of two contenders' median or fastest)."""
  seconds: list[float]     # every timed call, in order
  warmup_seconds: float    # the warm-up, timed apart (compile + first calls)
  result: Any = None       # what the last timed call returned

  @property
  def median(self) -> float:
    return statistics.median(self.seconds)

  @property
  def fastest(self) -> float:
    return min(self.seconds)


def compare(contenders: Mapping[str, Callable[[], Any]], *, rounds: int = 7, calls_per_round: int = 1,
            warmup: int = 1, min_time: float = 0.0, settle: float = 0.0) -> dict[str, Timing]:
  """Times each callable in interleaved rounds (A, B, A, B, ...) after warming each one up.

  A contender's warm-up is its `warm_up()` method when it has one (an `inference.Pass` compiles each
  piece shape once), else `warmup` plain calls. Rounds go on until `rounds` are done and `min_time`
  seconds have passed; each round makes `calls_per_round` timed calls per contender, each after
  `settle` seconds of sleep (lets another framework's spinning worker threads go idle). A callable
  must return only once its work is done (block_until_ready).
  """
  if rounds < 1 or calls_per_round < 1:
    raise RomeFlaxError(f"rounds and calls_per_round must be >= 1, got {rounds} and {calls_per_round}")
  timings = {}
  for name, fn in contenders.items():
    t0 = time.perf_counter()
    if hasattr(fn, "warm_up"):
      fn.warm_up()
    else:
      for _ in range(warmup):
        fn()
    timings[name] = Timing([], time.perf_counter() - t0)
  start = time.perf_counter()
  done = 0
  while done < rounds or time.perf_counter() - start < min_time:
    for name, fn in contenders.items():
      for _ in range(calls_per_round):
        if settle:
          time.sleep(settle)
        t0 = time.perf_counter()
        timings[name].result = fn()
        timings[name].seconds.append(time.perf_counter() - t0)
    done += 1
  return timings


class Measured(NamedTuple):
  seconds: float                 # the fastest timed pass
  warmup_seconds: float          # compile + first run of each piece shape
  run: inference.RunResult


class EarlyExitSpeed(NamedTuple):
  """One policy's measured passes: throughput path and full model at batch_size on every example,
  latency path and full model at batch 1 on the first `latency_examples` (for TOKEE, `run` holds a
  `token_exit.TokenRun`)."""
  batch_size: int
  latency_examples: int
  full_throughput: Measured
  throughput: Measured
  full_latency: Measured
  latency: Measured

  @property
  def examples(self) -> int:
    """Examples of the batch-size passes (those of the latency passes: latency_examples)."""
    return self.full_throughput.run.exit_index_N.shape[0]

  @property
  def throughput_speedup(self) -> float:
    return self.full_throughput.seconds / self.throughput.seconds

  @property
  def latency_speedup(self) -> float:
    return self.full_latency.seconds / self.latency.seconds


def _fastest(passes: dict[str, inference.Pass], repeats: int) -> dict[str, Measured]:
  timed = compare(passes, rounds=repeats)
  return {k: Measured(t.fastest, t.warmup_seconds, passes[k].collect(t.result)) for k, t in timed.items()}


def early_exit_speed(prepared, cfg: ModelConfig, policy: ep.ExitPolicy, encoded: data.EncodedSplit,
                     batch_size: int, *, latency_examples: int = 128, repeats: int = 2,
                     chunk_size: Optional[int] = None, baseline=None, mesh=None) -> EarlyExitSpeed:
  """The throughput path (batch_size) and the latency path (batch 1) against the full model.

  Each early-exit pass and its full-model pass alternate `repeats` times after their warm-up and
  the fastest pass of each counts. `baseline` is the full model's prepared parameters (default:
  `prepared`). `mesh`: the batch-size passes use its devices (the full model split along the batch,
  the throughput path one chunk per device); batch 1 runs on one device.
  """
  baseline = prepared if baseline is None else baseline
  lat_data = encoded.head(min(latency_examples, len(encoded)))
  thr = _fastest({"full": inference.full_model_pass(baseline, cfg, encoded, batch_size, mesh),
                  "early": inference.throughput_pass(prepared, cfg, policy, encoded, batch_size, chunk_size, mesh)},
                 repeats)
  lat = _fastest({"full": inference.full_model_pass(baseline, cfg, lat_data, 1),
                  "early": inference.latency_pass(prepared, cfg, policy, lat_data, 1)}, repeats)
  return EarlyExitSpeed(batch_size, len(lat_data), thr["full"], thr["early"], lat["full"], lat["early"])


def token_exit_speed(prepared, cfg: ModelConfig, policy, encoded: data.EncodedSplit, batch_size: int, *,
                     latency_examples: int = 128, repeats: int = 2) -> EarlyExitSpeed:
  """TOKEE (`token_exit.token_pass`) at batch_size and at batch 1, each against the full model on the
  same examples, alternating, the fastest of `repeats` passes counting."""
  lat_data = encoded.head(min(latency_examples, len(encoded)))
  thr = _fastest({"full": inference.full_model_pass(prepared, cfg, encoded, batch_size),
                  "early": token_exit.token_pass(prepared, cfg, policy, encoded, batch_size)}, repeats)
  lat = _fastest({"full": inference.full_model_pass(prepared, cfg, lat_data, 1),
                  "early": token_exit.token_pass(prepared, cfg, policy, lat_data, 1)}, repeats)
  return EarlyExitSpeed(batch_size, len(lat_data), thr["full"], thr["early"], lat["full"], lat["early"])
