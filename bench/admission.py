"""The throughput path with admission (the open engine refilling slots) against closed chunks.

Issue 19 asks that the host-driven engine (`inference.AdmissionPass`: admit rows while slots are
free, `engine.run` until a batch of slots is free, collect) be at least as fast as the closed chunk
it generalises (`engine.chunk` over 16-batch chunks). Both run the same policy on the same examples
and must take the same decisions away from near-ties; they are timed in alternating rounds
(`speed.compare`), after their warm-up. The examples have mixed lengths (uniform in [--min_seq,
--seq]), as real text does, and the model is bench/early_exit.py's known exit distribution on
all-MiniLM-L6-v2 (about half the examples exit at layer 2).

Last line: `admission: speed-up over closed chunks = X.XX (slots S) ...` (target >= 1.0).

  python bench/admission.py [--examples 2048] [--batch 64] [--seq 64] [--min_seq 8]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax.numpy as jnp
import numpy as np

from bench._common import add_malloc_option, apply_malloc_option, cpu_model, minilm_dir


def mixed_tokens(n: int, min_seq: int, seq: int, vocab: int, seed: int):
  from rome_flax.kinds.data import EncodedSplit
  rng = np.random.default_rng(seed)
  lengths = rng.integers(min_seq, seq + 1, n)
  ids = rng.integers(1000, min(vocab, 30000), size=(n, seq)).astype(np.int32)
  ids[:, 0] = 101
  mask = (np.arange(seq)[None] < lengths[:, None]).astype(np.int32)
  return EncodedSplit.from_padded(ids * mask, mask)


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--examples", type=int, default=2048)
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--seq", type=int, default=64)
  ap.add_argument("--min_seq", type=int, default=8)
  ap.add_argument("--slots", default="4,16", help="admission slot counts, in batches (comma-separated)")
  ap.add_argument("--rounds", type=int, default=3)
  add_malloc_option(ap)
  args = ap.parse_args()
  apply_malloc_option(args)

  import rome_flax
  from bench.early_exit import known_exit_params
  from rome_flax.engine import early_exit as ee
  from rome_flax.engine import exit_policy as ep
  from rome_flax.engine import inference, speed

  model = rome_flax.MultiExitBert.from_pretrained(minilm_dir(), num_labels=2, load_tokenizer_files=False)
  cfg = model.config
  data = mixed_tokens(args.examples, args.min_seq, args.seq, cfg.vocab_size, seed=1)
  probe = known_exit_params(model.params, cfg, 1, scale=1.0, shift=0.0)
  z = inference.run_all_exits(ee.prepare_params(probe), cfg, data, args.batch)[1]
  gap = z[:, 0] - z[:, 1]
  params = ee.prepare_params(known_exit_params(model.params, cfg, 1, scale=3.0 / max(float(gap.std()), 1e-6),
                                               shift=float(gap.mean())))
  exit_logits = inference.run_all_exits(params, cfg, data, args.batch)
  tau = ep.threshold_in_gap(np.asarray(ep.entropy(jnp.asarray(exit_logits[1]))))
  policy = ep.make_policy("entropy", tau, cfg.num_exits, num_labels=cfg.num_labels)
  want = np.asarray(ep.decide(policy, jnp.asarray(exit_logits)).exit_index_N)
  near = ep.near_tie_examples(policy, exit_logits)

  passes = {"closed chunks (16 batches)": inference.throughput_pass(params, cfg, policy, data, args.batch)}
  for k in (int(v) for v in args.slots.split(",")):
    passes[f"admission ({k} batches of slots)"] = inference.throughput_pass(
        params, cfg, policy, data, args.batch, chunk_size=k * args.batch, admission=True)
  timed = speed.compare(passes, rounds=args.rounds)
  print(f"model: all-MiniLM-L6-v2, {args.examples} examples of {args.min_seq}-{args.seq} tokens, batch {args.batch}, "
        f"policy {policy.describe()}; Model name: {cpu_model()}")
  base = timed["closed chunks (16 batches)"].fastest
  best = None
  for name, t in timed.items():
    run = passes[name].collect(t.result)
    wrong = int(((run.exit_index_N != want) & ~near).sum())
    assert wrong == 0, f"{name}: {wrong} decisions differ from the offline ones"
    print(f"{name:34s} {t.fastest:.3f} s (median {t.median:.3f}), {run.layer_runs} layer batches, "
          f"mean exit layer {run.exit_index_N.mean() + 1:.2f}, decisions = offline: True "
          f"({int(near.sum())} near-ties not compared); speed-up over closed chunks {base / t.fastest:.2f}")
    if name.startswith("admission") and (best is None or t.fastest < best[1]):
      best = (name, t.fastest, run.layer_runs)
  print(f"admission: speed-up over closed chunks = {base / best[1]:.2f} ({best[0]}, {best[2]} layer batches)")


if __name__ == "__main__":
  main()
