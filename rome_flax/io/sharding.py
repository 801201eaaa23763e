"""Data parallelism with JAX's own sharding: one mesh axis 'data', batches split, state replicated
or sharded (FSDP-style).

jit propagates the shardings: the train step's gradient means become all-reduces that XLA inserts
(and, with a sharded state, all-gathers of each weight before use and reduce-scatters of its
gradient), so the same step function runs on one CPU, eight accelerators, or several hosts
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
  """Joins a multi-host job when the launcher said so: JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES
  and JAX_PROCESS_ID (any machine, e.g. two processes over loopback), or ROME_FLAX_DISTRIBUTED=1 on a
  cluster that `jax.distributed` auto-detects (SLURM, Open MPI, TPU pods). A single process, or a
  job already initialised, does nothing."""
  if jax.distributed.is_initialized():
    return
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    num, pid = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
    try:
      jax.distributed.initialize(num_processes=int(num) if num else None, process_id=int(pid) if pid else None)
    except ValueError as e:
      raise RomeFlaxError(f"cannot join the distributed job: {e} (set JAX_COORDINATOR_ADDRESS, "
                          "JAX_NUM_PROCESSES and JAX_PROCESS_ID)") from None
  elif os.environ.get("ROME_FLAX_DISTRIBUTED") == "1":
    jax.distributed.initialize()


def is_primary() -> bool:
  """Process 0 writes logs, metrics, configs and exports; every process takes part in checkpoints."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """All processes wait here (a no-op in a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def gather_to_host(tree: Any) -> Any:
  """NumPy copies of (possibly sharded, possibly multi-process) arrays; every process must call it."""
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils
  return multihost_utils.process_allgather(tree, tiled=True)


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


# Leaves smaller than this stay replicated under FSDP: biases and LayerNorms are a rounding error of
# the memory, and gathering them would cost a collective each.
FSDP_MIN_ELEMENTS = 2 ** 14


def fsdp_spec(shape: tuple, num_shards: int, min_elements: int = FSDP_MIN_ELEMENTS) -> P:
  """The partition of one array under FSDP: along its largest axis that `num_shards` divides (the
  first such axis on ties), replicated when it is small or no axis divides."""
  if num_shards <= 1 or int(np.prod(shape, dtype=np.int64)) < min_elements:
    return P()
  axes = sorted((n, -a) for a, n in enumerate(shape) if n % num_shards == 0)
  if not axes:
    return P()
  axis = -axes[-1][1]
  return P(*[DATA_AXIS if a == axis else None for a in range(len(shape))])


def state_shardings(tree: Any, mesh: Mesh, fsdp: bool = False, min_elements: int = FSDP_MIN_ELEMENTS) -> Any:
  """NamedShardings for a train state (or any tree of arrays / shapes): replicated, or with every
  large array sharded over the 'data' axis (parameters and the optimiser moments alike, since the
  moments have the parameters' shapes)."""
  if not fsdp:
    return jax.tree.map(lambda _: replicated(mesh), tree)
  return jax.tree.map(
      lambda x: NamedSharding(mesh, fsdp_spec(tuple(x.shape), mesh.shape[DATA_AXIS], min_elements)), tree)


def place_state(tree: Any, mesh: Mesh, fsdp: bool = False, min_elements: int = FSDP_MIN_ELEMENTS) -> Any:
  """Puts a train state on the mesh, replicated or FSDP-sharded (`state_shardings`)."""
  return jax.device_put(tree, state_shardings(tree, mesh, fsdp, min_elements))


def bytes_per_device(tree: Any, shardings: Any) -> int:
  """Bytes of `tree` (arrays or ShapeDtypeStructs) held by one device under `shardings`."""
  sizes = jax.tree.map(lambda x, s: int(np.prod(s.shard_shape(tuple(x.shape)), dtype=np.int64))
                       * np.dtype(x.dtype).itemsize, tree, shardings)
  return int(sum(jax.tree.leaves(sizes)))


def check_batch_size(batch_size: int, mesh: Mesh, accum_steps: int = 1) -> None:
  """The batch splits evenly over the devices, and each device's rows into the micro-batches."""
  per_process = batch_size // jax.process_count()
  if batch_size % mesh.size or per_process * jax.process_count() != batch_size:
    raise RomeFlaxError(f"batch size {batch_size} must be a multiple of the {mesh.size} devices "
                        f"({jax.process_count()} process(es)) it is split across")
  if (batch_size // mesh.size) % accum_steps:
    raise RomeFlaxError(f"batch size {batch_size} over {mesh.size} devices gives {batch_size // mesh.size} rows "
                        f"per device, which do not split into grad_accum_steps {accum_steps} micro-batches")


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
