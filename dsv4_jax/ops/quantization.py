"""The released model's low-precision activation formats: quantisation-aware simulation (fake quantisation
with straight-through gradients) and the block quantiser the KV cache stores with.

Block-wise with power-of-two scales, as DeepSeek's inference kernels do it:
  scale = 2^ceil(log2(max(amax, floor) / qmax)),  q = cast(clip(x / scale, ±qmax)),  y = q · scale
  KV      FP8 e4m3 (qmax 448, floor 1e-4) on the non-RoPE dims of window / compressed KV rows, in
          blocks of KV_FP8_BLOCK = 64 values; the RoPE dims stay unquantised (BF16 in the cache);
  indexer FP4 e2m1 (qmax 6, floor 6·2⁻¹²⁶) on the lightning indexer's q and k, in blocks of
          INDEX_FP4_BLOCK = 32 values, after a Hadamard rotation.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.config import ConfigError

KV_FP8_BLOCK = 64
INDEX_FP4_BLOCK = 32
FP8_MAX, FP8_FLOOR = 448.0, 1e-4
FP4_MAX, FP4_FLOOR = 6.0, 6.0 * 2.0 ** -126
QAT_FORMATS = ("kv", "index")  # what a `qat_quantise` call simulates (see its docstring)


def _pow2_ceil(x: jax.Array) -> jax.Array:
  """2^ceil(log2(x)) exactly, for x > 0 (fp32)."""
  mantissa, exponent = jnp.frexp(x)  # x = mantissa · 2^exponent, mantissa in [0.5, 1)
  exponent = jnp.where(mantissa == 0.5, exponent - 1, exponent)
  return jnp.ldexp(jnp.ones_like(x), exponent)


def quantise_blocks(x: jax.Array, block: int, qmax: float, amax_floor: float, dtype):
  """x [..., n·block] -> (values [..., n, block] in `dtype`, scales [..., n, 1] fp32, powers of two)."""
  if x.shape[-1] % block:
    raise ValueError(f"block quantisation: last dim {x.shape[-1]} is not a multiple of the block size {block}")
  xb = x.astype(jnp.float32).reshape(x.shape[:-1] + (x.shape[-1] // block, block))
  scale = _pow2_ceil(jnp.maximum(jnp.max(jnp.abs(xb), axis=-1, keepdims=True), amax_floor) / qmax)
  return jnp.clip(xb / scale, -qmax, qmax).astype(dtype), scale


def _fake_quant(x: jax.Array, block: int, qmax: float, amax_floor: float, dtype) -> jax.Array:
  values, scale = quantise_blocks(x, block, qmax, amax_floor, dtype)
  q = (values.astype(jnp.float32) * scale).reshape(x.shape).astype(x.dtype)
  # Straight-through estimator. Not `x + stop_gradient(q − x)`: with tiny blocks the difference is
  # subnormal and flushed to zero, and in bf16 it can round, so the forward value would not be q.
  return jax.lax.stop_gradient(q) + (x - jax.lax.stop_gradient(x))


def fake_quant_fp8(x: jax.Array, block: int = KV_FP8_BLOCK) -> jax.Array:
  """FP8 e4m3 quantise-dequantise along the last axis in blocks of `block` (power-of-two scales)."""
  return _fake_quant(x, block, FP8_MAX, FP8_FLOOR, jnp.float8_e4m3fn)


def fake_quant_fp4(x: jax.Array, block: int = INDEX_FP4_BLOCK) -> jax.Array:
  """FP4 e2m1 quantise-dequantise along the last axis in blocks of `block` (power-of-two scales)."""
  return _fake_quant(x, block, FP4_MAX, FP4_FLOOR, jnp.float4_e2m1fn)


def hadamard_rotate(x: jax.Array) -> jax.Array:
  """x Hᵀ / sqrt(n) with H the Sylvester Hadamard matrix of order n = x.shape[-1] (a power of two)."""
  n = x.shape[-1]
  if n & (n - 1):
    raise ValueError(f"hadamard_rotate: last dim must be a power of two, got {n}")
  h = np.ones((1, 1), np.float32)
  while h.shape[0] < n:
    h = np.block([[h, h], [h, -h]])
  return jnp.einsum("...i,ji->...j", x.astype(jnp.float32), jnp.asarray(h * n ** -0.5)).astype(x.dtype)


def qat_quantise(x: jax.Array, fmt: str, rope_dim: int = 0) -> jax.Array:
  """The released model's activation quantisation, simulated.

  fmt "kv": FP8 on x[..., :−rope_dim] (window / compressed KV rows), the last rope_dim dims unchanged;
  fmt "index": Hadamard rotation, then FP4 on every dim (the indexer's queries and keys).
  """
  if fmt == "kv":
    return jnp.concatenate([fake_quant_fp8(x[..., :x.shape[-1] - rope_dim]), x[..., x.shape[-1] - rope_dim:]],
                           axis=-1)
  if fmt == "index":
    return fake_quant_fp4(hadamard_rotate(x))
  raise ValueError(f"qat_quantise: fmt must be one of {QAT_FORMATS}, got {fmt!r}")


def check_qat_dims(head_dim: int, rope_dim: int, index_head_dim: int) -> None:
  """Raises ConfigError unless the QAT formats fit these widths (FP8 blocks, Hadamard + FP4 blocks)."""
  nope = head_dim - rope_dim
  if nope % KV_FP8_BLOCK:
    raise ConfigError(f"qat: head_dim − qk_rope_head_dim ({nope}) must be a multiple of {KV_FP8_BLOCK} "
                     "(the FP8 KV blocks)")
  if index_head_dim % INDEX_FP4_BLOCK or index_head_dim & (index_head_dim - 1):
    raise ConfigError(f"qat: index_head_dim must be a power of two ≥ {INDEX_FP4_BLOCK} (Hadamard, FP4 blocks), "
                     f"got {index_head_dim}")
