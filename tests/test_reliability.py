"""Issue 12: preemption (SIGTERM / SIGINT), checkpoints and exports that verify, one run per
directory, and resumes that survive what a preempted machine leaves behind. Each resumed run must
end with the uninterrupted run's parameters, bit for bit."""

from __future__ import annotations

import errno
import hashlib
import itertools
import json
import logging
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import infer
import train
from rome_flax import cli, report
from rome_flax.__main__ import main as package_main
from rome_flax.errors import RomeFlaxError
from rome_flax.io import files, integrity
from rome_flax.io.runlock import LOCK_FILE, RunLock
from rome_flax.model.pretrained import MultiExitBert
from rome_flax.train import trainer

ROOT = Path(__file__).resolve().parents[1]
CHEAP = ["--method", "joint", "--gr", "none", "--eval_batch_size", "1000", "--no_progress"]   # quick to compile
# 64 steps, a dev evaluation (1,000 examples) every 8: long enough to signal a run mid-way.
LONG = ["--random_model_layers", "2", "--random_model_hidden", "32", "--random_model_heads", "2",
        "--random_model_intermediate", "48", "--train_rows", "128", "--batch_size", "8", "--max_length", "16",
        "--epochs", "4", "--eval_every", "8", "--save_every", "1000", "--log_every", "4", *CHEAP]
# 16 steps; checkpoints after steps 3, 6, 8 (an evaluation), 9, 12, 15, 16, the last five kept.
SHORT = ["--random_model_layers", "2", "--random_model_hidden", "16", "--random_model_heads", "2",
         "--random_model_intermediate", "32", "--train_rows", "64", "--batch_size", "8", "--max_length", "16",
         "--epochs", "2", "--eval_every", "8", "--save_every", "3", "--log_every", "2", "--keep_checkpoints", "5",
         *CHEAP]


def export_params(out: Path) -> list:
  return jax.tree.leaves(jax.device_get(MultiExitBert.from_pretrained(Path(out) / "export").params))


def assert_same_params(a: Path, b: Path) -> None:
  for x, y in zip(export_params(a), export_params(b), strict=True):
    np.testing.assert_array_equal(x, y)


def train_steps(out: Path) -> list[int]:
  return [r["step"] for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if r["kind"] == "train"]


def start_training(out: Path, *flags: str) -> subprocess.Popen:
  """train.py in a subprocess, returned once it has printed its first evaluation (so it is mid-run,
  its signal handlers in place)."""
  proc = subprocess.Popen([sys.executable, str(ROOT / "train.py"), "--output_dir", str(out), *flags],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)
  for line in proc.stdout:
    if line.startswith("step ") and " dev " in line:
      return proc
  raise AssertionError(f"train.py ended before evaluating: {proc.communicate()[1]}")


def run_cli(main, argv) -> int:
  try:
    return main([str(a) for a in argv])
  except SystemExit as e:
    return e.code


@pytest.fixture(scope="module")
def straight_long(tmp_path_factory) -> Path:
  out = tmp_path_factory.mktemp("long") / "straight"
  assert train.main([*LONG, "--output_dir", str(out)]) == 0
  return out


@pytest.fixture(scope="module")
def straight_short(tmp_path_factory) -> Path:
  out = tmp_path_factory.mktemp("short") / "straight"
  assert train.main([*SHORT, "--output_dir", str(out)]) == 0
  return out


# ----------------------------------------------------------------------------- preemption, the run lock


