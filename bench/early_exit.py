"""Measured wall-clock speed-up of early exit vs the full model, beside the layer ratio.

No training: the converted all-MiniLM-L6-v2 checkpoint (6 layers) with a known exit distribution.
Exits 1, 3, 4, 5 get a zero classifier (uniform softmax: never confident), exit 2 a classifier
along a random direction, and the entropy threshold is set in the widest gap between exit 2's
entropies near their median on the benchmark data (`exit_policy.threshold_in_gap`): about half of the
examples exit at layer 2, the rest run all 6 layers. Both paths' decisions must equal the offline ones
wherever an example's entropy is more than --tie_tol from tau (the near-ties are counted and printed,
never compared: paths that sum in different orders may split on them).

Two data rows: the first 512 SST-2 dev sentences (real text, 4-55 pieces: most batches in the 16- and 32-
piece buckets, where batch 1's fixed per-layer costs weigh most; from --glue_dir, skipped with a note
when absent) and synthetic tokens at --seq 64. Each measures (a) the throughput path at batch 64 and
(b) the latency path at batch 1, each against the full model (all layers, final exit only) on the same
examples, batch size and machine, through `rome_flax.engine.speed.early_exit_speed`, the measurement infer.py
reports. Compile and warm-up are excluded and printed apart; each timing is the best of --repeats
passes, the two sides alternating. A table has both rows; the last line is the real-text row's
`of layer ratio: throughput = X.XX latency = Y.YY` (measured speed-up / layer ratio; targets X >= 0.9,
Y >= 0.8).

  python bench/early_exit.py [--examples 512] [--latency_examples 96] [--seq 64] [--glue_dir ../shared/glue]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NamedTuple

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from bench._common import add_malloc_option, apply_malloc_option, cpu_model, minilm_dir


def known_exit_params(params, cfg, exit_to_use: int, scale: float, shift: float, seed: int = 0):
  """Zero classifiers everywhere but `exit_to_use` and the final head.

  Exit `exit_to_use` reads the pooled output along a random direction: its logit gap is
  scale * (gap at scale 1 - shift), so a shift at the data's mean gap centres it.
  """
  exits = jax.tree.map(lambda x: x, params["exits"])
  kernel = np.array(exits["classifier"]["kernel"])
  bias = np.array(exits["classifier"]["bias"])
  direction = np.random.default_rng(seed).standard_normal(cfg.hidden_size).astype(np.float32)
  direction /= np.linalg.norm(direction)
  for e in range(cfg.num_exits - 1):
    kernel[e] = 0.0
    bias[e] = 0.0
  kernel[exit_to_use, 0] = scale * direction     # kernels are [out, in] (model.Linear)
  kernel[exit_to_use, 1] = -scale * direction
  bias[exit_to_use] = [-scale * shift / 2, scale * shift / 2]
  exits["classifier"] = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}
  return {**params, "exits": exits}


def sst2_tokens(tokenizer, data_dir: Path, n: int, max_length: int = 128):
  """The first n SST-2 dev sentences, tokenised by the model's tokenizer (real lengths: 4-55 pieces,
  most in the 16- and 32-piece buckets): where batch 1's fixed per-layer costs weigh most."""
  from rome_flax.kinds import data, tasks
  split = data.load_split(tasks.get_task("sst-2"), "dev", data_dir=str(data_dir))
  keep = np.arange(min(n, len(split.texts_a)))
  split = data.Split(split.task, split.split, [split.texts_a[i] for i in keep], None, split.labels[keep], keep)
  return data.encode_split(tokenizer, split, max_length=max_length)


def synthetic_tokens(n: int, seq: int, vocab: int, seed: int):
  from rome_flax.kinds.data import EncodedSplit
  rng = np.random.default_rng(seed)
  ids = rng.integers(1000, min(vocab, 30000), size=(n, seq)).astype(np.int32)
  ids[:, 0] = 101  # [CLS]
  return EncodedSplit.from_padded(ids, np.ones_like(ids))


class Result(NamedTuple):
  measured: object            # rome_flax.engine.speed.EarlyExitSpeed
  policy: object
  stats: dict                 # "throughput" / "latency": sweep.exit_statistics of each path's exits
  gap: tuple                  # (mean, std) of the chosen exit's logit gap at scale 1
  near_ties: int              # examples whose score lies within the tolerance of tau (decisions not compared)
  mismatches: dict            # "throughput" / "latency": decisions off the offline ones, away from tau


