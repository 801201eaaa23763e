"""Chaos test of output directories: train.py and infer.py started again and again on one shared run
directory and one shared results directory, stopped at random moments (SIGKILL, SIGTERM, SIGINT),
sometimes two at once, sometimes with a file size limit standing in for a full disk (`ulimit -f`:
every write past it fails with EFBIG, Orbax's included). After each round:

- every exit is expected: 0, 2 (one `error:` line: refused, or the disk), 3 (stopped, checkpoint
  saved), 130 / 143 (interrupted), or death by the signal sent; never a traceback;
- the run directory holds one rome_flax run, resumable: config.json and the marker, every checksummed
  checkpoint intact or set aside by a resume, an export that verifies when there is one;
- the results directory, once settled as the next command would (`files.settle_output`), holds one
  complete infer.py result: every setting of sweep.json has its predictions file and nothing else;
- a finished run's parameters equal the uninterrupted run's bit for bit (then it is overwritten, and
  the next rounds start again).

  python scripts/chaos.py --rounds 200 --workdir /tmp/chaos        # prints one line per round, then a summary
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# 12 steps, a checkpoint every 2, a dev evaluation at the end of each epoch: seconds per run.
TINY = ["--random_model_layers", "2", "--random_model_hidden", "16", "--random_model_heads", "2",
        "--random_model_intermediate", "32", "--train_rows", "48", "--max_length", "16", "--batch_size", "8",
        "--epochs", "2", "--save_every", "2", "--log_every", "2", "--keep_checkpoints", "2", "--method", "joint",
        "--gr", "none", "--eval_batch_size", "1000", "--no_progress"]
INFER = ["--limit", "16", "--measure_speed", "none", "--no_progress", "--thresholds", "0.1,0.5,1.0"]
EXPECTED = {0, 2, 3, 130, 143, -signal.SIGKILL, -signal.SIGTERM, -signal.SIGINT}
NOISE = "traceback beside a right exit: "   # a violation that lost or mixed nothing


def start(cmd: list[str], file_limit_kb: int | None = None) -> subprocess.Popen:
  """A command in a new process (`ulimit -f` first when given: a disk that fills at that size)."""
  limit = f"ulimit -f {file_limit_kb} && " if file_limit_kb is not None else ""
  return subprocess.Popen(["bash", "-c", limit + 'exec "$@"', "-", sys.executable, *cmd], cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=ENV)


# Compiled programs shared between the rounds' processes: a round takes seconds, not a compile's half minute.
ENV = {**os.environ, "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}


def finish(proc: subprocess.Popen, timeout: float = 300) -> tuple[int, str]:
  _, err = proc.communicate(timeout=timeout)
  return proc.returncode, err


def train_cmd(run: Path, mode: str) -> list[str]:
  return ["train.py", *TINY, "--output_dir", str(run), *({"resume": ["--resume"], "overwrite": ["--overwrite"],
                                                         "fresh": []}[mode])]


def infer_cmd(export: Path, results: Path) -> list[str]:
  return ["infer.py", "--checkpoint", str(export), "--output_dir", str(results), "--overwrite", *INFER]


def check_exit(code: int, err: str, problems: list[str], what: str) -> None:
  errors = [line for line in err.splitlines() if line.startswith("error: ")]
  if code not in EXPECTED:
    problems.append(f"{what}: exit {code}: {err.strip()[-400:]}")
  elif "Traceback" in err or "Exception ignored" in err:   # the exit was right; a library's noise beside it
    problems.append(f"{NOISE}{what}: a traceback (exit {code}): {err.strip()[-400:]}")
  elif code == 2 and len(errors) != 1:
    problems.append(f"{what}: exit 2 without one error line: {err.strip()[-400:]}")


def check_run_dir(run: Path, problems: list[str]) -> None:
  from rome_flax.io import files, integrity
  if not run.exists() or not files.entries(run):
    return
  if files.output_kind(run) != "train" and not (run / files.REPLACED).is_dir():
    problems.append(f"{run}: holds {files.entries(run)} without the train marker")
  foreign = [n for n in files.entries(run) if n not in ("config.json", "metrics.jsonl", "tb", "checkpoints", "export",
                                                        "export.old") and not n.startswith(".export.tmp-")]
  if foreign:
    problems.append(f"{run}: unexpected entries {foreign}")
  if (run / "export").is_dir() and not integrity.verify(run / "export").intact:
    problems.append(f"{run}/export: {integrity.verify(run / 'export').problem}")
  steps = [p for p in (run / "checkpoints" / "last").glob("[0-9]*") if p.name.isdigit()]   # not Orbax's tmp dirs
  verdicts = [integrity.verify(s) for s in steps]
  if steps and all(v.status == integrity.DAMAGED for v in verdicts):   # unverified ones resume (or are set aside)
    problems.append(f"{run}: every checkpoint damaged: {[(s.name, v.problem) for s, v in zip(steps, verdicts)]}")


def check_results_dir(results: Path, problems: list[str]) -> None:
  from rome_flax import report
  from rome_flax.io import files
  from rome_flax.io.runlock import RunLock
  if not results.exists():
    return
  with RunLock(results):
    files.settle_output(results)   # what the next command there does first
  names = files.entries(results)
  if not names:
    return
  if files.output_kind(results) != "infer":
    problems.append(f"{results}: holds {names} without the infer marker")
    return
  try:
    sweep = json.loads((results / "sweep.json").read_text())
    json.loads((results / "summary.json").read_text())
  except (OSError, ValueError) as e:
    problems.append(f"{results}: incomplete ({type(e).__name__}: {e})")
    return
  wanted = {f"{report.safe_name(r['setting'])}.tsv" for r in sweep}
  have = {p.name for p in (results / "predictions").iterdir()} if (results / "predictions").is_dir() else set()
  if wanted != have:
    problems.append(f"{results}: predictions {sorted(have)} but sweep.json lists {sorted(wanted)}")
  if any(p.name.startswith(".") for p in results.iterdir() if p.name != "rome_flax.lock"):
    problems.append(f"{results}: left over {[p.name for p in results.iterdir() if p.name.startswith('.')]}")


def export_leaves(export: Path) -> list:
  import jax
  from rome_flax.model.pretrained import MultiExitBert
  return jax.tree.leaves(jax.device_get(MultiExitBert.from_pretrained(export).params))


def finished(run: Path) -> bool:
  steps = [json.loads(line).get("step") for line in (run / "metrics.jsonl").read_text().splitlines()
           if line.strip().endswith("}")] if (run / "metrics.jsonl").is_file() else []
  from rome_flax.io import integrity
  return bool(steps) and max(steps) >= 12 and integrity.verify(run / "export").intact


def one_round(rng: random.Random, work: Path, reference: list, typical_s: float, log) -> list[str]:
  """One round: a random command (or two) on the shared directories, stopped at a random moment."""
  import numpy as np
  run, results = work / "run", work / "results"
  problems: list[str] = []
  kind = rng.choice(["train", "train", "infer", "both"])
  disk = rng.random() < 0.2
  limit = rng.choice([2, 20, 200, 600]) if disk else None   # KiB
  export = run / "export" if (run / "export").is_dir() else work / "straight" / "export"
  procs = []
  if kind in ("train", "both"):
    mode = "resume" if (run / "config.json").is_file() else "fresh"
    if mode == "resume" and rng.random() < 0.1:
      mode = "overwrite"
    procs.append((f"train {mode}", start(train_cmd(run, mode), limit)))
    if rng.random() < 0.15:   # a second train.py on the same directory at once: one of them is refused
      procs.append(("train again", start(train_cmd(run, "resume" if mode != "fresh" else "fresh"))))
  if kind in ("infer", "both"):
    procs.append(("infer", start(infer_cmd(export, results), limit)))
    if rng.random() < 0.15:
      procs.append(("infer again", start(infer_cmd(export, results))))
  stop = rng.random() < 0.8
  sig = rng.choice([signal.SIGKILL, signal.SIGTERM, signal.SIGINT])
  if stop:
    time.sleep(rng.uniform(0.2, typical_s * 1.2))
    for _, proc in procs:
      if proc.poll() is None:
        proc.send_signal(sig)
        if sig != signal.SIGKILL and rng.random() < 0.3:   # pressed again
          time.sleep(rng.uniform(0.0, 0.5))
          if proc.poll() is None:
            proc.send_signal(sig)
  codes = []
  for what, proc in procs:
    code, err = finish(proc)
    codes.append(f"{what}={code}")
    check_exit(code, err, problems, what)
  check_run_dir(run, problems)
  check_results_dir(results, problems)
  note = ""
  if finished(run):
    got = export_leaves(run / "export")
    same = len(got) == len(reference) and all(np.array_equal(a, b) for a, b in zip(got, reference))
    if not same:
      problems.append(f"{run}: finished with parameters that differ from the uninterrupted run's")
    note = " finished, parameters bit-exact" if same else " finished, parameters DIFFER"
    shutil.rmtree(run)   # the next rounds start a new run
  log(f"{kind}{' disk<' + str(limit) + 'KiB' if disk else ''}{' ' + signal.Signals(sig).name if stop else ' no signal'}: "
      f"{' '.join(codes)}{note}" + (f" VIOLATIONS: {problems}" if problems else ""))
  return problems


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--rounds", type=int, default=200)
  ap.add_argument("--minutes", type=float, default=0, help="stop starting rounds after this long (0: no limit)")
  ap.add_argument("--seed", type=int, default=0)
  ap.add_argument("--workdir", default="/tmp/rome_flax_chaos")
  args = ap.parse_args(argv)
  violations, done = run_rounds(Path(args.workdir), args.rounds, args.seed, args.minutes,
                                lambda m: print(m, flush=True))
  for v in violations:
    print(v)
  return 1 if violations else 0


def run_rounds(work: Path, rounds: int, seed: int = 0, minutes: float = 0, say=print,
               warm: bool = True) -> tuple[list[str], int]:
  """The uninterrupted run, then up to `rounds` rounds (or `minutes`); returns (violations, rounds run).
  warm: time the uninterrupted run with its programs compiled (a second run), so kills spread over a round."""
  shutil.rmtree(work, ignore_errors=True)
  work.mkdir(parents=True)
  ENV["JAX_COMPILATION_CACHE_DIR"] = str(work / "jax_cache")
  t0 = time.time()
  for name in ("warm", "straight")[0 if warm else 1:]:   # the second is timed with the compiled programs cached
    t1 = time.time()
    code, err = finish(start(train_cmd(work / name, "fresh")))
    if code != 0:
      return [f"the uninterrupted run failed: {err}"], 0
  typical = time.time() - t1
  reference = export_leaves(work / "straight" / "export")
  say(f"uninterrupted run: {typical:.1f} s")
  rng = random.Random(seed)
  violations, done = [], 0
  for r in range(rounds):
    if minutes and time.time() - t0 > minutes * 60:
      break
    problems = one_round(rng, work, reference, typical, lambda m: say(f"round {r + 1}: {m}"))
    violations += [f"round {r + 1}: {p}" for p in problems]
    done += 1
  noise = sum(v.split(": ", 1)[1].startswith(NOISE) for v in violations)
  say(f"{done} rounds, {len(violations)} violations ({noise} of them tracebacks beside a right exit code), "
      f"{time.time() - t0:.0f} s")
  return violations, done


if __name__ == "__main__":
  sys.exit(main())
