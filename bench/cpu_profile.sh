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
# Every benchmark runs with the XLA flags shown (none by default: the caller's XLA_FLAGS are not used). One
# that fails prints `FAILED (exit N)` and its last lines, and the script exits non-zero at the end.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 1
PY="${PYTHON:-$(command -v python || command -v python3)}"
export PYTHONUNBUFFERED=1
failures=0

# run LABEL XLA_FLAGS KEEP_REGEX COMMAND...: the command's lines matching KEEP_REGEX, or its tail if it fails.
run() {
  local label="$1" flags="$2" keep="$3"
  shift 3
  echo "== $label, XLA_FLAGS='$flags'"
  local out
  out=$(XLA_FLAGS="$flags" "$@" 2>&1)
  local code=$?
  if [ "$code" -ne 0 ]; then
    echo "FAILED (exit $code):"
    echo "$out" | tail -n 15
    failures=$((failures + 1))
  else
    echo "$out" | grep -E "$keep"
  fi
}

echo "cpu: $(lscpu | sed -n 's/^Model name:[[:space:]]*//p' | head -1), $(nproc) cores, $(date -u +%F)"
echo "commit: $(git rev-parse --short HEAD 2>/dev/null || echo '?')"
for flags in "" "--xla_cpu_use_onednn=true" "--xla_cpu_use_xnnpack=false"; do
  run "bench/forward.py" "$flags" "^(device|flax|torch|ratio)" "$PY" bench/forward.py --min_time 6
done
run "bench/train_step.py" "" "^(cpu|\(a\)|\(b\)|\(c\)|\(d\)|ratio)" "$PY" bench/train_step.py
run "bench/profile_ops.py" "" "^(cpu|jax|batch|op|[a-z].*\||profile)" "$PY" bench/profile_ops.py
run "bench/profile_ops.py --backward" "" "^(cpu|jax|batch|op|[a-z].*\||profile)" "$PY" bench/profile_ops.py --backward
[ "$failures" -eq 0 ] || { echo "$failures benchmark(s) failed"; exit 1; }
