"""Flax building blocks shared by the encoder and the exit heads: Linear ([out, in] kernels), dropout
from a keyed counter hash, float32 LayerNorm, activations, initialisers and the compute dtype."""

from __future__ import annotations

import math
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp


def dense_init(cfg):
  return nn.initializers.normal(stddev=cfg.initializer_range)


def kernel_init(cfg):
  """N(0, initializer_range) for an [out, in] kernel, drawn [in, out] and transposed: a seed gives the
  same weights as it did when kernels were stored [in, out], so earlier runs reproduce."""
  normal = dense_init(cfg)
  return lambda key, shape, dtype=jnp.float32: jnp.swapaxes(
      normal(key, (*shape[:-2], shape[-1], shape[-2]), dtype), -1, -2)


def compute_dtype(cfg):
  return jnp.bfloat16 if cfg.dtype == "bfloat16" else jnp.float32


def activation(name: str):
  if name == "gelu":  # exact (erf) GELU, as BERT; this form compiled to faster XLA CPU code than jax.nn.gelu
    return lambda x: 0.5 * x * (1.0 + jax.lax.erf(x * 0.7071067811865476))
  if name in ("gelu_new", "gelu_pytorch_tanh"):
    return lambda x: jax.nn.gelu(x, approximate=True)
  return jax.nn.relu


def _mix32(x):
  """murmur3's 32-bit finaliser: a bijection of uint32 with full avalanche."""
  x = (x ^ (x >> 16)) * jnp.uint32(0x85EBCA6B)
  x = (x ^ (x >> 13)) * jnp.uint32(0xC2B2AE35)
  return x ^ (x >> 16)


def dropout_keep_mask(key, shape, keep_prob: float) -> jax.Array:
  """Bernoulli(keep_prob) mask, a keyed hash of each element's position (counter-based, like Philox).

  Two mixing rounds, each keyed by one word of the 64-bit key, make every key a different
  permutation of the counter. Versus `jax.random.bernoulli` (threefry, 20 rounds, bits kept as
  arrays) it is a handful of integer ops that XLA fuses into the masked op, forward and backward:
  45-60 ms less per MiniLM train step on 2 CPU cores. Keep probability exact to 2^-32.
  """
  words = jax.random.key_data(key) if jnp.issubdtype(key.dtype, jax.dtypes.prng_key) else key
  words = jnp.asarray(words, jnp.uint32).reshape(-1)
  counter = jax.lax.iota(jnp.uint32, math.prod(shape)).reshape(shape)
  bits = _mix32(_mix32(counter ^ words[0]) + words[-1])
  return bits < jnp.uint32(min(round(keep_prob * 2.0 ** 32), 2 ** 32 - 1))


class Dropout(nn.Module):
  """Inverted dropout with `dropout_keep_mask`; the key comes from the 'dropout' rng stream."""
  rate: float

  @nn.compact
  def __call__(self, x, deterministic: bool):
    if deterministic or self.rate == 0.0:
      return x
    keep = 1.0 - self.rate
    mask = dropout_keep_mask(self.make_rng("dropout"), x.shape, keep)
    return jnp.where(mask, x * jnp.asarray(1.0 / keep, x.dtype), jnp.zeros((), x.dtype))


class Linear(nn.Module):
  """y = x @ kernel.T + bias with the kernel stored [out, in], PyTorch's layout, in float32.

  Not nn.Dense's [in, out]: on XLA:CPU the backward of x @ kernel.T (dW = dy^T x, dx = dy @ kernel)
  compiles to faster GEMMs; forward + backward of BERT's intermediate matmul took 9.3 ms instead of
  14.7 ms, and a MiniLM GR train step 536 ms instead of 631 ms (docs/results.md). It also makes
  Hugging Face weights load without transposes.
  """
  features: int
  dtype: jnp.dtype = jnp.float32
  kernel_init: Callable = nn.initializers.lecun_normal(in_axis=-1, out_axis=-2)  # fan-in of [out, in]

  @nn.compact
  def __call__(self, x):
    kernel_OxI = self.param("kernel", self.kernel_init, (self.features, x.shape[-1]), jnp.float32)
    bias_O = self.param("bias", nn.initializers.zeros_init(), (self.features,), jnp.float32)
    return linear(x, kernel_OxI, bias_O, self.dtype)


def linear(x, kernel_OxI, bias_O, dtype):
  """`Linear`'s computation on given (possibly sliced) parameters, in `dtype`."""
  return jnp.matmul(x.astype(dtype), kernel_OxI.astype(dtype).T) + bias_O.astype(dtype)


def swap_kernel_axes(params):
  """Every 'kernel' leaf [..., a, b] -> [..., b, a]: between Flax's [in, out] and our [out, in].
  Works on arrays of any kind and under `jax.eval_shape`."""
  return jax.tree_util.tree_map_with_path(
      lambda path, x: x.swapaxes(-1, -2) if path[-1].key == "kernel" else x, params)


class LayerNorm(nn.Module):
  """LayerNorm computed in float32 whatever the compute dtype, cast back afterwards."""
  eps: float

  @nn.compact
  def __call__(self, x):
    y = nn.LayerNorm(epsilon=self.eps, dtype=jnp.float32, param_dtype=jnp.float32, name="ln")(
        x.astype(jnp.float32))
    return y.astype(x.dtype)
