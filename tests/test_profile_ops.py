"""bench/profile_ops.py at tiny shapes: every op's row, forward and forward + backward, with JAX's and PyTorch's
outputs (the gradients, with --backward) agreeing: the per-op profile compares the same computation."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import SUITE_XLA_FLAGS

pytest.importorskip("torch")
ROOT = Path(__file__).resolve().parents[1]
OPS = ("qkv matmul D->3D", "scores q@k^T", "softmax(+mask)", "context p@v", "attn out D->D", "intermediate D->F",
       "gelu jax.nn.gelu", "gelu rome_flax form", "output F->D", "residual+layernorm", "attention vs sdpa", "layer")


@pytest.mark.parametrize("backward", [False, True])
def test_profile_ops_prints_every_op_and_both_frameworks_agree(backward):
  cmd = [sys.executable, str(ROOT / "bench" / "profile_ops.py"), "--batch", "2", "--seq", "8", "--hidden", "16",
         "--heads", "2", "--ffn", "24", "--rounds", "1", "--xla_flags", SUITE_XLA_FLAGS]
  done = subprocess.run(cmd + (["--backward"] if backward else []), cwd=ROOT, capture_output=True, text=True,
                        timeout=300)
  assert done.returncode == 0, done.stdout + done.stderr
  lines = done.stdout.splitlines()
  assert lines[0].startswith("cpu: ") and ("forward + backward" in done.stdout) == backward
  rows = {line.split("|")[0].strip(): line.split("|")[1:] for line in lines if line.count("|") == 4}
  for op in OPS:
    jax_ms, torch_ms, ratio, diff = (cell.strip() for cell in rows[op])
    assert float(jax_ms) > 0 and float(torch_ms) > 0 and float(ratio) > 0, rows[op]
    assert float(diff) < 1e-4, f"{op}: JAX and PyTorch disagree by {diff}"
  assert re.fullmatch(rf"profile{' backward' if backward else ''}: layer ratio torch/jax = \d+\.\d\d", lines[-1])