def test_preempted_twice_and_resumed_loses_nothing(straight_long, tmp_path, capsys, monkeypatch):
  """SIGTERM to train.py, then SIGINT to the resumed run, then a last resume: the uninterrupted run's
  parameters bit for bit, every step logged once. While the first run is alive (here: frozen), every
  second train.py on its directory is refused, and --overwrite deletes nothing."""
  out = tmp_path / "run"
  proc = start_training(out, *LONG)
  proc.send_signal(signal.SIGSTOP)
  try:
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    for extra in (["--resume"], ["--overwrite"], []):
      assert run_cli(train.main, [*LONG, "--output_dir", out, *extra]) == 2
      err = capsys.readouterr().err.strip().splitlines()
      assert len(err) == 1 and f"is in use by another run (pid {proc.pid} on host {socket.gethostname()}" in err[0]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
  finally:
    proc.send_signal(signal.SIGCONT)
    proc.send_signal(signal.SIGTERM)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 3, err
  lines = err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("stopped: SIGTERM after step ") and "--resume" in lines[0], err
  first = int(lines[0].split("after step ")[1].split()[0])
  assert 8 <= first < 64 and not (out / "export").exists() and not (out / LOCK_FILE).exists()
  assert max(int(p.name) for p in (out / "checkpoints" / "last").iterdir()) == first

  # Ctrl-C during the resumed run's first evaluation (in this process: no second start-up to wait for).
  evaluate = trainer.evaluate

  def interrupted(*args, **kw):
    monkeypatch.setattr(trainer, "evaluate", evaluate)
    signal.raise_signal(signal.SIGINT)
    return evaluate(*args, **kw)

  monkeypatch.setattr(trainer, "evaluate", interrupted)
  capsys.readouterr()
  assert train.main([*LONG, "--output_dir", str(out), "--resume"]) == 3
  second = -(-(first + 1) // 8) * 8   # the step of the first evaluation after the resume
  assert capsys.readouterr().err.strip().splitlines() == [
      f"stopped: SIGINT after step {second} of 64; checkpoint saved in {out / 'checkpoints' / 'last'}; "
      "continue with --resume"]

  assert train.main([*LONG, "--output_dir", str(out), "--resume"]) == 0
  assert_same_params(straight_long, out)
  assert train_steps(out) == list(range(1, 65))


# ----------------------------------------------------------------------------- checkpoints


def _step(out: Path, step: int) -> Path:
  return out / "checkpoints" / "last" / str(step)


def _garble(path: Path) -> None:
  data = bytearray(path.read_bytes())
  data[:64] = bytes(b ^ 0x5A for b in data[:64])
  path.write_bytes(bytes(data))


def _largest(directory: Path) -> Path:
  return max((p for p in directory.rglob("*") if p.is_file() and p.name != integrity.MANIFEST),
             key=lambda p: p.stat().st_size)


def test_damaged_checkpoints_fall_back_to_the_newest_intact_one(straight_short, tmp_path, caplog, monkeypatch):
  """What kills and bad disks leave: an empty step directory, garbled bytes (in the newest last and
  in the best checkpoint), a save cut off before its checksums, a truncated _METADATA, a garbled
  best.json. The resume says so in one line, sets them aside and resumes from the newest intact
  checkpoint (step 9) of a run that has moved and is named by a relative path with a trailing
  slash; it ends with the uninterrupted run's parameters."""
  out = tmp_path / "moved"
  shutil.copytree(straight_short, out)
  shutil.rmtree(out / "export")
  assert sorted(int(p.name) for p in (out / "checkpoints" / "last").iterdir()) == [8, 9, 12, 15, 16]
  _step(out, 17).mkdir()
  _garble(_largest(_step(out, 16)))
  (_step(out, 15) / integrity.MANIFEST).unlink()
  (_step(out, 12) / "default" / "_METADATA").write_text('{"tree_metadata": {')
  (best,) = (out / "checkpoints" / "best").iterdir()
  _garble(_largest(best))
  (out / "checkpoints" / "best.json").write_text('{"step": 8, "val')
  monkeypatch.chdir(tmp_path)
  with caplog.at_level(logging.WARNING):
    assert train.main([*SHORT, "--output_dir", "moved/", "--resume"]) == 0
  notes = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
  resumed = [n for n in notes if "resuming from step" in n]
  assert len(resumed) == 1, notes   # Orbax's own complaints about the damaged files are not repeated
  for expected in ("last step 17 is damaged (it has no rome_flax_checksums.json and no files",
                   "last step 16 is damaged (default/", "differs from what was saved",
                   "last step 15 is unverified (it has no rome_flax_checksums.json",
                   "last step 12 is damaged (default/_METADATA has",
                   f"resuming from step 9 ({out / 'checkpoints' / 'last'})"):
    assert expected in resumed[0], (expected, resumed[0])
  assert (f"best step {best.name} is damaged" in resumed[0]) == (int(best.name) > 9)
  assert set(notes) - set(resumed) == {f"{out / 'checkpoints' / 'best.json'} is unreadable (JSONDecodeError); "
                                       "the best checkpoint is chosen afresh from here on"}
  assert {"last-12", "last-15", "last-16", "last-17"} <= {p.name for p in (out / "checkpoints" / "damaged").iterdir()}
  assert_same_params(straight_short, out)
  assert train_steps(out) == list(range(1, 17))
  assert all(integrity.verify(_step(out, s)).intact for s in (12, 15, 16))   # saved anew


def test_resume_of_a_finished_run_keeps_its_export(straight_short, tmp_path, capsys):
  out = tmp_path / "run"
  shutil.copytree(straight_short, out)
  export = out / "export"
  before = {p.name: p.read_bytes() for p in export.rglob("*") if p.is_file()}
  assert train.main([*SHORT, "--output_dir", str(out), "--resume"]) == 0
  assert "had already finished" in capsys.readouterr().out
  assert {p.name: p.read_bytes() for p in export.rglob("*") if p.is_file()} == before
  shutil.rmtree(export)   # killed during its export: the resume writes it, with the final dev metrics
  assert train.main([*SHORT, "--output_dir", str(out), "--resume"]) == 0
  info = MultiExitBert.from_pretrained(export).export_info
  assert info.dev_metrics["dev"] == json.loads((straight_short / "export" / "rome_flax_config.json").read_text())[
      "metadata"]["dev_metrics"]["dev"]
  assert_same_params(straight_short, out)


# ----------------------------------------------------------------------------- exports


def test_export_integrity(straight_short, tmp_path, caplog):
  export = tmp_path / "export"
  shutil.copytree(straight_short / "export", export)
  assert integrity.verify(export).intact
  _garble(_largest(export / "params"))
  with pytest.raises(RomeFlaxError, match=r"export .* is damaged: params/.* differs from what was saved"):
    MultiExitBert.from_pretrained(export)
  shutil.rmtree(export)
  shutil.copytree(straight_short / "export", export)
  (export / integrity.MANIFEST).unlink()   # written by an older rome_flax: loads, with a warning
  with caplog.at_level(logging.WARNING):
    MultiExitBert.from_pretrained(export)
  assert any("not verified" in r.getMessage() for r in caplog.records)


def test_a_killed_export_leaves_nothing_behind(straight_short, tmp_path):
  model = MultiExitBert.from_pretrained(straight_short / "export")
  target = tmp_path / "export"
  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
  stale = tmp_path / f".export.tmp-{files._HOST}-{int(dead.stdout)}-abc123"   # a SIGKILLed writer's stage
  live = tmp_path / f".export.tmp-{files._HOST}-{os.getpid()}-def456"         # a live writer's: kept
  for stage in (stale, live):
    (stage / "params").mkdir(parents=True)
  model.save_pretrained(target)
  assert not stale.exists() and live.exists() and integrity.verify(target).intact
  # Killed between moving the old export aside and moving the new one in: the old one comes back.
  target.rename(tmp_path / "export.old")
  with files.staged_directory(target) as stage:
    assert (target / integrity.MANIFEST).is_file()   # restored before the new stage is filled
    (stage / "x").write_text("new")
  assert (target / "x").read_text() == "new" and not (tmp_path / "export.old").exists()


# ----------------------------------------------------------------------------- the run lock


def test_run_lock(tmp_path, caplog):
  holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]); "
                             "from rome_flax.io.runlock import RunLock; RunLock(sys.argv[2]).acquire(); "
                             "print('held', flush=True); time.sleep(120)", str(ROOT), str(tmp_path)],
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RomeFlaxError, match=f"in use by another run \\(pid {holder.pid} on host "):
      RunLock(tmp_path).acquire()
  finally:
    holder.kill()
    holder.wait()
  assert (tmp_path / LOCK_FILE).is_file()   # SIGKILL: the file stays, the kernel's lock does not
  with caplog.at_level(logging.WARNING):
    lock = RunLock(tmp_path).acquire()
  assert any("took over the stale lock" in r.getMessage() and f"pid {holder.pid}" in r.getMessage()
             for r in caplog.records)
  assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
  lock.release()
  assert not (tmp_path / LOCK_FILE).exists()
  # A lock left by a run on another machine: this one cannot tell whether it still runs.
  (tmp_path / LOCK_FILE).write_text(json.dumps({"pid": 1, "host": "elsewhere", "started": "2026-01-01T00:00:00"}))
  with pytest.raises(RomeFlaxError, match=f"locked by pid 1 on host elsewhere.*delete {tmp_path / LOCK_FILE}"):
    RunLock(tmp_path).acquire()


