#!/usr/bin/env bash
# Everything issue 23 item 4 asks of a CPU type, in one run (about 12 minutes on 2 cores): run it on each CPU
# type the project meets (`lscpu` Model name: Intel Xeon, AMD EPYC) and copy the output into
# docs/results.md ("Per CPU type"). Heavy: run nothing else meanwhile.
#
#   bash bench/cpu_profile.sh 2>&1 | tee /tmp/cpu_profile.txt
#
# Prints: the CPU; bench/forward.py (whole forward vs PyTorch) with the default XLA flags and with the
# CPU flags worth trying (oneDNN matmuls, XNNPACK off); bench/train_step.py (GR and final-only steps vs
# PyTorch's plain and GR steps); bench/profile_ops.py per-op tables, forward and forward + backward.
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHONUNBUFFERED=1

echo "cpu: $(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1), $(nproc) cores, $(date -u +%F)"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
for flags in "" "--xla_cpu_use_onednn=true" "--xla_cpu_use_xnnpack=false"; do
  echo "== bench/forward.py, XLA_FLAGS='$flags'"
  XLA_FLAGS="$flags" "$PY" bench/forward.py --min_time 6 2>&1 | grep -E "^(device|flax|torch|ratio)"
done
echo "== bench/train_step.py"
"$PY" bench/train_step.py 2>&1 | grep -E "^(cpu|\(a\)|\(b\)|\(c\)|\(d\)|ratio)"
for mode in "" "--backward"; do
  echo "== bench/profile_ops.py $mode"
  "$PY" bench/profile_ops.py $mode 2>&1 | grep -v -i -E "warn|^\s*$"
done
