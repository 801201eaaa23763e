"""bench/gpu.sh --dry-run: the GPU script's own code on the CPU at tiny shapes prints every line."""

import os
import re
import subprocess
import sys
from pathlib import Path

from conftest import SUITE_XLA_FLAGS

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_bench_dry_run_prints_every_line():
  env = dict(os.environ, GPU_PEAK_FLOPS="1e12", PYTHON=sys.executable)
  env["XLA_FLAGS"] = SUITE_XLA_FLAGS   # no forced device count of the caller's; the suite's compile level
  done = subprocess.run(["bash", str(ROOT / "bench" / "gpu.sh"), "--dry-run"], cwd=ROOT, env=env,
                        capture_output=True, text=True, timeout=300)
  out = done.stdout
  assert done.returncode == 0, out + done.stderr
  lines = {line.split(":", 1)[0]: line for line in out.splitlines() if ":" in line}
  assert "DRY RUN" in lines["device"] and "peak 1.000e+12 FLOP/s" in lines["device"]
  assert re.search(r"forward: [\d.]+ seq/s", out)
  for name in ("train_step final_only", "train_step GR"):
    assert re.search(r"[\d.]+ ms/step", lines[name]), lines[name]
    assert re.search(r"mfu (n/a|[\d.]+)", lines[name]) and re.search(r"mfu_6N [\d.]+", lines[name]), lines[name]
  for name in ("early_exit b64", "early_exit b1"):
    assert re.search(r"speed-up [\d.]+", lines[name]), lines[name]
    assert "decisions off the offline ones 0" in lines[name], lines[name]
  assert "near-ties" in lines["early_exit b64"]
  serving = [line for line in out.splitlines() if line.startswith("serving")]
  assert "failed" not in out and serving and (list((ROOT / "bench").glob("serve*.py")) or serving == ["serving: not built yet"])
