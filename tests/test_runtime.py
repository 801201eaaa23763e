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


# ----------------------------------------------------------------------------- the compilation cache

CACHE_PROBE = r"""
import sys, jax, jax.numpy as jnp
from rome_flax import cli
hits = []
jax.monitoring.register_event_listener(lambda event, **kw: hits.append(1) if event.endswith("/cache_hits") else None)
def program(args):
  jax.jit(lambda x: jnp.tanh(x @ x.T) @ x)(jnp.ones((64, 64))).block_until_ready()
  from rome_flax.runtime import compilation_cache_in_use
  print(compilation_cache_in_use() or "none", len(hits))
sys.exit(cli.run(program, cli.ArgumentParser(), sys.argv[1:]))
"""


def cache_probe(tmp_path, *argv, **env_set):
  import os
  env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_COMPILATION_CACHE", "JAX_PERSISTENT_CACHE",
                                                                   "ROME_FLAX_COMPILATION_CACHE", "XDG_CACHE"))}
  env.update(HOME=str(tmp_path / "home"), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", **env_set)
  return subprocess.run([sys.executable, "-c", CACHE_PROBE, *argv], capture_output=True, text=True, env=env,
                        timeout=300)


def test_compiled_programs_are_kept_per_cpu_type_and_reused_by_the_next_process(tmp_path):
  from rome_flax.runtime import host_fingerprint
  folder = tmp_path / "cache"
  first = cache_probe(tmp_path, "--compilation_cache", str(folder))
  assert first.returncode == 0, first.stderr
  used, hits = first.stdout.split()
  assert used == str(folder / host_fingerprint()) and int(hits) == 0
  assert any((folder / host_fingerprint()).iterdir())
  second = cache_probe(tmp_path, "--compilation_cache", str(folder))
  assert second.returncode == 0 and int(second.stdout.split()[1]) >= 1   # served from the folder


def test_the_cache_is_on_by_default_in_the_home_folder_and_off_when_asked(tmp_path):
  from rome_flax.runtime import host_fingerprint
  default = cache_probe(tmp_path)
  assert default.stdout.split()[0] == str(tmp_path / "home" / ".cache" / "rome_flax" / "xla" / host_fingerprint())
  assert cache_probe(tmp_path, "--compilation_cache", "off").stdout.split()[0] == "none"
  assert cache_probe(tmp_path, ROME_FLAX_COMPILATION_CACHE="off").stdout.split()[0] == "none"
  by_env = cache_probe(tmp_path, ROME_FLAX_COMPILATION_CACHE=str(tmp_path / "env"))
  assert by_env.stdout.split()[0] == str(tmp_path / "env" / host_fingerprint())
  jax_own = cache_probe(tmp_path, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax"))   # JAX's variable: JAX's way
  assert jax_own.stdout.split()[0] == str(tmp_path / "jax")
  both = cache_probe(tmp_path, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "jax"), ROME_FLAX_COMPILATION_CACHE="off")
  assert both.stdout.split()[0] == "none"   # ours, when set, wins over JAX's
  xdg = cache_probe(tmp_path, XDG_CACHE_HOME=str(tmp_path / "xdg"))
  assert xdg.stdout.split()[0] == str(tmp_path / "xdg" / "rome_flax" / "xla" / host_fingerprint())


def test_a_cache_folder_that_cannot_be_made_is_one_error_line(tmp_path):
  blocker = tmp_path / "a_file"
  blocker.write_text("mine")
  out = cache_probe(tmp_path, "--compilation_cache", str(blocker))
  assert out.returncode == 2 and out.stdout == ""
  assert out.stderr.startswith(f"error: --compilation_cache {blocker}: the compilation cache cannot be used: ")
  assert "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
  assert blocker.read_text() == "mine"
  by_env = cache_probe(tmp_path, ROME_FLAX_COMPILATION_CACHE=str(blocker))
  assert by_env.returncode == 2 and by_env.stderr.startswith("error: $ROME_FLAX_COMPILATION_CACHE ")
  blank = cache_probe(tmp_path, "--compilation_cache", " ")
  assert blank.returncode == 2 and "give a folder" in blank.stderr and "Traceback" not in blank.stderr
  # The default folder failing (a home folder that is a file) only turns the cache off.
  (tmp_path / "home").write_text("not a folder")
  quiet = cache_probe(tmp_path)
  assert quiet.returncode == 0 and quiet.stdout.split()[0] == "none"
