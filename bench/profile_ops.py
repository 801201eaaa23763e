"""Per-op times of one BERT encoder layer's forward: JAX (XLA:CPU) vs PyTorch CPU, float32, side by side.

Issue 23 item 4. On an Intel Xeon bench/forward.py printed ratio flax/torch = 0.75, against 1.1-1.9
on AMD machines; this script says which op loses there. Each op of a layer runs alone, in both
frameworks, on the same random inputs: the fused QKV matmul (kernels stored [out, in], y = x @ W.T + b,
as rome_flax), attention scores, masked softmax, context, attention output, intermediate, GELU (erf),
output matmul, residual + LayerNorm (eps 1e-12), then the whole layer composed from them (one jax.jit;
plain torch). Shapes default to all-MiniLM-L6-v2 at batch 32, seq 128. Each JAX op is its own jax.jit;
torch runs under inference_mode. Calls alternate (jax, torch, ...) for --rounds rounds after a warm-up
and the fastest of each is kept. Columns: ms per call, ratio torch/jax (> 1: JAX faster), and the
largest absolute difference between the two outputs (a check that both computed the same thing).

--backward times what a train step does with each op instead: its forward and its backward together,
the gradients of every float input but the mask (weights and activations alike) against a fixed random
cotangent (`jax.vjp` under one jax.jit; torch.autograd.grad), checked the same way. A GR step runs one
forward and two backward passes, so this is where it spends its time.

  python bench/profile_ops.py [--batch 32] [--seq 128] [--rounds 7] [--threads N] [--backward]
  python bench/profile_ops.py --xla_flags=--xla_cpu_use_onednn=true     # XLA_FLAGS set before jax loads

Last line: `profile: layer ratio torch/jax = X.XX` (`profile backward: ...` with --backward), the whole
layer's row (>= 1.0: JAX level or ahead).
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np

from bench._common import add_malloc_option, apply_malloc_option, cpu_model

MASK_VALUE = -1e9   # rome_flax.model.encoder's additive bias for padded keys
LAYER_WEIGHTS = ("w_qkv", "b_qkv", "w_ao", "b_ao", "w_inter", "b_inter", "w_out", "b_out", "ln_g_D", "ln_b_D")


def make_inputs(args) -> dict:
  """float32 numpy arrays, shared by both frameworks (suffixes: N = B*S rows, K = head size)."""
  B, S, D, H, F = args.batch, args.seq, args.hidden, args.heads, args.ffn
  rng = np.random.default_rng(0)
  r = lambda *shape, scale=1.0: (rng.standard_normal(shape) * scale).astype(np.float32)
  mask_BxS = np.ones((B, S), np.float32)
  mask_BxS[: B // 2, S * 3 // 4:] = 0                     # some padding, as bench/forward.py
  x = {"x_NxD": r(B * S, D), "res_NxD": r(B * S, D), "ff_NxF": r(B * S, F), "scores_BxHxSxS": r(B, H, S, S),
       "q_BxHxSxK": r(B, H, S, D // H), "k_BxHxSxK": r(B, H, S, D // H), "v_BxHxSxK": r(B, H, S, D // H),
       "bias_Bx1x1xS": np.where(mask_BxS > 0, 0.0, MASK_VALUE).astype(np.float32)[:, None, None, :],
       "ln_g_D": 1 + r(D, scale=0.1), "ln_b_D": r(D, scale=0.1)}
  x["probs_BxHxSxS"] = np.exp(x["scores_BxHxSxS"]) / np.exp(x["scores_BxHxSxS"]).sum(-1, keepdims=True)
  for name, (o, i) in {"qkv": (3 * D, D), "ao": (D, D), "inter": (F, D), "out": (D, F)}.items():
    x[f"w_{name}"], x[f"b_{name}"] = r(o, i, scale=1 / math.sqrt(i)), r(o, scale=0.02)
  return x


def op_table(x, heads: int) -> list:
  """(op name, input names or arrays, jax body, torch body); same inputs to both."""
  import flax.linen as nn
  import jax
  import jax.numpy as jnp
  import torch
  import torch.nn.functional as tf

  def j_attn(q, k, v, bias):
    probs = jax.nn.softmax(jnp.matmul(q, k.transpose(0, 1, 3, 2)) + bias, axis=-1)
    return jnp.matmul(probs, v)

  def j_ln(y, res, g, b):   # as rome_flax's layers.LayerNorm: flax's, float32
    return nn.LayerNorm(epsilon=1e-12).apply({"params": {"scale": g, "bias": b}}, y + res)

  lin_j = lambda t, w, b: jnp.matmul(t, w.T) + b   # kernels [out, in], as rome_flax's layers.linear
  j_gelu = lambda f: 0.5 * f * (1.0 + jax.lax.erf(f * 0.7071067811865476))   # rome_flax's layers.activation
  t_ln = lambda y, res, g, b: tf.layer_norm(y + res, (y.shape[-1],), g, b, 1e-12)

  def layer(lin, attn, ln, gelu, split, to_heads, from_heads):
    def run(x_BxSxD, bias, w_qkv, b_qkv, w_ao, b_ao, w_in, b_in, w_out, b_out, g, b):
      q, k, v = split(lin(x_BxSxD, w_qkv, b_qkv))
      ctx = from_heads(attn(to_heads(q * (q.shape[-1] // heads) ** -0.5), to_heads(k), to_heads(v), bias))
      h = ln(lin(ctx, w_ao, b_ao), x_BxSxD, g, b)   # (one set of LayerNorm weights serves both norms)
      return ln(lin(gelu(lin(h, w_in, b_in)), w_out, b_out), h, g, b)
    return run

  (B, _, _, S), D = x["bias_Bx1x1xS"].shape, x["x_NxD"].shape[1]
  K = D // heads
  j_heads = lambda t: t.reshape(B, S, heads, K).transpose(0, 2, 1, 3)
  t_heads = lambda t: t.reshape(B, S, heads, K).transpose(1, 2)
  j_layer = layer(lin_j, j_attn, j_ln, j_gelu,
                  lambda t: jnp.split(t, 3, axis=-1), j_heads,
                  lambda t: t.transpose(0, 2, 1, 3).reshape(B, S, D))
  t_layer = layer(tf.linear, lambda q, k, v, bias: torch.softmax(q @ k.transpose(-1, -2) + bias, -1) @ v,
                  t_ln, tf.gelu, lambda t: t.chunk(3, dim=-1), t_heads,
                  lambda t: t.transpose(1, 2).reshape(B, S, D))
  attn_in = ("q_BxHxSxK", "k_BxHxSxK", "v_BxHxSxK", "bias_Bx1x1xS")
  return [
      ("qkv matmul D->3D", ("x_NxD", "w_qkv", "b_qkv"), lin_j, tf.linear),
      ("scores q@k^T", ("q_BxHxSxK", "k_BxHxSxK"), lambda q, k: jnp.matmul(q, k.transpose(0, 1, 3, 2)),
       lambda q, k: q @ k.transpose(-1, -2)),
      ("softmax(+mask)", ("scores_BxHxSxS", "bias_Bx1x1xS"), lambda s, b: jax.nn.softmax(s + b, axis=-1),
       lambda s, b: torch.softmax(s + b, -1)),
      ("context p@v", ("probs_BxHxSxS", "v_BxHxSxK"), jnp.matmul, torch.matmul),
      ("attn out D->D", ("x_NxD", "w_ao", "b_ao"), lin_j, tf.linear),
      ("intermediate D->F", ("x_NxD", "w_inter", "b_inter"), lin_j, tf.linear),
      ("gelu jax.nn.gelu", ("ff_NxF",), lambda f: jax.nn.gelu(f, approximate=False), tf.gelu),
      ("gelu rome_flax form", ("ff_NxF",), j_gelu, tf.gelu),
      ("output F->D", ("ff_NxF", "w_out", "b_out"), lin_j, tf.linear),
      ("residual+layernorm", ("x_NxD", "res_NxD", "ln_g_D", "ln_b_D"), j_ln, t_ln),
      ("attention vs sdpa", attn_in, j_attn,
       lambda q, k, v, bias: tf.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=1.0)),
      ("layer", (x["x_NxD"].reshape(B, S, D), "bias_Bx1x1xS", *LAYER_WEIGHTS), j_layer, t_layer),
  ]


def bind(j_fn, j_args, t_body, t_args):
  """Zero-argument calls of one op: the jitted JAX function (waited for), the torch body (inference_mode)."""
  import torch
  j_args, t_args = list(j_args), list(t_args)
  def t_run():
    with torch.inference_mode():
      return t_body(*t_args)
  return lambda: j_fn(*j_args).block_until_ready(), t_run


def bind_backward(j_body, j_args, t_body, t_args, grad_of: list, seed: int = 1):
  """Zero-argument calls of one op's forward + backward: the gradients of the inputs flagged in
  `grad_of` against one random cotangent, in both frameworks; each call returns them concatenated
  flat (one array to compare)."""
  import jax
  import jax.numpy as jnp
  import torch
  j_args, t_args = list(j_args), list(t_args)
  out_shape = jax.eval_shape(j_body, *j_args).shape
  cotangent = np.random.default_rng(seed).standard_normal(out_shape).astype(np.float32)
  picked = [i for i, g in enumerate(grad_of) if g]

  @jax.jit
  def j_grads(args, ct):
    def of_picked(*free):
      full = list(args)
      for i, a in zip(picked, free):
        full[i] = a
      return j_body(*full)
    _, pullback = jax.vjp(of_picked, *(args[i] for i in picked))
    return jnp.concatenate([g.ravel() for g in pullback(ct)])

  j_ct = jax.device_put(cotangent)
  t_ct = torch.from_numpy(cotangent)
  leaves = [t.clone().requires_grad_(g) for t, g in zip(t_args, grad_of)]

  def t_run():
    grads = torch.autograd.grad(t_body(*leaves), [leaves[i] for i in picked], t_ct)
    return torch.cat([g.reshape(-1) for g in grads]).detach()
  return lambda: j_grads(j_args, j_ct).block_until_ready(), t_run


def fastest_pair(run_jax, run_torch, rounds: int) -> tuple[float, float]:
  """Seconds per call, fastest of `rounds` alternated calls each, after two warm-up calls each."""
  for f in (run_jax, run_torch, run_jax, run_torch):
    f()
  best = [math.inf, math.inf]
  for _ in range(rounds):
    for i, f in enumerate((run_jax, run_torch)):
      t0 = time.perf_counter()
      f()
      best[i] = min(best[i], time.perf_counter() - t0)
  return best[0], best[1]


def main():
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  for name, default in {"batch": 32, "seq": 128, "hidden": 384, "heads": 12, "ffn": 1536, "rounds": 7}.items():
    ap.add_argument(f"--{name}", type=int, default=default)
  ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's own)")
  ap.add_argument("--xla_flags", default=None, help="set as XLA_FLAGS before jax is imported")
  ap.add_argument("--backward", action="store_true",
                  help="time each op's forward + backward (the gradients of its float inputs but the mask)")
  add_malloc_option(ap)
  args = ap.parse_args()
  if args.xla_flags is not None:
    os.environ["XLA_FLAGS"] = args.xla_flags
  retained = apply_malloc_option(args)   # (imports rome_flax, hence jax: XLA_FLAGS is set above)

  import jax
  import torch
  if args.threads:
    torch.set_num_threads(args.threads)
  print(f"cpu: {cpu_model()} ({os.cpu_count()} logical CPUs)")
  print(f"jax {jax.__version__} ({jax.devices()[0].device_kind}), torch {torch.__version__} "
        f"({torch.get_num_threads()} threads); XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}; "
        f"host memory retained: {retained}")
  print(f"batch {args.batch}, seq {args.seq}, hidden {args.hidden}, heads {args.heads}, ffn {args.ffn}, "
        f"float32, {'forward + backward' if args.backward else 'forward'}, fastest of {args.rounds} alternated rounds")
  x = make_inputs(args)
  print(f"{'op':<22}| {'jax ms':>9} | {'torch ms':>9} | {'torch/jax':>9} | max|diff|")
  ratio = math.nan
  for name, inputs, j_body, t_body in op_table(x, args.heads):
    arrays = [x[i] if isinstance(i, str) else i for i in inputs]
    if args.backward:
      grad_of = [not (isinstance(i, str) and i.startswith("bias_")) for i in inputs]   # not the mask
      j_run, t_run = bind_backward(j_body, map(jax.device_put, arrays), t_body, map(torch.from_numpy, arrays),
                                   grad_of)
    else:
      j_run, t_run = bind(jax.jit(j_body), map(jax.device_put, arrays), t_body, map(torch.from_numpy, arrays))
    j_s, t_s = fastest_pair(j_run, t_run, args.rounds)
    diff = float(np.max(np.abs(np.asarray(j_run()) - t_run().numpy())))
    ratio = t_s / j_s
    print(f"{name:<22}| {j_s * 1e3:9.3f} | {t_s * 1e3:9.3f} | {ratio:9.2f} | {diff:.1e}")
  print(f"profile{' backward' if args.backward else ''}: layer ratio torch/jax = {ratio:.2f}")


if __name__ == "__main__":
  main()
