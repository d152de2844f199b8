"""Lightning indexer of CSA layers: picks the top-k compressed entries each query attends to.

Parameters: wq_b [Hi·Di, q_lora], weights_proj [Hi, d], and its own overlap compressor (c = Di).
  q_I = RoPE(wq_b(qr)) [B, S, Hi, Di],  w = weights_proj(x) · Di^-0.5 · Hi^-0.5 [B, S, Hi],
  K_I = Compressor(x) [B, S/4, Di];  score(t, i) = Σ_h w[t,h] · ReLU(q_I[t,h] · K_I[i]).
With `qat`, q_I and K_I are Hadamard-rotated and FP4 fake-quantised as in the released model.
The indexer is trained only by the KL loss toward the main attention (its inputs are stop-gradient'd
by the caller); each of its parameters carries the metadata `indexer=True`, which is how training
finds them (the indexer warm-up updates nothing else).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4_jax.config import ModelConfig
from dsv4_jax.layers.cache import CompressorCache
from dsv4_jax.layers.compressor import Compressor
from dsv4_jax.layers.linear import Linear
from dsv4_jax.layers.rope import apply_rope
from dsv4_jax.ops.kv_storage import decode_rows
from dsv4_jax.ops.quantization import qat_quantise


class Indexer(nnx.Module):

  def __init__(self, cfg: ModelConfig, ratio: int, *, rngs: nnx.Rngs):
    self.n_heads, self.head_dim = cfg.index_n_heads, cfg.index_head_dim
    self.wq_b = Linear(cfg.q_lora_rank, self.n_heads * self.head_dim, ("index_heads", "q_lora"),
                       rngs=rngs, cfg=cfg)
    self.weights_proj = Linear(cfg.hidden_size, self.n_heads, ("index_heads", "embed"), rngs=rngs, cfg=cfg)
    self.compressor = Compressor(cfg, ratio, self.head_dim, qat_format="index", rngs=rngs)
    self.qat = cfg.qat
    for _, var in nnx.iter_graph(self):
      if isinstance(var, nnx.Param):
        var.set_metadata(indexer=True)

  def __call__(self, x: jax.Array, qr: jax.Array, positions: jax.Array, freqs: np.ndarray,
               segment_ids: jax.Array | None = None, *, cache: CompressorCache | None = None, sharded: bool = False):
    """x [B, S, d], qr [B, S, q_lora] -> (q_I [B, S, Hi, Di], w [B, S, Hi], K_I, cache).

    K_I: the keys of this sequence's entries [B, S // r, Di]; in a decode step (S = 1 with a cache) every
    stored key [B, M // r, Di], the new one included. `cache` is the indexer's compressor cache. sharded:
    x, qr are one context shard's rows (parallel/context.py); K_I holds every shard's keys.
    """
    q, w = self.queries(x, qr, positions, freqs)
    k, cache = self.compressor(x, positions, freqs, segment_ids, cache=cache, sharded=sharded)
    if k is None:
      k = decode_rows(cache.entries, jnp.float32)
    return q, w, k, cache

  def queries(self, x: jax.Array, qr: jax.Array, positions: jax.Array, freqs: np.ndarray):
    """x [B, S, d], qr [B, S, q_lora] -> (q_I [B, S, Hi, Di], head weights w [B, S, Hi] fp32)."""
    b, s, _ = x.shape
    q = apply_rope(self.wq_b(qr).reshape(b, s, self.n_heads, self.head_dim), positions, freqs)
    if self.qat:
      q = qat_quantise(q, "index")
    w = self.weights_proj(x).astype(jnp.float32) * (self.head_dim ** -0.5 * self.n_heads ** -0.5)
    return q, w