def measure(params, cfg, data, *, batch: int = 64, latency_examples: int = 96, exit_layer: int = 2,
            dispatch: str = "switch", repeats: int = 3, tol: float | None = None) -> Result:
  """The known exit distribution on `params` (any model: MiniLM here, a random BERT-base in bench/gpu.py),
  tau in a gap of exit `exit_layer`'s entropies near their median, both paths against the full model,
  and their decisions against the offline ones wherever the score is more than `tol` from tau."""
  from rome_flax.engine import early_exit as ee
  from rome_flax.engine import exit_policy as ep
  from rome_flax.engine import inference
  from rome_flax.engine.speed import early_exit_speed
  from rome_flax.engine.sweep import exit_statistics

  tol = ep.TIE_TOLERANCE if tol is None else tol
  L = cfg.num_layers
  # Centre and scale the chosen exit's logit gaps to a spread of about 3: entropies from ~0 to log 2.
  p = known_exit_params(params, cfg, exit_layer - 1, scale=1.0, shift=0.0)
  z = inference.run_all_exits(ee.prepare_params(p, dispatch), cfg, data, batch)[exit_layer - 1]
  gap = z[:, 0] - z[:, 1]
  params = known_exit_params(params, cfg, exit_layer - 1, scale=3.0 / max(float(gap.std()), 1e-6),
                             shift=float(gap.mean()))
  prepared = ee.prepare_params(params, dispatch)
  # The baseline is always the fastest full model: unstacked layers, static indices (stacked weights
  # sliced per call cost a weight copy per layer, which at batch 1 doubles the full model's time).
  baseline = ee.prepare_params(params, "switch")

  # tau from the data: in the widest gap between the chosen exit's entropies near their median, so no
  # example sits within rounding of it (paths that sum in different orders would split on it).
  exit_logits = inference.run_all_exits(prepared, cfg, data, batch)
  h_ExN = np.asarray(ep.entropy(jnp.asarray(exit_logits)))
  tau = ep.threshold_in_gap(h_ExN[exit_layer - 1])
  policy = ep.make_policy("entropy", tau, L, num_labels=cfg.num_labels)

  measured = early_exit_speed(prepared, cfg, policy, data, batch, latency_examples=latency_examples,
                              repeats=repeats, baseline=baseline)
  thr, lat = measured.throughput, measured.latency
  stats = {name: exit_statistics(cfg, m.run.exit_index_N, data.lengths[:len(m.run.exit_index_N)])
           for name, m in (("throughput", thr), ("latency", lat))}
  want = np.asarray(ep.decide(policy, jnp.asarray(exit_logits)).exit_index_N)
  near_N = ep.near_tie_examples(policy, exit_logits, tol=tol)   # an exit's entropy within tol of tau
  n_lat = measured.latency_examples
  mismatches = {"throughput": int(((thr.run.exit_index_N != want) & ~near_N).sum()),
                "latency": int(((lat.run.exit_index_N != want[:n_lat]) & ~near_N[:n_lat]).sum())}
  return Result(measured, policy, stats, (float(gap.mean()), float(gap.std())), int(near_N.sum()), mismatches)


