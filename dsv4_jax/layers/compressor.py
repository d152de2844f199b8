"""KV compressor: pools every `ratio` consecutive tokens into one entry by a learned per-channel softmax.

Shapes: x [B, S, d] -> entries [B, S // ratio, c]. With coff = 2 when ratio = 4 (overlap), else 1:
  kv = x Wkvᵀ, score = x Wgateᵀ + ape[t mod ratio]        [B, S, coff·c]   (fp32)
  plain:   entry_i = Σ_{k<r} softmax_k(score[i·r+k]) ⊙ kv[i·r+k]
  overlap: entry_i pools 2r slots, the previous block's tokens through the FIRST c channels and the
           current block's through the LAST c channels, one softmax per channel over all 2r slots.
           Where there is no previous block in the same document (sequence start, or a document's
           first block in a packed row), those slots are padding (kv 0, score −inf).
Then RMSNorm(c) with weight and RoPE on the last rope dims at the position of the block's first token.
Entry i exists once tokens i·r .. i·r+r−1 are all seen (a trailing partial block is not an entry).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4_jax.config import ModelConfig
from dsv4_jax.layers.linear import ADAMW, Linear, param
from dsv4_jax.layers.norms import RMSNorm
from dsv4_jax.layers.rope import apply_rope


def pool_blocks(kv: jax.Array, score: jax.Array, ratio: int, overlap: bool,
                prev_valid: jax.Array | None = None) -> jax.Array:
  """Softmax-pools complete blocks.

  kv, score: [B, S, coff·c] fp32 with `ape` already added to score; only the first (S // ratio)·ratio
  tokens are used. prev_valid: [B, N] bool, whether block i may read block i−1 (overlap only; default
  i > 0). Returns [B, N, c] with N = S // ratio.
  """
  b, s, width = kv.shape
  n = s // ratio
  kv = kv[:, :n * ratio].reshape(b, n, ratio, width)
  score = score[:, :n * ratio].reshape(b, n, ratio, width)
  if overlap:
    c = width // 2
    if prev_valid is None:
      prev_valid = jnp.broadcast_to(jnp.arange(n) > 0, (b, n))
    prev_kv = jnp.pad(kv[:, :-1, :, :c], [(0, 0), (1, 0), (0, 0), (0, 0)])
    prev_score = jnp.pad(score[:, :-1, :, :c], [(0, 0), (1, 0), (0, 0), (0, 0)])
    prev_kv = jnp.where(prev_valid[:, :, None, None], prev_kv, 0.0)
    prev_score = jnp.where(prev_valid[:, :, None, None], prev_score, -jnp.inf)
    kv = jnp.concatenate([prev_kv, kv[..., c:]], axis=2)
    score = jnp.concatenate([prev_score, score[..., c:]], axis=2)
  return jnp.sum(kv * jax.nn.softmax(score, axis=2), axis=2)


class Compressor(nnx.Module):
  """Compresses [B, S, d] hidden states into [B, S // ratio, c] entries (see module docstring)."""

  def __init__(self, cfg: ModelConfig, ratio: int, out_dim: int, *, rngs: nnx.Rngs):
    self.ratio, self.out_dim, self.overlap = ratio, out_dim, ratio == 4
    coff = 2 if self.overlap else 1
    d = cfg.hidden_size
    self.wkv = Linear(d, coff * out_dim, ("kv_pool", "embed"), rngs=rngs, cfg=cfg, dtype=jnp.float32)
    self.wgate = Linear(d, coff * out_dim, ("kv_pool", "embed"), rngs=rngs, cfg=cfg, dtype=jnp.float32)
    self.ape = param(None, (ratio, coff * out_dim), (None, "kv_pool"), value=0.0, optimizer=ADAMW)
    self.norm = RMSNorm(out_dim, cfg.rms_norm_eps, axis="kv")
    self.rope_dim = cfg.qk_rope_head_dim

  def __call__(self, x: jax.Array, positions: jax.Array, freqs: np.ndarray,
               segment_ids: jax.Array | None = None) -> jax.Array:
    """x [B, S, d], positions [B, S], segment_ids [B, S] (optional) -> entries [B, S // ratio, c] fp32."""
    b, s, _ = x.shape
    r = self.ratio
    n = s // r
    kv, score = self.project(x, jnp.arange(s) % r)
    prev_valid = None
    if self.overlap and segment_ids is not None:
      block_seg = segment_ids[:, :n * r:r]
      prev_valid = jnp.pad(block_seg[:, 1:] == block_seg[:, :-1], [(0, 0), (1, 0)])
    entries = pool_blocks(kv, score, r, self.overlap, prev_valid)
    return self.finish(entries, positions[:, :n * r:r], freqs)

  def project(self, x: jax.Array, phase: jax.Array):
    """x [B, S, d], phase (t mod ratio) [S] or [B, S] -> (kv, score) [B, S, coff·c] fp32, score + ape[phase]."""
    x = x.astype(jnp.float32)
    return self.wkv(x), self.wgate(x) + self.ape[...][phase]

  def finish(self, pooled: jax.Array, block_positions: jax.Array, freqs: np.ndarray) -> jax.Array:
    """Pooled blocks [B, N, c], their first tokens' positions [B, N] -> entries: RMSNorm, then RoPE."""
    return apply_rope(self.norm(pooled), block_positions, freqs)
