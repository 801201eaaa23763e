#!/usr/bin/env bash
# One GPU run of the project's benchmarks (bench/gpu.py): forward throughput, train-step time and MFU
# (final-only and RomeBERT GR), early-exit speed-ups at batch 1 and 64, the serving load test when
# there is one. Installs JAX for CUDA first when JAX sees no GPU. Under 8 minutes on one H100/H200.
#
#   bash bench/gpu.sh             on a machine with a GPU
#   bash bench/gpu.sh --dry-run   the same code on the CPU at tiny shapes (no install), under 2 minutes
#
# On a device that cannot reach PyPI, `bash bench/gpu_wheels.sh` here first and carry .whl/ (see there).
#
# GPU_PEAK_FLOPS: the peak FLOP/s that MFU divides by (default 989e12: H100/H200 bf16 dense).
# PYTHON: the interpreter (default: the first of python3, python that imports jax; an accelerator image's
# python3 holds JAX for its CUDA). A failed install (no network) is a warning: the run goes on, and its
# device line says what JAX sees.
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
for arg in "$@"; do
  [ "$arg" = "--dry-run" ] && DRY=1
done
PY="${PYTHON:-}"
if [ -z "$PY" ]; then
  for candidate in python3 python; do
    if command -v "$candidate" >/dev/null && "$candidate" -c "import jax" >/dev/null 2>&1; then
      PY="$(command -v "$candidate")"
      break
    fi
  done
  PY="${PY:-$(command -v python3 || command -v python)}"
fi
export GPU_PEAK_FLOPS="${GPU_PEAK_FLOPS:-989e12}"
export PYTHONUNBUFFERED=1

if [ "$DRY" = 1 ]; then
  export JAX_PLATFORMS=cpu
  exec "$PY" bench/gpu.py "$@"
fi

if compgen -G ".whl/*.whl" >/dev/null; then   # carried from bench/gpu_wheels.sh: what the image lacks
  "$PY" -m pip install -q --no-index --no-deps --no-compile --upgrade --target /tmp/rome_flax_site .whl/*.whl \
    && export PYTHONPATH="/tmp/rome_flax_site${PYTHONPATH:+:$PYTHONPATH}" \
    || echo "warning: the carried wheels did not install; going on without them" >&2
fi
if ! "$PY" -c "import jax; jax.devices('gpu')" >/dev/null 2>&1; then
  echo "JAX sees no GPU: pip install -U \"jax[cuda12]\"" >&2
  "$PY" -m pip install -q -U "jax[cuda12]" || echo "warning: the install failed; going on with the JAX there is" >&2
fi
# The whole run stays within 8 minutes: what has printed by then stays printed.
exec timeout "${GPU_BENCH_TIMEOUT:-470}" "$PY" bench/gpu.py "$@"