def report(name: str, args, r: Result, L: int) -> tuple[float, float]:
  """Prints one data row's measurement; returns (throughput, latency) speed-up over layer ratio."""
  measured, stats = r.measured, r.stats
  full_b, thr = measured.full_throughput, measured.throughput
  full_1, lat = measured.full_latency, measured.latency
  print(f"\n== {name}")
  print(f"exit {args.exit_layer} logit gap at scale 1: mean {r.gap[0]:.4g} std {r.gap[1]:.4g}")
  print(f"policy: {r.policy.describe()} (widest gap near the median entropy of exit {args.exit_layer}); exits "
        f"1..{L - 1} other than {args.exit_layer} never confident")
  print(f"decisions equal the offline ones: throughput {r.mismatches['throughput'] == 0}, latency "
        f"{r.mismatches['latency'] == 0}; near-ties (entropy within the tolerance of tau, not compared): "
        f"{r.near_ties}")
  assert r.mismatches["throughput"] == 0, "throughput path disagrees with the offline decisions"
  assert r.mismatches["latency"] == 0, "latency path disagrees with the offline decisions"
  for path, m in (("throughput", thr), ("latency", lat)):
    st = stats[path]
    print(f"{path} set ({len(m.run.exit_index_N)} examples): exit layer shares "
          + " ".join(f"{k + 1}:{s:.2f}" for k, s in enumerate(st["exit_shares"]))
          + f"; average exit layer {st['avg_exit_layer']:.2f}, layer ratio {st['layer_ratio']:.2f}, "
          f"FLOPs ratio {st['flops_ratio']:.2f}")
  thr_speed, lat_speed = measured.throughput_speedup, measured.latency_speedup
  n_b = len(thr.run.exit_index_N)
  print(f"(a) throughput, batch {args.batch}: full model {full_b.seconds:.3f} s ({n_b / full_b.seconds:.1f} ex/s, "
        f"{full_b.run.layer_runs} layer batches), early exit {thr.seconds:.3f} s ({n_b / thr.seconds:.1f} ex/s, "
        f"{thr.run.layer_runs} layer batches); speed-up {thr_speed:.2f}; compile+warm-up excluded: full "
        f"{full_b.warmup_seconds:.2f} s, early exit {thr.warmup_seconds:.2f} s")
  n_1 = measured.latency_examples
  print(f"(b) latency, batch 1: full model {full_1.seconds / n_1 * 1e3:.2f} ms/example, early exit "
        f"{lat.seconds / n_1 * 1e3:.2f} ms/example; speed-up {lat_speed:.2f}; compile+warm-up excluded: full "
        f"{full_1.warmup_seconds:.2f} s, early exit {lat.warmup_seconds:.2f} s")
  return thr_speed / stats["throughput"]["layer_ratio"], lat_speed / stats["latency"]["layer_ratio"]


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--examples", type=int, default=512, help="examples for the throughput measurement")
  ap.add_argument("--latency_examples", type=int, default=96, help="examples for the batch-1 measurement")
  ap.add_argument("--seq", type=int, default=64, help="the synthetic row's length")
  ap.add_argument("--glue_dir", default=str(Path(__file__).resolve().parents[2] / "shared" / "glue"),
                  help="GLUE data (SST-2/dev.tsv: the real-text row; skipped with a note when absent)")
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--exit_layer", type=int, default=2, help="the layer (1-based) where about half exit")
  ap.add_argument("--dispatch", default="switch", choices=("switch", "slice"))
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--tie_tol", type=float, default=None,
                  help="decisions whose entropy lies this close to tau are not compared (default: "
                       "exit_policy.TIE_TOLERANCE)")
  add_malloc_option(ap)
  args = ap.parse_args()
  apply_malloc_option(args)

  import rome_flax

  model = rome_flax.MultiExitBert.from_pretrained(minilm_dir(), num_labels=2)
  cfg = model.config
  L = cfg.num_layers
  print(f"model: all-MiniLM-L6-v2 ({L} layers, hidden {cfg.hidden_size}), float32, device "
        f"{jax.devices()[0].device_kind}, dispatch {args.dispatch}; Model name: {cpu_model()}")
  rows = []
  sst2 = Path(args.glue_dir) / "SST-2"
  if (sst2 / "dev.tsv").is_file():
    rows.append(("SST-2 dev (real text)", sst2_tokens(model.tokenizer, sst2, args.examples)))
  else:
    print(f"note: {sst2 / 'dev.tsv'} not found: the real-text row is skipped")
  rows.append((f"synthetic tokens, seq {args.seq}", synthetic_tokens(args.examples, args.seq, cfg.vocab_size, seed=1)))
  ratios = {}
  for name, data in rows:
    r = measure(model.params, cfg, data, batch=args.batch, latency_examples=args.latency_examples,
                exit_layer=args.exit_layer, dispatch=args.dispatch, repeats=args.repeats, tol=args.tie_tol)
    ratios[name] = report(name, args, r, L)
  print("\n| data | throughput speed-up / layer ratio | latency speed-up / layer ratio |\n|---|---|---|")
  for name, (t, l) in ratios.items():
    print(f"| {name} | {t:.2f} | {l:.2f} |")
  t, l = ratios[rows[0][0]]
  print(f"of layer ratio: throughput = {t:.2f} latency = {l:.2f}")


if __name__ == "__main__":
  main()
