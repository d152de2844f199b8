"""Rotary position embedding with YaRN, applied to interleaved pairs of the LAST `rope_dim` dims.

Pairs are (2k, 2k+1) of the rotated slice, treated as the complex number x[2k] + i·x[2k+1] and
multiplied by exp(i·pos·f_k). YaRN (compressed layers only) blends the frequencies:
  f_k ← f_k/factor · (1 − smooth_k) + f_k · smooth_k,  smooth = 1 − ramp(low, high),
where [low, high] is the band of dims whose wavelength crosses `original_max_position` between
`beta_fast` and `beta_slow` rotations. No attention-temperature (mscale) factor is applied.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.config import ModelConfig


def rope_frequencies(rope_dim: int, theta: float, yarn_factor: float = 1.0, yarn_original: int = 0,
                     beta_fast: float = 32.0, beta_slow: float = 1.0) -> np.ndarray:
  """Per-pair angular frequencies [rope_dim // 2] in fp32 (YaRN when `yarn_original` > 0)."""
  freqs = 1.0 / (theta ** (np.arange(0, rope_dim, 2, dtype=np.float32) / np.float32(rope_dim)))
  freqs = freqs.astype(np.float32)
  if yarn_original > 0:
    def correction_dim(rotations):
      return rope_dim * math.log(yarn_original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), rope_dim - 1)
    if low == high:
      high += 0.001
    ramp = np.clip((np.arange(rope_dim // 2, dtype=np.float32) - low) / (high - low), 0, 1)
    smooth = (1 - ramp).astype(np.float32)
    freqs = (freqs / np.float32(yarn_factor) * (1 - smooth) + freqs * smooth).astype(np.float32)
  return freqs


def layer_frequencies(cfg: ModelConfig, compressed: bool) -> np.ndarray:
  """The frequencies a layer uses: compressed layers use compress_rope_theta with YaRN, others plain."""
  if compressed:
    return rope_frequencies(cfg.qk_rope_head_dim, cfg.compress_rope_theta, cfg.yarn_factor,
                            cfg.yarn_original_max_position, cfg.yarn_beta_fast, cfg.yarn_beta_slow)
  return rope_frequencies(cfg.qk_rope_head_dim, cfg.rope_theta)


def apply_rope(x: jax.Array, positions: jax.Array, freqs, *, inverse: bool = False) -> jax.Array:
  """Rotates the last 2·len(freqs) dims of x.

  x: [B, S, ..., D] (any number of axes between S and D); positions: [B, S] integer.
  Returns x with the same shape and dtype; `inverse` rotates by −angle (the output de-rotation).
  """
  freqs = np.asarray(freqs, np.float32)
  rope_dim = 2 * freqs.shape[0]
  angles = positions.astype(jnp.float32)[..., None] * jnp.asarray(freqs)  # [B, S, Dr/2]
  angles = angles.reshape(angles.shape[:2] + (1,) * (x.ndim - 3) + angles.shape[2:])
  cos, sin = jnp.cos(angles), jnp.sin(angles)
  if inverse:
    sin = -sin
  rot = x[..., -rope_dim:].astype(jnp.float32)
  re, im = rot[..., 0::2], rot[..., 1::2]
  out = jnp.stack([re * cos - im * sin, re * sin + im * cos], axis=-1).reshape(rot.shape)
  return jnp.concatenate([x[..., :-rope_dim], out.astype(x.dtype)], axis=-1)
