"""Per-device memory of the train state (parameters + Adam moments) for BERT-large shapes, replicated
against FSDP-sharded over N devices (`sharding.state_shardings`). Shapes only (`jax.eval_shape`):
nothing is allocated or trained.

  python bench/state_memory.py [--devices 8] [--method romebert]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--devices", type=int, default=8)
  ap.add_argument("--method", default="romebert")
  args = ap.parse_args()
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  import jax

  from rome_flax.io import sharding
  from rome_flax.model import encoder as model_lib
  from rome_flax.model.config import ModelConfig
  from rome_flax.train import train_step as ts

  mesh = sharding.data_mesh()
  print(f"{mesh.size} devices; train state = parameters + Adam moments ({args.method}), float32")
  print("| model | parameters | replicated (GiB/device) | FSDP (GiB/device) | ratio |")
  print("|---|---|---|---|---|")
  for name, cfg in (("BERT-base", ModelConfig()),
                    ("BERT-large", ModelConfig(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16,
                                               intermediate_size=4096)),
                    ("RoBERTa-large", ModelConfig(model_type="roberta", vocab_size=50265, hidden_size=1024,
                                                  num_hidden_layers=24, num_attention_heads=16,
                                                  intermediate_size=4096, max_position_embeddings=514,
                                                  type_vocab_size=1, pad_token_id=1))):
    shapes = model_lib.param_shapes(cfg)
    opt = ts.stage_optimizer(ts.OptimConfig(), shapes, cfg, args.method, 1)
    state = jax.eval_shape(lambda p: ts.init_train_state(p, opt, seed=0), shapes)
    n_params = sum(x.size for x in jax.tree.leaves(shapes))
    full = sharding.bytes_per_device(state, sharding.state_shardings(state, mesh, fsdp=False))
    split = sharding.bytes_per_device(state, sharding.state_shardings(state, mesh, fsdp=True))
    print(f"| {name} | {n_params / 1e6:.0f}M | {full / 2**30:.2f} | {split / 2**30:.2f} | {full / split:.2f} |")


if __name__ == "__main__":
  main()
