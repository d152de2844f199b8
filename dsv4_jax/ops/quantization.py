"""Quantisation-aware simulation of the released model (fake quantisation, straight-through gradients).

Block-wise with power-of-two scales, as DeepSeek's inference kernels do it:
  scale = 2^ceil(log2(max(amax, floor) / qmax)),  y = cast(clip(x / scale, ±qmax)) · scale
FP8 e4m3 (qmax 448, floor 1e-4) on window/compressed KV non-RoPE dims in blocks of 64;
FP4 e2m1 (qmax 6, floor 6·2⁻¹²⁶) on the indexer's q and k in blocks of 32, after a Hadamard rotation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def _pow2_ceil(x: jax.Array) -> jax.Array:
  """2^ceil(log2(x)) exactly, for x > 0 (fp32)."""
  mantissa, exponent = jnp.frexp(x)  # x = mantissa · 2^exponent, mantissa in [0.5, 1)
  exponent = jnp.where(mantissa == 0.5, exponent - 1, exponent)
  return jnp.ldexp(jnp.ones_like(x), exponent)


def _fake_quant(x: jax.Array, block: int, qmax: float, amax_floor: float, dtype) -> jax.Array:
  shape = x.shape
  if shape[-1] % block:
    raise ValueError(f"fake quantisation: last dim {shape[-1]} is not a multiple of the block size {block}")
  xb = x.astype(jnp.float32).reshape(shape[:-1] + (shape[-1] // block, block))
  amax = jnp.maximum(jnp.max(jnp.abs(xb), axis=-1, keepdims=True), amax_floor)
  scale = _pow2_ceil(amax / qmax)
  q = jnp.clip(xb / scale, -qmax, qmax).astype(dtype).astype(jnp.float32) * scale
  q = q.reshape(shape).astype(x.dtype)
  # Straight-through estimator. Not `x + stop_gradient(q − x)`: with tiny blocks the difference is
  # subnormal and flushed to zero, and in bf16 it can round, so the forward value would not be q.
  return jax.lax.stop_gradient(q) + (x - jax.lax.stop_gradient(x))


def fake_quant_fp8(x: jax.Array, block: int = 64) -> jax.Array:
  """FP8 e4m3 quantise-dequantise along the last axis in blocks of `block` (power-of-two scales)."""
  return _fake_quant(x, block, 448.0, 1e-4, jnp.float8_e4m3fn)


def fake_quant_fp4(x: jax.Array, block: int = 32) -> jax.Array:
  """FP4 e2m1 quantise-dequantise along the last axis in blocks of `block` (power-of-two scales)."""
  return _fake_quant(x, block, 6.0, 6.0 * 2.0 ** -126, jnp.float4_e2m1fn)


def hadamard_rotate(x: jax.Array) -> jax.Array:
  """x Hᵀ / sqrt(n) with H the Sylvester Hadamard matrix of order n = x.shape[-1] (a power of two)."""
  n = x.shape[-1]
  if n & (n - 1):
    raise ValueError(f"hadamard_rotate: last dim must be a power of two, got {n}")
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return jnp.einsum("...i,ji->...j", x.astype(jnp.float32), jnp.asarray(h * n ** -0.5)).astype(x.dtype)
