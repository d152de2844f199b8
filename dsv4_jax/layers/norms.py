"""RMSNorm, computed in fp32: y = w · x / sqrt(mean(x²) + eps)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4_jax.layers.linear import ADAMW, param


def rms_norm(x: jax.Array, eps: float, weight: jax.Array | None = None) -> jax.Array:
  """RMS-normalises the last axis in fp32 and returns fp32 (multiplied by `weight` if given)."""
  x = x.astype(jnp.float32)
  y = x * jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
  return y if weight is None else y * weight.astype(jnp.float32)


class RMSNorm(nnx.Module):
  """RMSNorm over the last axis with a learned weight [dim] (logical axis `axis`)."""

  def __init__(self, dim: int, eps: float, axis: str = "embed"):
    self.weight = param(None, (dim,), (axis,), value=1.0, optimizer=ADAMW)
    self.eps = eps

  def __call__(self, x: jax.Array) -> jax.Array:
    return rms_norm(x, self.eps, self.weight[...]).astype(x.dtype)
