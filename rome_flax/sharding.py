"""Data parallelism with JAX's own sharding: one mesh axis 'data', batches split, state replicated.

jit propagates the shardings: the train step's gradient means become all-reduces that XLA inserts,
so the same step function runs on one CPU, eight accelerators, or several hosts
(`jax.distributed`), with no engine of our own.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rome_flax.errors import RomeFlaxError

DATA_AXIS = "data"


def maybe_initialize_distributed() -> None:
  """Joins a multi-host job when the launcher said so (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES,
  JAX_PROCESS_ID, or a cluster jax.distributed auto-detects); a single process does nothing."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS") or os.environ.get("ROME_FLAX_DISTRIBUTED") == "1":
    jax.distributed.initialize()


def data_mesh(devices: Optional[list] = None) -> Mesh:
  """A 1-D mesh over every device of every process."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicate(tree: Any, mesh: Mesh) -> Any:
  """Places every leaf on every device of the mesh (parameters, optimiser state, rng)."""
  return jax.device_put(tree, replicated(mesh))


def check_batch_size(batch_size: int, mesh: Mesh) -> None:
  per_process = batch_size // jax.process_count()
  if batch_size % mesh.size or per_process * jax.process_count() != batch_size:
    raise RomeFlaxError(f"batch size {batch_size} must be a multiple of the {mesh.size} devices "
                        f"({jax.process_count()} process(es)) it is split across")


def shard_batch(batch: dict, mesh: Mesh) -> dict:
  """Splits a global host batch along its first axis over the mesh's 'data' axis.

  Every process builds the same global batch (same seed, same order) and contributes its own rows.
  """
  sharding = batch_sharding(mesh)
  if jax.process_count() == 1:
    return jax.device_put(batch, sharding)
  n, pid = jax.process_count(), jax.process_index()
  local = lambda x: np.asarray(x)[pid * (len(x) // n):(pid + 1) * (len(x) // n)]
  return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, local(x)), batch)
