#!/usr/bin/env bash
# One GPU run of the project's benchmarks (bench/gpu.py): forward throughput, train-step time and MFU
# (final-only and RomeBERT GR), early-exit speed-ups at batch 1 and 64, the serving load test when
# there is one. Installs JAX for CUDA first when JAX sees no GPU. Under 8 minutes on one H100/H200.
#
#   bash bench/gpu.sh             on a machine with a GPU
#   bash bench/gpu.sh --dry-run   the same code on the CPU at tiny shapes (no install), under 2 minutes
#
# GPU_PEAK_FLOPS: the peak FLOP/s that MFU divides by (default 989e12: H100/H200 bf16 dense).
set -euo pipefail
cd "$(dirname "$0")/.."

DRY=0
for arg in "$@"; do
  [ "$arg" = "--dry-run" ] && DRY=1
done
PY="${PYTHON:-$(command -v python || command -v python3)}"
export GPU_PEAK_FLOPS="${GPU_PEAK_FLOPS:-989e12}"
export PYTHONUNBUFFERED=1

if [ "$DRY" = 1 ]; then
  export JAX_PLATFORMS=cpu
  exec "$PY" bench/gpu.py "$@"
fi

if ! "$PY" -c "import jax; jax.devices('gpu')" >/dev/null 2>&1; then
  echo "JAX sees no GPU: pip install -U \"jax[cuda12]\"" >&2
  "$PY" -m pip install -q -U "jax[cuda12]"
fi
# The whole run stays within 8 minutes: what has printed by then stays printed.
exec timeout "${GPU_BENCH_TIMEOUT:-470}" "$PY" bench/gpu.py "$@"
