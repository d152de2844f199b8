"""KV compressor: pools every `ratio` consecutive tokens into one entry by a learned per-channel softmax.

Shapes: x [B, S, d] -> entries [B, S // ratio, c]. With coff = 2 when ratio = 4 (overlap), else 1:
  kv = x Wkvᵀ, score = x Wgateᵀ + ape[t mod ratio]        [B, S, coff·c]   (fp32)
  plain:   entry_i = Σ_{k<r} softmax_k(score[i·r+k]) ⊙ kv[i·r+k]
  overlap: entry_i pools 2r slots, the previous block's tokens through the FIRST c channels and the
           current block's through the LAST c channels, one softmax per channel over all 2r slots.
           Where there is no previous block in the same document (sequence start, or a document's
           first block in a packed row), those slots are padding (kv 0, score −inf).
Then RMSNorm(c) with weight, RoPE on the last rope dims at the position of the block's first token, and
(with `qat`) the released model's quantisation of the entries (`qat_format`: "kv" for attention
entries, "index" for the lightning indexer's keys). Entry i exists once tokens i·r .. i·r + r − 1 are
all seen (a trailing partial block is not an entry).

With a cache (layers/cache.py CompressorCache), the same module fills it from a prompt or adds one
decoded token to it: the token's projections go to slot t mod r of the partial block, and when the
token completes a block (`entry_completed_by`) its entry is pooled exactly as above and stored.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4_jax.config import ModelConfig
from dsv4_jax.layers.cache import CompressorCache
from dsv4_jax.layers.linear import ADAMW, Linear, param
from dsv4_jax.layers.norms import RMSNorm
from dsv4_jax.layers.rope import apply_rope
from dsv4_jax.ops import index_rules
from dsv4_jax.ops.kv_storage import reencode, write_rows
from dsv4_jax.ops.quantization import qat_quantise
from dsv4_jax.parallel import context


def pool_blocks(kv: jax.Array, score: jax.Array, ratio: int, overlap: bool,
                prev_valid: jax.Array | None = None) -> jax.Array:
  """Softmax-pools complete blocks.

  kv, score: [B, S, coff·c] fp32 with `ape` already added to score; only the first (S // ratio)·ratio
  tokens are used. prev_valid: [B, N] bool, whether block i may read block i−1 (overlap only; default
  i > 0). Returns [B, N, c] with N = S // ratio.
  """
  b, s, width = kv.shape
  n = s // ratio
  if overlap and n == 0:
    return jnp.zeros((b, 0, width // 2), kv.dtype)
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

  def __init__(self, cfg: ModelConfig, ratio: int, out_dim: int, *, qat_format: str = "kv", rngs: nnx.Rngs):
    self.ratio, self.out_dim, self.overlap = ratio, out_dim, ratio == 4
    coff = 2 if self.overlap else 1
    d = cfg.hidden_size
    self.wkv = Linear(d, coff * out_dim, ("kv_pool", "embed"), rngs=rngs, cfg=cfg, dtype=jnp.float32)
    self.wgate = Linear(d, coff * out_dim, ("kv_pool", "embed"), rngs=rngs, cfg=cfg, dtype=jnp.float32)
    self.ape = param(None, (ratio, coff * out_dim), (None, "kv_pool"), value=0.0, optimizer=ADAMW)
    self.norm = RMSNorm(out_dim, cfg.rms_norm_eps, axis="kv")
    self.rope_dim = cfg.qk_rope_head_dim
    self.qat_format = qat_format if cfg.qat else None

  def __call__(self, x: jax.Array, positions: jax.Array, freqs: np.ndarray, segment_ids: jax.Array | None = None,
               *, cache: CompressorCache | None = None, sharded: bool = False):
    """x [B, S, d], positions / segment_ids [B, S] -> (entries, cache).

    Without a cache: (entries [B, S // r, c] fp32, None).
    sharded (inside parallel.context.shard_sequence, no cache): x is this shard's rows; the overlap pools
      its first block with the previous shard's last one, and the entries of all shards are returned.
    With a cache and S > 1 (prefill of an empty cache; rows right-padded, segment_ids 0 on padding):
      (entries as above, the cache after each row's real tokens).
    With a cache and S = 1 (one decoded token per row at positions[:, 0]): (None, the cache with the token
      added and, where it completes a block, that block's entry stored; read entries from the cache).
    """
    if cache is not None and x.shape[1] == 1:
      return None, self._add_token(x, positions[:, 0], freqs, cache)
    b, s, _ = x.shape
    r = self.ratio
    n = s // r
    kv, score = self.project(x, index_rules.block_slot(jnp.arange(s), r))
    seg = jnp.ones((b, s), jnp.int32) if segment_ids is None else segment_ids
    halo = self.overlap and sharded
    if halo:  # the previous shard's last block, as block −1 (segment −1 on the first shard: no block)
      kv, score, seg = (jnp.concatenate([context.previous_rows(a, r, fill), a], axis=1)
                        for a, fill in ((kv, 0.0), (score, -jnp.inf), (seg, -1)))
    prev_valid = None
    if self.overlap:
      block_seg = seg[:, :(n + halo) * r:r]
      prev_valid = jnp.pad(block_seg[:, 1:] == block_seg[:, :-1], [(0, 0), (1, 0)])
    pooled = pool_blocks(kv, score, r, self.overlap, prev_valid)[:, int(halo):]
    entries = self.finish(pooled, positions[:, :n * r:r], freqs)
    if sharded:
      entries = context.gather_sequence(entries)
    if cache is None:
      return entries, None
    lengths = jnp.full((b,), s) if segment_ids is None else jnp.sum(segment_ids != 0, axis=1)
    return entries, self._fill(kv, score, entries, lengths, cache)

  def project(self, x: jax.Array, slot: jax.Array):
    """x [B, S, d], block slot (t mod ratio) [S] or [B, S] -> (kv, score) [B, S, coff·c] fp32, score + ape[slot]."""
    x = x.astype(jnp.float32)
    return self.wkv(x), self.wgate(x) + self.ape[...][slot]

  def finish(self, pooled: jax.Array, block_positions: jax.Array, freqs: np.ndarray) -> jax.Array:
    """Pooled blocks [B, N, c], their first tokens' positions [B, N] -> entries: RMSNorm, RoPE, QAT."""
    entries = apply_rope(self.norm(pooled), block_positions, freqs)
    return entries if self.qat_format is None else qat_quantise(entries, self.qat_format, self.rope_dim)

  def _fill(self, kv, score, entries, lengths, cache: CompressorCache) -> CompressorCache:
    """The cache after the first lengths[b] tokens of each row (kv, score [B, S, coff·c]; entries [B, N, c])."""
    r, s = self.ratio, kv.shape[1]
    b, n, _ = entries.shape
    m = jax.tree.leaves(cache.entries)[0].shape[1]
    if n > m:
      raise ValueError(f"compressor cache: the prompt has {n} entries but the cache holds {m} (max_len too small)")
    complete = index_rules.entry_visible(lengths[:, None] - 1, jnp.arange(n), r)  # complete at the last token
    entries = jnp.pad(jnp.where(complete[..., None], entries, 0.0), [(0, 0), (0, m - n), (0, 0)])
    block_start = index_rules.entry_first_token(index_rules.entry_of_token(lengths, r), r)

    def block_from(start):  # [B] first token of a block -> its r tokens' kv, score [B, r, coff·c]
      idx = jnp.clip(start[:, None] + jnp.arange(r), 0, s - 1)[..., None]
      return jnp.take_along_axis(kv, idx, axis=1), jnp.take_along_axis(score, idx, axis=1)

    block_kv, block_score = block_from(block_start)  # slots past a row's last token are overwritten later
    new = CompressorCache(entries=reencode(cache.entries, entries), block_kv=block_kv, block_score=block_score)
    if self.overlap:
      c = self.out_dim
      prev_kv, prev_score = block_from(block_start - r)
      has_prev = (block_start > 0)[:, None, None]
      new.prev_kv = jnp.where(has_prev, prev_kv[..., :c], 0.0)
      new.prev_score = jnp.where(has_prev, prev_score[..., :c], -jnp.inf)
    return new

  def _add_token(self, x, t, freqs, cache: CompressorCache) -> CompressorCache:
    """Token t (x [B, 1, d]) into slot t mod r; pools and stores entry t // r where t completes it."""
    r, b = self.ratio, x.shape[0]
    batch = jnp.arange(b)
    slot = index_rules.block_slot(t, r)
    kv, score = self.project(x, slot[:, None])
    block_kv = cache.block_kv.at[batch, slot].set(kv[:, 0])
    block_score = cache.block_score.at[batch, slot].set(score[:, 0])
    complete = index_rules.entry_completed_by(t, r)
    if self.overlap:  # [previous block's first c channels | this block's last c], as pool_blocks' block 1
      pad = jnp.zeros_like(cache.prev_kv)
      seq_kv = jnp.concatenate([jnp.concatenate([cache.prev_kv, pad], -1), block_kv], axis=1)
      seq_score = jnp.concatenate([jnp.concatenate([cache.prev_score, pad], -1), block_score], axis=1)
      pooled = pool_blocks(seq_kv, seq_score, r, True, prev_valid=jnp.ones((b, 2), bool))[:, 1:]
    else:
      pooled = pool_blocks(block_kv, block_score, r, False)
    entry = index_rules.entry_of_token(t, r)
    pooled = self.finish(pooled, index_rules.entry_first_token(entry, r)[:, None], freqs)[:, 0]
    new = CompressorCache(entries=write_rows(cache.entries, entry, pooled, when=complete),
                          block_kv=block_kv, block_score=block_score)
    if self.overlap:
      c = self.out_dim
      new.prev_kv = jnp.where(complete[:, None, None], block_kv[..., :c], cache.prev_kv)
      new.prev_score = jnp.where(complete[:, None, None], block_score[..., :c], cache.prev_score)
    return new