# ----------------------------------------------------------------------------- small pieces


def test_signals_first_requests_a_stop_second_acts_at_once(capsys):
  from rome_flax import cli
  # A process started in the background by a non-interactive shell inherits SIGINT ignored; the test
  # is about Python's own handler, so it installs that first (and puts back what it found).
  inherited = signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    _first_requests_second_interrupts()
  finally:
    signal.signal(signal.SIGINT, inherited)

  def interrupted(args):
    raise KeyboardInterrupt
  assert cli.run(interrupted, cli.ArgumentParser(), []) == cli.EXIT_INTERRUPTED
  assert capsys.readouterr().err == "interrupted\n"


def _first_requests_second_interrupts():
  from rome_flax.io import preemption
  with preemption.StopSignals() as signals:
    assert not signals.requested(1)
    signal.raise_signal(signal.SIGINT)
    assert signals.requested(1) and signals.signal_name == "SIGINT"
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # restored


def test_a_second_signal_forces_the_stop():
  """Ctrl-C twice: the default action at once (the process dies by the signal), whatever handler a
  library put in place. In a subprocess: in this one it would end the test session."""
  code = ("import signal, sys\n"
          "from rome_flax.io import preemption\n"
          "with preemption.StopSignals() as signals:\n"
          "  signal.raise_signal(signal.SIGINT)\n"
          "  assert signals.requested(1)\n"
          "  print('first noted', flush=True)\n"
          "  signal.raise_signal(signal.SIGINT)\n"
          "  print('not reached', flush=True)\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120)
  assert proc.returncode == -signal.SIGINT, proc.stderr
  assert proc.stdout == "first noted\n"


def test_metrics_cut_off_mid_line_by_a_kill_are_dropped_on_resume(tmp_path):
  (tmp_path / trainer.METRICS_FILE).write_text('{"kind": "train", "loss": 1.0, "step": 1}\n'
                                               '{"kind": "train", "loss": 0.9, "step": 2}\n{"kind": "tr')
  trainer.MetricsWriter(tmp_path, 2).close()
  assert train_steps(tmp_path) == [1, 2]


# ----------------------------------------------------------------------------- output directories (issue 24)

QUICK = ["--limit", "8", "--measure_speed", "none", "--no_progress", "--thresholds", "0.1,0.5"]


def infer_argv(export: Path, out: Path, *more: str) -> list[str]:
  return ["--checkpoint", str(export), "--output_dir", str(out), *QUICK, *more]


def digest(root: Path) -> dict:
  return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
          for p in sorted(root.rglob("*")) if p.is_file()}


