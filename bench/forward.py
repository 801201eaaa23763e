"""Sequences/second of the Flax multi-exit forward (all exits) vs transformers' PyTorch BertModel.

Same checkpoint (all-MiniLM-L6-v2), batch 32, sequence 128, float32, same process, same CPU threads.
Calls alternate (flax, torch, flax, ...) and the medians are compared, so load that changes
during the run hits both. Last line: `ratio flax/torch = X.XX` (target >= 1.0).

  python bench/forward.py [--batch 32] [--seq 128]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

from bench._common import add_malloc_option, apply_malloc_option, minilm_dir


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--batch", type=int, default=32)
  ap.add_argument("--seq", type=int, default=128)
  ap.add_argument("--rounds", type=int, default=9, help="interleaved timing rounds (median is reported)")
  ap.add_argument("--min_time", type=float, default=10.0, help="keep alternating for at least this many seconds")
  add_malloc_option(ap)
  args = ap.parse_args()
  retained = apply_malloc_option(args)

  import torch
  from transformers import BertModel
  from rome_flax.engine.speed import compare
  from rome_flax.model.encoder import forward
  import rome_flax

  threads = os.cpu_count()
  torch.set_num_threads(threads)
  path = minilm_dir()
  rng = np.random.default_rng(0)
  ids = rng.integers(1000, 30000, size=(args.batch, args.seq)).astype(np.int32)
  mask = np.ones_like(ids)
  mask[: args.batch // 2, args.seq * 3 // 4:] = 0        # some padding, as in real batches
  types = np.zeros_like(ids)

  model = rome_flax.MultiExitBert.from_pretrained(path, num_labels=2, load_tokenizer_files=False)
  fwd = jax.jit(lambda p, i, m, t: forward(p, model.config, i, m, t).exit_logits)
  ids_j, mask_j, types_j = map(jax.device_put, (ids, mask, types))
  tmodel = BertModel.from_pretrained(str(path)).eval()
  tids, tmask, ttypes = (torch.from_numpy(x.astype(np.int64)) for x in (ids, mask, types))
  def torch_fwd():
    with torch.inference_mode():
      tmodel(input_ids=tids, attention_mask=tmask, token_type_ids=ttypes)
  timed = compare({"flax": lambda: fwd(model.params, ids_j, mask_j, types_j).block_until_ready(),
                   "torch": torch_fwd}, rounds=args.rounds, min_time=args.min_time, warmup=2, settle=0.2)
  flax_s, torch_s = timed["flax"].median, timed["torch"].median

  print(f"device: {jax.devices()[0].device_kind}, cpu threads: torch {torch.get_num_threads()}, "
        f"jax {jax.device_count()} device(s); batch {args.batch}, seq {args.seq}, float32; "
        f"host memory retained: {retained}")
  print(f"flax  multi-exit forward (all {model.config.num_exits} exits): {args.batch / flax_s:8.1f} seq/s "
        f"({flax_s * 1e3:.1f} ms/batch)")
  print(f"torch BertModel forward:                   {args.batch / torch_s:8.1f} seq/s ({torch_s * 1e3:.1f} ms/batch)")
  print(f"ratio flax/torch = {torch_s / flax_s:.2f}")


if __name__ == "__main__":
  main()
