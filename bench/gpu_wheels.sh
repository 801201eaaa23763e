#!/usr/bin/env bash
# Wheels of the packages bench/gpu.sh's serving part needs that an accelerator image may lack (starlette,
# uvicorn, tensorboardX: train.py writes its logs with it), for a device that cannot reach PyPI. Run here,
# where pip can, before the device call; they land in .whl/ (git-ignored through .git/info/exclude), which
# the call carries and bench/gpu.sh installs from:
#
#   bash bench/gpu_wheels.sh              # here: .whl/, about 1 MiB
#   run(command="bash bench/gpu.sh", carry=[".whl"])   # on the device
#
# PYTHON_VERSION: the device's Python (default 3.12, the accelerator image's python3).
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-$(command -v python3 || command -v python)}"
exclude="$(git rev-parse --git-path info/exclude)"   # .git/info/exclude, in a worktree too
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo '/.whl/' >> "$exclude"
platforms=()
for n in 28 27 17; do
  platforms+=(--platform "manylinux_2_${n}_x86_64")
done
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version "${PYTHON_VERSION:-3.12}" \
  --implementation cp "${platforms[@]}" --platform manylinux2014_x86_64 -d .whl \
  "starlette>=0.37" "uvicorn>=0.30" "tensorboardX>=2.6"
ls -1 .whl
