"""Host allocator tuning: freed blocks are reused, so the second big temporary takes no page faults."""

import subprocess
import sys

import pytest

PROBE = r"""
import ctypes, resource, sys
from rome_flax.runtime import retain_host_memory
ok = retain_host_memory() if sys.argv[1] == "retain" else False
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
def touch():  # a 200 MB block written then freed, as XLA:CPU does with a step's temporaries
  p = libc.malloc(200 << 20); ctypes.memset(p, 1, 200 << 20); libc.free(p)
touch()
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
touch()
print(int(ok), resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
"""


def probe(mode, env=None):
  out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True, env=env)
  applied, faults = out.stdout.split()
  return applied == "1", int(faults)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc mallopt")
def test_retained_memory_is_reused_without_page_faults():
  applied, faults = probe("retain")
  _, default_faults = probe("default")
  assert applied
  assert default_faults > 40_000          # 200 MB of 4 KiB pages, faulted in again
  assert faults < 0.05 * default_faults  # the same pages, reused


def test_opt_out_by_environment(monkeypatch):
  import os
  env = dict(os.environ, ROME_FLAX_DEFAULT_MALLOC="1")
  applied, _ = probe("retain", env=env)
  assert not applied
