"""One run on one accelerator: forward throughput, train-step time and MFU, early-exit speed-ups, serving.

Random weights from the project's own initialiser (`model.init_params`) at BERT-base shapes (12
layers, hidden 768, 12 heads, FFN 3072), bfloat16 compute. One line per measurement:

  device: ...                       the GPU's name (or lscpu's model name), JAX version, peak FLOP/s
  forward: ...                      all-exits forward, batch 32, sequence 128: sequences/s
  train_step final_only: ...        ms/step, examples/s, MFU
  train_step GR: ...                RomeBERT with gradient projection (GR): ms/step, examples/s, MFU
  early_exit b64: ...               throughput path against the full model (bench/early_exit.measure)
  early_exit b1: ...                latency path against the full model
  serving: ...                      bench/serve*.py's last line, or 'not built yet'

MFU = FLOPs per step / seconds per step / peak, the peak from $GPU_PEAK_FLOPS (default 989e12: H100/H200
bf16 dense). FLOPs per step from XLA's cost analysis of the compiled step (`mfu`) when it gives one, and
always the model count 6 x (encoder parameters) x tokens + attention 12 x L x S x D x tokens (`mfu_6N`).

  bash bench/gpu.sh [--dry-run]      (--dry-run: the same code on the CPU at tiny shapes, 2 layers, hidden 64)
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np

DEFAULT_PEAK = 989e12

FULL = dict(layers=12, hidden=768, heads=12, ffn=3072, batch=32, seq=128, ee_examples=1024, ee_latency=64,
            ee_seq=128, exit_layer=4, rounds=10, calls=5, tie_tol=2e-2)
DRY = dict(layers=2, hidden=64, heads=2, ffn=128, batch=4, seq=32, ee_examples=128, ee_latency=8,
           ee_seq=32, exit_layer=1, rounds=2, calls=2, tie_tol=2e-2)


def say(text: str) -> None:
  print(text, flush=True)


def xla_flops(compiled) -> float:
  """FLOPs of a compiled executable by XLA's cost analysis; 0.0 when it gives none."""
  try:
    cost = compiled.cost_analysis()
  except Exception:   # some backends do not implement it
    return 0.0
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else {}
  return float((cost or {}).get("flops", 0.0) or 0.0)


def model_flops(cfg, params, tokens: int, seq: int, passes: int) -> float:
  """passes x (2 x encoder parameters x tokens + 4 x L x S x D x tokens): passes 3 for a train step, 1 forward."""
  import jax
  n = sum(x.size for x in jax.tree.leaves(params["layers"]))
  return passes * (2.0 * n * tokens + 4.0 * cfg.num_layers * seq * cfg.hidden_size * tokens)


def device_name() -> str:
  import jax
  from bench._common import cpu_model
  d = jax.devices()[0]
  return d.device_kind if d.platform != "cpu" else f"cpu (Model name: {cpu_model()})"


def bench_forward(cfg, params, s: dict, peak: float) -> None:
  import jax
  from rome_flax.engine.speed import compare
  from rome_flax.model.encoder import forward
  from bench.train_step import random_batch
  b = jax.device_put(random_batch(cfg, s["batch"], s["seq"]))
  fwd = jax.jit(lambda p, i, m, t: forward(p, cfg, i, m, t).exit_logits)
  compiled = fwd.lower(params, b["input_ids"], b["attention_mask"], b["token_type_ids"]).compile()
  t = compare({"fwd": lambda: compiled(params, b["input_ids"], b["attention_mask"],
                                       b["token_type_ids"]).block_until_ready()},
              rounds=s["rounds"], calls_per_round=s["calls"], warmup=2)["fwd"].median
  flops = xla_flops(compiled) or model_flops(cfg, params, s["batch"] * s["seq"], s["seq"], 1)
  say(f"forward: {s['batch'] / t:.1f} seq/s ({t * 1e3:.2f} ms/batch), all {cfg.num_exits} exits, "
      f"batch {s['batch']}, seq {s['seq']}, {cfg.dtype}; {flops / t / 1e12:.2f} TFLOP/s, "
      f"mfu {flops / t / peak:.3f}")


def bench_train(cfg, params, s: dict, peak: float) -> None:
  from bench.train_step import jax_step, random_batch
  from rome_flax.engine.speed import compare
  model = types.SimpleNamespace(params=params, config=cfg)
  batch = random_batch(cfg, s["batch"], s["seq"])
  tokens = s["batch"] * s["seq"]
  analytic = model_flops(cfg, params, tokens, s["seq"], 3)
  for label, method in (("final_only", "final_only"), ("GR", "romebert")):
    t0 = time.perf_counter()
    run = jax_step(model, method, batch, 5e-5)
    compile_s = time.perf_counter() - t0
    t = compare({label: run}, rounds=s["rounds"], calls_per_round=s["calls"], warmup=2)[label].median
    flops = xla_flops(run.compiled)
    xla = (f"mfu {flops / t / peak:.4f} (XLA cost analysis: {flops:.3e} FLOP/step)" if flops
           else "mfu n/a (XLA cost analysis gave no FLOPs)")
    say(f"train_step {label}: {t * 1e3:.2f} ms/step, {s['batch'] / t:.1f} ex/s, batch {s['batch']}, seq {s['seq']}, "
        f"{cfg.dtype}, dropout on; {xla}; mfu_6N {analytic / t / peak:.4f} (6 x encoder params x tokens + "
        f"attention: {analytic:.3e} FLOP/step); peak {peak:.3e} FLOP/s; compile {compile_s:.1f} s")


