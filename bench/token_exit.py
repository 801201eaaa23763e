"""Token-level early exit (TOKEE): measured wall-clock speed-up against the full model, beside its FLOPs ratio.

No training: the converted all-MiniLM-L6-v2 checkpoint (6 layers) with token exits over CoNLL-2003's
9 tags and a known halting pattern. Exits other than --exit_layer get a zero classifier (uniform
softmax: normalised entropy 1, never confident); exit --exit_layer reads the hidden state along
random directions, and tau (the same at every layer) is set in the widest gap between its window-max
uncertainties near their --quantile on the benchmark sentences (`exit_policy.threshold_in_gap`): that
share of the words (0.8 by default) halts at that layer (layer 2 by default), the rest run all 6: a
FLOPs ratio near 2 (issue 23). Both paths' word exits must equal the plain
loop's wherever a word's window-max uncertainty is more than --tie_tol from tau (near-ties are counted
and printed, never compared).

Measures (a) TOKEE at batch 64 (the throughput path: active pieces of the whole batch gathered into
fixed-size buffers) and (b) at batch 1 (the latency path), each against the full model on the same
sentences, batch size and machine, through `rome_flax.engine.speed.token_exit_speed` (what infer.py
reports); compile and warm-up excluded, best of --repeats alternating passes. Sentences: the first
CoNLL-2003 dev sentences from ../shared/conll2003 (else synthetic word lists), MiniLM's tokenizer.
Next to last line: `TOKEE speed-up: batch 64 = X batch 1 = Y` (targets X >= 1.6, Y >= 1.3); last line:
`of FLOPs ratio: throughput = X.XX latency = Y.YY` (measured speed-up / FLOPs ratio; targets X >= 0.8,
Y >= 0.6).

  python bench/token_exit.py [--examples 512] [--latency_examples 96] [--window 3] [--exit_layer 2] [--quantile 0.8]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from bench._common import add_malloc_option, apply_malloc_option, cpu_model, minilm_dir

CONLL_TAGS = ("O", "B-LOC", "I-LOC", "B-MISC", "I-MISC", "B-ORG", "I-ORG", "B-PER", "I-PER")


def known_halting_params(params, cfg, exit_to_use: int, scale: float, seed: int = 0):
  """Zero classifiers everywhere but `exit_to_use` (random directions x scale) and the final head."""
  exits = jax.tree.map(lambda x: x, params["exits"])
  kernel = np.array(exits["classifier"]["kernel"])
  bias = np.array(exits["classifier"]["bias"])
  kernel[:-1] = 0.0
  bias[:-1] = 0.0
  directions = np.random.default_rng(seed).standard_normal((cfg.num_labels, cfg.hidden_size)).astype(np.float32)
  kernel[exit_to_use] = scale * directions / np.linalg.norm(directions, axis=1, keepdims=True)
  exits["classifier"] = {"kernel": jnp.asarray(kernel), "bias": jnp.asarray(bias)}
  return {**params, "exits": exits}


def sentences(n: int, seed: int = 0) -> list[list[str]]:
  dev = Path(__file__).resolve().parents[2] / "shared" / "conll2003" / "dev.txt"
  if dev.is_file():
    from rome_flax.kinds import token_data
    return token_data.read_conll(dev, "dev").words[:n]
  rng = np.random.default_rng(seed)
  vocab = "the market said on Tuesday that shares in London rose by percent after a report".split()
  return [[str(w) for w in rng.choice(vocab, rng.integers(5, 30))] for _ in range(n)]


def mismatched_words(got_NxW, want_NxW, near_NxW) -> int:
  """Words whose exits differ between two runs (widths may differ: extra slots hold -1), near-ties left out."""
  W = max(got_NxW.shape[1], want_NxW.shape[1], near_NxW.shape[1])
  pad = lambda a, v: np.pad(a, ((0, 0), (0, W - a.shape[1])), constant_values=v)
  return int(((pad(got_NxW, -1) != pad(want_NxW, -1)) & ~pad(near_NxW, False)).sum())


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--examples", type=int, default=512, help="sentences for the batch-64 measurement")
  ap.add_argument("--latency_examples", type=int, default=96, help="sentences for the batch-1 measurement")
  ap.add_argument("--batch", type=int, default=64)
  ap.add_argument("--window", type=int, default=3)
  ap.add_argument("--exit_layer", type=int, default=2, help="the layer (1-based) where the halting words halt")
  ap.add_argument("--quantile", type=float, default=0.8,
                  help="share of words whose window-max uncertainty lies below tau (they halt at --exit_layer)")
  ap.add_argument("--scale", type=float, default=8.0, help="logit scale of that exit's classifier")
  ap.add_argument("--repeats", type=int, default=3)
  ap.add_argument("--tie_tol", type=float, default=None,
                  help="word exits whose window-max uncertainty lies this close to tau are not compared "
                       "(default: exit_policy.TIE_TOLERANCE)")
  add_malloc_option(ap)
  args = ap.parse_args()
  apply_malloc_option(args)

  from rome_flax.engine import exit_policy as ep
  from rome_flax.engine import inference
  from rome_flax.engine import token_exit as te
  from rome_flax.engine.speed import token_exit_speed
  from rome_flax.kinds import data
  from rome_flax.model import encoder as model_lib
  from rome_flax.model import pretrained
  import rome_flax

  ckpt = minilm_dir()
  model = rome_flax.MultiExitBert.from_pretrained(ckpt, num_labels=len(CONLL_TAGS), head="token",
                                                  label_names=CONLL_TAGS, load_tokenizer_files=False)
  cfg = model.config
  L = cfg.num_layers
  words = sentences(args.examples)
  encoded = data.encode_token_split(pretrained.load_tokenizer(Path(ckpt)), words, None, max_length=256)
  params = model_lib.unstack_layers(known_halting_params(model.params, cfg, args.exit_layer - 1, args.scale))

  # tau: in the widest gap between the chosen exit's window-max uncertainties near their median, so no
  # word sits within rounding of it (paths that sum in different orders would split on it).
  z = inference.run_all_exits(params, cfg, encoded, args.batch)[args.exit_layer - 1]   # [N, W, C]
  mask = jnp.asarray(encoded.word_mask)
  u_NxW = np.asarray(te.window_max(te.word_uncertainty(jnp.asarray(z)), mask, args.window))
  tau = ep.threshold_in_gap(u_NxW[encoded.word_mask], quantile=args.quantile)
  # One tau at every layer: the default schedule doubles tau above layer L/2, and a tau above 0.5 would
  # then halt every word there (normalised entropy <= 1), not the known pattern.
  policy = te.make_token_policy(np.full(L, tau), args.window, L)

  measured = token_exit_speed(params, cfg, policy, encoded, args.batch, latency_examples=args.latency_examples,
                              repeats=args.repeats)
  thr, lat = measured.throughput.run, measured.latency.run
  n_lat = measured.latency_examples
  lengths = encoded.lengths
  flops = {"throughput": te.flops_ratio(cfg, thr.queries, thr.keys, lengths),
           "latency": te.flops_ratio(cfg, lat.queries, lat.keys, lengths[:n_lat])}
  # Words decide at --exit_layer only (other exits: u = 1, never below tau): compare the paths' word exits
  # wherever the word's window-max uncertainty there is more than --tie_tol from tau.
  near_NxW = ep.near_ties(u_NxW, tau, ep.TIE_TOLERANCE if args.tie_tol is None else args.tie_tol) & encoded.word_mask
  plain = te.token_pass(params, cfg, policy, encoded.head(n_lat), 8, gather=False).run()
  off = {"latency": mismatched_words(lat.word_exits, plain.word_exits, near_NxW[:n_lat]),
         "batch-64": mismatched_words(thr.word_exits[:n_lat], plain.word_exits, near_NxW[:n_lat])}

  cpu = f"Model name: {cpu_model()}"
  print(f"model: all-MiniLM-L6-v2 ({L} layers, hidden {cfg.hidden_size}), token exits over {cfg.num_labels} tags, "
        f"float32, {len(words)} sentences (mean {lengths.mean():.1f} pieces), device {jax.devices()[0].device_kind}; "
        f"{cpu}")
  print(f"policy: {policy.describe()} (widest gap near the {args.quantile:g} quantile of exit {args.exit_layer}'s "
        f"window-max uncertainties); "
        f"other exits never confident")
  print(f"word exits equal the plain loop's: latency {off['latency'] == 0}, batch-{args.batch} "
        f"{off['batch-64'] == 0}; near-ties (window-max uncertainty within the tolerance of tau, not compared): "
        f"{int(near_NxW[:n_lat].sum())} of {int(encoded.word_mask[:n_lat].sum())} words")
  assert off["latency"] == 0, "latency path disagrees"
  assert off["batch-64"] == 0, f"batch-{args.batch} disagrees"
  for name, run in (("throughput", thr), ("latency", lat)):
    words_mask = run.word_exits >= 0
    shares = np.bincount(run.word_exits[words_mask], minlength=L) / words_mask.sum()
    print(f"{name}: words halting per layer {' '.join(f'{s:.2f}' for s in shares)}; "
          f"active pieces per layer {' '.join(str(int(q)) for q in run.queries.sum(0))}")
  for name, full, early, speedup in (
      (f"throughput b{args.batch}", measured.full_throughput, measured.throughput, measured.throughput_speedup),
      ("latency b1", measured.full_latency, measured.latency, measured.latency_speedup)):
    print(f"{name:16s} full {1e3 * full.seconds:8.1f} ms  TOKEE {1e3 * early.seconds:8.1f} ms  "
          f"speed-up {speedup:.2f}  (warm-up {early.warmup_seconds:.1f} s)")
  print(f"FLOPs ratio: throughput {flops['throughput']:.2f} latency {flops['latency']:.2f}")
  print(f"TOKEE speed-up: batch {args.batch} = {measured.throughput_speedup:.2f} batch 1 = "
        f"{measured.latency_speedup:.2f}")
  print(f"of FLOPs ratio: throughput = {measured.throughput_speedup / flops['throughput']:.2f} "
        f"latency = {measured.latency_speedup / flops['latency']:.2f}")


if __name__ == "__main__":
  main()
