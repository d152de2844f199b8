"""Hybrid attention: sliding window (ratio 0), CSA (ratio 4, lightning indexer) or HCA (ratio 128).

Shapes: x [B, S, d]; H heads of dim D; one shared KV head; W window; r ratio; N = S // r entries.
  q  = RoPE(rms(wq_b(q_norm(wq_a(x)))))                    [B, S, H, D]   (per-head RMS, no weight)
  kv = RoPE(kv_norm(wkv(x)))                               [B, S, D]      (key = value)
  c  = Compressor(x)                                       [B, N, D]      (CSA / HCA layers)
  query t attends to one softmax over
      window rows      j ∈ (t−W, t]          of its own document, and
      compressed rows  i < (t+1) // r        of its own document
                       (CSA: the indexer's top-k of those, or all of them in `dense` mode; HCA: all),
  with the sink exp(attn_sink[h]) in the denominator; the output is de-rotated (inverse RoPE at t),
  grouped into G groups, projected per group by wo_a [G·o_lora, H·D/G] and mixed by wo_b [d, G·o_lora].

Everything after the projections is computed in query chunks (`attention_chunk_size`), each
rematerialised in the backward pass: no [S, S] or [S, N] tensor is built.
For CSA layers the indexer's KL loss toward the main attention's distribution over the compressed
rows (summed over heads, renormalised; the indexer sees stop-gradient inputs) is returned.

Which rows a query may read is decided by `index_rules` (window_visible, entry_visible, the top-k slot
layout), applied in ops/visibility.py and ops/hybrid_attention.py; ops/dispatch.py picks the XLA or
the Pallas evaluation. With a cache (layers/cache.py LayerCache) the same `__call__` serves inference:
  S > 1 tokens   prefill: the forward above, and the cache filled from each row's real tokens (rows are
                 right-padded, segment_ids 0 on padding): the ring of the last W key/value rows, the
                 compressor's and the indexer's entries and partial blocks;
  S = 1 token    decode at t = positions[:, 0]: the token's key/value row goes to ring slot t mod W, the
                 compressors add the token (storing an entry when it completes a block), and the query
                 attends the ring rows in its window ∪ the visible entries (CSA: the indexer's top-k of
                 them), gathered from the cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4_jax.config import ModelConfig
from dsv4_jax.layers.cache import LayerCache
from dsv4_jax.layers.compressor import Compressor
from dsv4_jax.layers.indexer import Indexer
from dsv4_jax.layers.linear import ADAMW, Linear, param
from dsv4_jax.layers.norms import RMSNorm, rms_norm
from dsv4_jax.layers.rope import apply_rope, layer_frequencies
from dsv4_jax.ops import dispatch, index_rules
from dsv4_jax.ops.indexer import select_topk
from dsv4_jax.ops.kv_storage import gather_rows, reencode, write_rows
from dsv4_jax.ops.quantization import check_qat_dims, qat_quantise
from dsv4_jax.ops.sparse_attention import map_query_chunks
from dsv4_jax.ops.visibility import entry_visibility
from dsv4_jax.parallel import context

ATTENTION_MODES = ("sparse", "dense")


def indexer_kl(comp_logits, lse, valid, index_logits):
  """KL(p ‖ softmax(index_logits)) per query over the compressed slots.

  p = Σ_h exp(comp_logits − lse): the main attention's probabilities at those slots (lse: its full
  log-sum-exp [B, C, H], window and sink included), summed over heads and renormalised; p is
  stop-gradient. comp_logits [B, C, H, K] (−inf where invalid), valid / index_logits [B, C, K].
  Returns (kl [B, C], has_entries [B, C]).
  """
  p = jnp.sum(jnp.exp(comp_logits - lse[..., None]), axis=2)
  total = jnp.sum(p, axis=-1, keepdims=True)
  p = jax.lax.stop_gradient(p / jnp.where(total > 0, total, 1.0))
  log_q = jax.nn.log_softmax(jnp.where(valid, index_logits, -jnp.inf), axis=-1)
  terms = jnp.where(p > 0, p * (jnp.log(jnp.where(p > 0, p, 1.0)) - log_q), 0.0)
  has_entries = jnp.any(valid, axis=-1)
  return jnp.where(has_entries, jnp.sum(terms, axis=-1), 0.0), has_entries


class Attention(nnx.Module):
  """One attention layer; its kind (SWA / CSA / HCA) is set by `ratio` = compress_ratios[layer]."""

  def __init__(self, cfg: ModelConfig, ratio: int, *, rngs: nnx.Rngs):
    d, h, hd = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim
    if cfg.qat:
      check_qat_dims(hd, cfg.qk_rope_head_dim, cfg.index_head_dim)
    self.cfg, self.ratio = cfg, ratio
    self.n_heads, self.head_dim, self.groups = h, hd, cfg.o_groups
    self.wq_a = Linear(d, cfg.q_lora_rank, ("q_lora", "embed"), rngs=rngs, cfg=cfg)
    self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps, axis="q_lora")
    self.wq_b = Linear(cfg.q_lora_rank, h * hd, ("heads", "q_lora"), rngs=rngs, cfg=cfg)
    self.wkv = Linear(d, hd, ("kv", "embed"), rngs=rngs, cfg=cfg)
    self.kv_norm = RMSNorm(hd, cfg.rms_norm_eps, axis="kv")
    self.wo_a = Linear(h * hd // cfg.o_groups, cfg.o_groups * cfg.o_lora_rank, ("o_lora", "heads"),
                       rngs=rngs, cfg=cfg)
    self.wo_b = Linear(cfg.o_groups * cfg.o_lora_rank, d, ("embed", "o_lora"), rngs=rngs, cfg=cfg)
    self.attn_sink = param(None, (h,), ("heads",), value=0.0, optimizer=ADAMW)
    if ratio:
      self.compressor = Compressor(cfg, ratio, hd, qat_format="kv", rngs=rngs)
    if ratio == 4:
      self.indexer = Indexer(cfg, ratio, rngs=rngs)
    self.freqs = tuple(float(f) for f in layer_frequencies(cfg, compressed=ratio > 0))  # static, not state

  def queries(self, x: jax.Array, positions: jax.Array):
    """x [B, S, d] -> (qr [B, S, q_lora], q [B, S, H, D]): q_norm(wq_a(x)), then wq_b, per-head RMS, RoPE."""
    b, s, _ = x.shape
    qr = self.q_norm(self.wq_a(x))
    q = self.wq_b(qr).reshape(b, s, self.n_heads, self.head_dim)
    return qr, apply_rope(rms_norm(q, self.cfg.rms_norm_eps).astype(q.dtype), positions, self.freqs)

  def window_kv(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """x [B, S, d] -> the shared key/value rows [B, S, D]: RoPE(kv_norm(wkv(x))), QAT-quantised."""
    kv = apply_rope(self.kv_norm(self.wkv(x)), positions, self.freqs)
    return qat_quantise(kv, "kv", self.cfg.qk_rope_head_dim) if self.cfg.qat else kv

  def project_out(self, o: jax.Array, positions: jax.Array) -> jax.Array:
    """Attention output o [B, S, H, D] -> [B, S, d]: inverse RoPE at the query, grouped wo_a, wo_b."""
    b, s = o.shape[:2]
    o = apply_rope(o, positions, self.freqs, inverse=True)
    o = o.reshape(b, s, self.groups, self.n_heads * self.head_dim // self.groups)
    wo_a = self.wo_a.weight[...].reshape(self.groups, self.cfg.o_lora_rank, -1).astype(self.wo_a.dtype)
    o = jnp.einsum("bsgd,grd->bsgr", o.astype(self.wo_a.dtype), wo_a)
    return self.wo_b(o.reshape(b, s, -1))

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, *,
               cache: LayerCache | None = None, attention_mode: str = "sparse", with_indexer_loss: bool = True,
               sharded: bool = False):
    """x [B, S, d], positions / segment_ids [B, S] -> (out [B, S, d], aux dict, cache).

    aux: {"indexer_kl_sum", "indexer_kl_count"} (zeros outside CSA layers, when not requested, and when
    decoding). cache: None without one, else the updated LayerCache (see the module docstring).
    Without a cache, under a mesh whose `context` axis has C > 1 devices, the layer runs context-parallel
    (parallel/context.py): each device attends for its S / C query rows, given the window's W−1-row halo
    from the previous shard and every shard's compressed entries; `sharded` marks that per-shard call.
    """
    if attention_mode not in ATTENTION_MODES:
      raise ValueError(f"attention_mode: expected one of {ATTENTION_MODES}, got {attention_mode!r}")
    if cache is not None and x.shape[1] == 1:
      out, cache = self._decode(x, positions, cache)
      zero = jnp.zeros((), jnp.float32)
      return out, {"indexer_kl_sum": zero, "indexer_kl_count": zero}, cache
    if cache is None and context.context_size() > 1:
      def per_shard(layer, x, positions, segment_ids):
        out, aux, _ = layer(x, positions, segment_ids, attention_mode=attention_mode,
                            with_indexer_loss=with_indexer_loss, sharded=True)
        return out, aux
      out, aux = context.shard_sequence(per_shard, self, x, positions, segment_ids,
                                        min_rows=self.cfg.sliding_window - 1)
      return out, aux, None
    cfg, r = self.cfg, self.ratio
    b, s, _ = x.shape
    sparse = attention_mode == "sparse"

    qr, q = self.queries(x, positions)
    kv = self.window_kv(x, positions)
    new_cache = None if cache is None else LayerCache(window=self._fill_window(kv, segment_ids, cache))
    # Key rows: [the halo of W−1 rows before this context shard (none unsharded) | the S sequence rows]; a
    # query's row in them is its local row + halo, its global row (for the entries) its local row + offset.
    halo, offset, seq_kv, seq_segments = 0, 0, kv, segment_ids
    if sharded:
      halo, offset = cfg.sliding_window - 1, context.shard_offset(s)
      seq_kv = jnp.concatenate([context.previous_rows(kv, halo, 0.0), kv], axis=1)
      seq_segments = jnp.concatenate([context.previous_rows(segment_ids, halo, -1), segment_ids], axis=1)
    n = 0
    kv_all = seq_kv
    if r:  # compressed entries (of every shard) are the rows after the sequence rows of kv_all
      compressed, comp_cache = self.compressor(x, positions, self.freqs, segment_ids, sharded=sharded,
                                               cache=None if cache is None else cache.compressor)
      kv_all = jnp.concatenate([seq_kv, compressed.astype(kv.dtype)], axis=1)
      n = compressed.shape[1]
      entry_segments = segment_ids[:, :s // r * r:r]  # an entry's segment is its first token's
      entry_segments = context.gather_sequence(entry_segments) if sharded else entry_segments
      if cache is not None:
        new_cache.compressor = comp_cache
    index_q = index_w = index_k = None
    if r == 4 and (sparse or with_indexer_loss or cache is not None):
      index_q, index_w, index_k, index_cache = self.indexer(
          jax.lax.stop_gradient(x), jax.lax.stop_gradient(qr), positions, self.freqs, segment_ids,
          cache=None if cache is None else cache.indexer, sharded=sharded)
      if cache is not None:
        new_cache.indexer = index_cache
    use_indexer = index_k is not None and n > 0 and (sparse or with_indexer_loss)
    want_kl = use_indexer and with_indexer_loss
    attend, score_entries = dispatch.hybrid_attention(cfg.kernels), dispatch.indexer_scores(cfg.kernels)

    def chunk(rows, q_c, *index_c):
      cidx = valid = index_logits = None
      row_segments = jnp.take_along_axis(segment_ids, rows, axis=1)
      if n:
        valid = entry_visibility(rows + offset, row_segments, entry_segments, r)
        if use_indexer:
          index_logits = score_entries(*index_c, index_k, ratio=r, rows=rows + offset)
        if r == 4 and sparse:
          cidx, index_logits = select_topk(index_logits, valid, cfg.index_topk)
          valid = cidx >= 0
      o, lse, comp_logits = attend(q_c, rows + halo, kv_all, seq_segments, self.attn_sink[...],
                                   window=cfg.sliding_window, scale=self.head_dim ** -0.5, compressed_valid=valid,
                                   compressed_idx=cidx, with_compressed_logits=want_kl)
      kl = has = jnp.zeros(rows.shape, jnp.float32)
      if want_kl:
        kl, has = indexer_kl(comp_logits, lse, valid, index_logits)
        real = row_segments != 0
        kl, has = kl * real, (has & real).astype(jnp.float32)
      return o, kl, has

    rows = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    chunk_inputs = (rows, q) + ((index_q, index_w) if use_indexer else ())
    # A chunk scores its queries against all N entries ([C, Hi, N] in the XLA indexer), and N is the whole
    # sequence's also on a context shard: C shards use chunks C times smaller, so that a device holds what an
    # unsharded run of S / C tokens holds.
    chunk_size = cfg.attention_chunk_size // (jax.lax.axis_size(context.AXIS) if sharded else 1)
    o, kl, has = map_query_chunks(chunk, max(1, min(chunk_size, s)), *chunk_inputs)

    out = self.project_out(o, positions)
    aux = {"indexer_kl_sum": jnp.sum(kl), "indexer_kl_count": jnp.sum(has)}
    return out.astype(x.dtype), aux, new_cache

  def _fill_window(self, kv: jax.Array, segment_ids: jax.Array, cache: LayerCache):
    """The window ring after each row's real tokens of kv [B, S, D]: slot j holds ring_position(last, j)."""
    w, s = self.cfg.sliding_window, kv.shape[1]
    last = jnp.sum(segment_ids != 0, axis=1)[:, None] - 1
    held = index_rules.ring_position(last, jnp.arange(w), w)  # [B, W]; negative: never written
    rows = jnp.take_along_axis(kv, jnp.clip(held, 0, s - 1)[..., None], axis=1)
    return reencode(cache.window, jnp.where((held >= 0)[..., None], rows, 0.0))

  def _decode(self, x: jax.Array, positions: jax.Array, cache: LayerCache):
    """One token per row, x [B, 1, d] at t = positions[:, 0] -> (out [B, 1, d], updated LayerCache)."""
    cfg, r, w = self.cfg, self.ratio, self.cfg.sliding_window
    t = positions[:, 0]
    qr, q = self.queries(x, positions)
    kv = self.window_kv(x, positions)
    window = write_rows(cache.window, index_rules.ring_slot(t, w), kv[:, 0])
    held = index_rules.ring_position(t[:, None], jnp.arange(w), w)  # [B, W]
    in_window = index_rules.window_visible(t[:, None], held, w, 0, 0)  # a decoded row is one document
    window_slots = index_rules.topk_slot(jnp.arange(w), in_window)
    rows, slots = [gather_rows(window, window_slots, kv.dtype)], [window_slots]
    new = LayerCache(window=window)
    if r:
      _, new.compressor = self.compressor(x, positions, self.freqs, cache=cache.compressor)
      m = jax.tree.leaves(new.compressor.entries)[0].shape[1]
      visible = index_rules.entry_visible(t[:, None], jnp.arange(m), r)  # [B, M]
      if r == 4:
        index_q, index_w, index_k, new.indexer = self.indexer(x, qr, positions, self.freqs, cache=cache.indexer)
        scores = dispatch.indexer_scores(cfg.kernels)(index_q, index_w, index_k, ratio=r, rows=t[:, None])
        entries = select_topk(scores, visible[:, None], cfg.index_topk)[0][:, 0]
      else:
        entries = index_rules.topk_slot(jnp.arange(m), visible)
      rows.append(gather_rows(new.compressor.entries, entries, kv.dtype))
      slots.append(entries)
    rows = jnp.concatenate(rows, axis=1)  # [B, K, D]: the only rows this token attends
    slots = jnp.concatenate(slots, axis=1)
    idx = index_rules.topk_slot(jnp.arange(rows.shape[1]), slots >= 0)[:, None]  # [B, 1, K]
    o = dispatch.sparse_attention(cfg.kernels)(q, rows, self.attn_sink[...], idx, scale=self.head_dim ** -0.5,
                                               chunk_size=None)
    return self.project_out(o, positions).astype(x.dtype), new