def bench_early_exit(cfg, params, s: dict) -> None:
  from bench.early_exit import measure, synthetic_tokens
  data = synthetic_tokens(s["ee_examples"], s["ee_seq"], cfg.vocab_size, seed=1)
  r = measure(params, cfg, data, batch=64, latency_examples=s["ee_latency"], exit_layer=s["exit_layer"],
              repeats=2, tol=s["tie_tol"])
  m = r.measured
  common = (f"near-ties {r.near_ties} (entropy within {s['tie_tol']:g} of tau, not compared); "
            f"policy {r.policy.describe()}")
  n = m.examples
  say(f"early_exit b64: speed-up {m.throughput_speedup:.2f} (full {n / m.full_throughput.seconds:.1f} ex/s, "
      f"early exit {n / m.throughput.seconds:.1f} ex/s), layer ratio {r.stats['throughput']['layer_ratio']:.2f}, "
      f"{n} examples, seq {s['ee_seq']}; decisions off the offline ones {r.mismatches['throughput']}; {common}")
  n1 = m.latency_examples
  say(f"early_exit b1: speed-up {m.latency_speedup:.2f} (full {m.full_latency.seconds / n1 * 1e3:.2f} ms/example, "
      f"early exit {m.latency.seconds / n1 * 1e3:.2f} ms/example), layer ratio "
      f"{r.stats['latency']['layer_ratio']:.2f}, {n1} examples; decisions off the offline ones "
      f"{r.mismatches['latency']}")


def bench_serving(dry_run: bool) -> None:
  """bench/serve_load.py on the README default run's export (trained here first when missing: about a
  minute), shortened to fit the run's budget; the dry run only checks that the script starts."""
  script = ROOT / "bench" / "serve_load.py"
  if not script.is_file():
    say("serving: not built yet")
    return
  if dry_run:
    done = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120)
    say(f"serving (serve_load.py --help, rc {done.returncode}): the load test needs a trained export; "
        "skipped in a dry run")
    return
  export = ROOT / "runs" / "default" / "export"
  try:
    if not (export / "rome_flax_config.json").is_file():
      subprocess.run([sys.executable, str(ROOT / "train.py"), "--no_progress"], capture_output=True, text=True,
                     timeout=150, cwd=ROOT)
    cmd = [sys.executable, str(script), "--checkpoint", str(export), "--requests", "200",
           "--saturation_requests", "400", "--time_limit", "20"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, cwd=ROOT)
    lines = (done.stdout.strip() or done.stderr.strip() or "(no output)").splitlines()
    say(f"serving (serve_load.py, rc {done.returncode}): {lines[-1]}")
  except subprocess.TimeoutExpired:
    say("serving (serve_load.py): timed out")


def main() -> None:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--dry-run", dest="dry_run", action="store_true",
                  help="the same code on the CPU at tiny shapes (2 layers, hidden 64)")
  args = ap.parse_args()
  start = time.perf_counter()
  s = DRY if args.dry_run else FULL
  peak = float(os.environ.get("GPU_PEAK_FLOPS", DEFAULT_PEAK))

  import jax
  from rome_flax.model import encoder as model_lib
  from rome_flax.model.config import ModelConfig
  from rome_flax.runtime import retain_host_memory
  retain_host_memory()
  cfg = ModelConfig(hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
                    intermediate_size=s["ffn"], num_labels=2, dtype="bfloat16")
  params = model_lib.init_params(cfg, jax.random.PRNGKey(0))
  say(f"device: {device_name()}, {jax.device_count()} device(s), jax {jax.__version__}; "
      f"{'DRY RUN (CPU, tiny shapes); ' if args.dry_run else ''}model {cfg.num_layers} layers, hidden "
      f"{cfg.hidden_size}, {cfg.num_attention_heads} heads, FFN {cfg.intermediate_size}, {cfg.dtype}, random init; "
      f"peak {peak:.3e} FLOP/s (GPU_PEAK_FLOPS)")
  failed = 0
  for name, run in (("forward", lambda: bench_forward(cfg, params, s, peak)),
                    ("train_step", lambda: bench_train(cfg, params, s, peak)),
                    ("early_exit", lambda: bench_early_exit(cfg, params, s)),
                    ("serving", lambda: bench_serving(args.dry_run))):
    try:   # a device's lease is minutes: one failing part (another JAX version, a missing package) must not
      run()   # cost the lines of the others
    except Exception as e:
      failed += 1
      say(f"{name}: failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
  say(f"total: {time.perf_counter() - start:.0f} s")
  if failed:
    raise SystemExit(1)


if __name__ == "__main__":
  main()