def failing_disk(monkeypatch, code: int, after: int = 0) -> None:
  """files.write_chunk (every byte of a result file) fails with `code` from its `after`-th chunk on."""
  calls, write = itertools.count(), files.write_chunk

  def failing(f, chunk):
    if next(calls) >= after:
      raise OSError(code, os.strerror(code))
    write(f, chunk)
  monkeypatch.setattr(files, "write_chunk", failing)


def test_every_io_failure_is_one_error_line(capsys):
  for code in (errno.ENOSPC, errno.EFBIG, errno.EACCES, errno.ENAMETOOLONG, errno.EROFS, errno.EIO):
    def program(args, code=code):
      raise RuntimeError("a library's own wrapper") from OSError(code, os.strerror(code), "/runs/x/file")
    assert cli.run(program, cli.ArgumentParser(), []) == 2
    assert capsys.readouterr().err == f"error: /runs/x/file: {os.strerror(code)}\n"


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EIO])
def test_a_failed_write_leaves_earlier_results_as_they_were(straight_short, tmp_path, capsys, monkeypatch, code):
  export, out, fresh = straight_short / "export", tmp_path / "infer", tmp_path / "fresh"
  assert infer.main(infer_argv(export, out)) == 0
  before = digest(out)
  failing_disk(monkeypatch, code, after=3)
  capsys.readouterr()
  assert infer.main(infer_argv(export, out, "--overwrite")) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and err[0].startswith("error: cannot write ") and os.strerror(code) in err[0], err
  assert digest(out) == before and sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
  assert infer.main(infer_argv(export, fresh)) == 2 and not fresh.exists()


def test_a_file_size_limit_is_one_error_line(straight_short, tmp_path):
  """`ulimit -f` in a real process: every write past it fails with EFBIG (Python ignores SIGXFSZ)."""
  out = tmp_path / "infer"
  done = subprocess.run(["bash", "-c", 'ulimit -f 2 && exec "$@"', "-", sys.executable, str(ROOT / "infer.py"),
                         *infer_argv(straight_short / "export", out)], capture_output=True, text=True, cwd=ROOT)
  lines = [line for line in done.stderr.splitlines() if line.strip()]
  assert done.returncode == 2 and len(lines) == 1 and "File too large" in lines[0], done.stderr
  assert not out.exists()


def test_overwrite_keeps_the_old_run_until_the_new_one_holds(straight_short, tmp_path, capsys, monkeypatch):
  out = tmp_path / "run"
  shutil.copytree(straight_short, out)
  before = digest(out)
  # The new run's first checkpoint fails (a full disk): the old run is put back, byte for byte.
  monkeypatch.setattr(trainer.RunCheckpoints, "save", lambda self, state: (_ for _ in ()).throw(
      OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self.directory))))
  assert run_cli(train.main, [*SHORT, "--output_dir", out, "--overwrite"]) == 2
  assert capsys.readouterr().err.strip().endswith("checkpoints: No space left on device")
  monkeypatch.undo()
  assert digest(out) == before and not (out / files.REPLACED).exists()
  # Killed after moving the old run aside, before the new run's first checkpoint: the next command puts it back.
  files.move_aside(out)
  (out / "config.json").write_text("{}")
  assert run_cli(train.main, [*SHORT, "--output_dir", out]) == 2
  assert "already holds a run" in capsys.readouterr().err and digest(out) == before
  # A replacement that holds: the old run is gone; max_steps says so, saves and exports.
  assert run_cli(train.main, [*SHORT, "--output_dir", out, "--overwrite", "--max_steps", "3"]) == 0
  assert "stopped by max_steps after step 3 of 16" in capsys.readouterr().out
  assert train_steps(out) == [1, 2, 3] and integrity.verify(out / "export").intact
  assert not (out / files.REPLACED).exists() and files.output_kind(out) == "train"


def test_infer_takes_the_run_lock_and_replaces_its_results_whole(straight_short, tmp_path, capsys):
  export, out = straight_short / "export", tmp_path / "infer"
  assert infer.main(infer_argv(export, out, "--thresholds", "0.1,0.2,0.3")) == 0
  with RunLock(out):
    assert infer.main(infer_argv(export, out, "--overwrite")) == 2
    assert "is in use by another run" in capsys.readouterr().err
  assert infer.main(infer_argv(export, out, "--overwrite")) == 0   # QUICK's two thresholds
  listed = {f"{report.safe_name(r['setting'])}.tsv" for r in json.loads((out / "sweep.json").read_text())}
  assert {p.name for p in (out / "predictions").iterdir()} == listed and len(listed) == 2
  assert files.output_kind(out) == "infer" and not (out / LOCK_FILE).exists()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_swallowed_signal_still_stops_infer(straight_short, tmp_path, capsys, monkeypatch, sig):
  """A library that swallows the signal's exception (JAX's gc callback: "Exception ignored") does not
  make infer.py finish: it stops before committing anything, exit 128 + signal."""
  write = report.write_evaluation

  def swallowing(*args, **kw):
    try:
      signal.raise_signal(sig)
    except KeyboardInterrupt:
      pass
    return write(*args, **kw)
  monkeypatch.setattr(report, "write_evaluation", swallowing)
  out = tmp_path / "infer"
  assert infer.main(infer_argv(straight_short / "export", out)) == 128 + sig
  assert capsys.readouterr().err == f"interrupted by {signal.Signals(sig).name}\n"
  assert not out.exists()


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_files_respect_the_umask(straight_short, tmp_path, mask):
  previous = os.umask(mask)
  try:
    assert infer.main(infer_argv(straight_short / "export", tmp_path / "infer")) == 0
    assert package_main(["convert", str(straight_short / "export"), str(tmp_path / "export")]) == 0
  finally:
    os.umask(previous)
  for root in (tmp_path / "infer", tmp_path / "export"):
    for p in [root, *root.rglob("*")]:
      want = (0o777 if p.is_dir() else 0o666) & ~mask
      assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(stat.S_IMODE(p.stat().st_mode)))


def test_convert_of_an_export_and_its_overwrite(straight_short, tmp_path, capsys):
  export, out = straight_short / "export", tmp_path / "copy"
  assert package_main(["convert", str(export), str(out)]) == 0
  assert "a rome_flax export, copied as it is" in capsys.readouterr().out
  assert MultiExitBert.from_pretrained(out).export_info == MultiExitBert.from_pretrained(export).export_info
  assert package_main(["convert", str(export), str(out), "--overwrite"]) == 0 and files.output_kind(out) == "export"
  run = tmp_path / "run"
  shutil.copytree(straight_short, run, ignore=shutil.ignore_patterns("checkpoints"))
  capsys.readouterr()
  assert package_main(["convert", str(export), str(run), "--overwrite"]) == 2
  assert "holds rome_flax train output, not export output" in capsys.readouterr().err


def test_chaos_rounds(tmp_path):
  """scripts/chaos.py's short version: a few rounds of train.py / infer.py on shared directories, stopped
  at random moments (the script runs 200)."""
  sys.path.insert(0, str(ROOT / "scripts"))
  import chaos
  violations, rounds = chaos.run_rounds(tmp_path / "chaos", rounds=3, seed=1, say=lambda m: None, warm=False)
  assert rounds == 3 and [v for v in violations if chaos.NOISE not in v] == []
