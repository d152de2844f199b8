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
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4_jax.config import ModelConfig
from dsv4_jax.layers.compressor import Compressor
from dsv4_jax.layers.indexer import Indexer
from dsv4_jax.layers.linear import ADAMW, Linear, param
from dsv4_jax.layers.norms import RMSNorm, rms_norm
from dsv4_jax.layers.rope import apply_rope, layer_frequencies
from dsv4_jax.ops import dispatch
from dsv4_jax.ops.banded_attention import banded_attention
from dsv4_jax.ops.indexer import indexer_scores, select_topk
from dsv4_jax.ops.quantization import fake_quant_fp8
from dsv4_jax.ops.sparse_attention import attention_logits, gather_rows, map_query_chunks

ATTENTION_MODES = ("sparse", "dense")


def window_indices(rows: jax.Array, segment_ids: jax.Array, window: int) -> jax.Array:
  """rows [B, C] query row indices -> [B, C, W] rows t−W+1..t of the same segment, −1 elsewhere."""
  j = rows[..., None] - window + 1 + jnp.arange(window)
  b, c, w = j.shape
  seg_j = jnp.take_along_axis(segment_ids, jnp.clip(j, 0).reshape(b, c * w), axis=1).reshape(b, c, w)
  seg_t = jnp.take_along_axis(segment_ids, rows, axis=1)[..., None]
  return jnp.where((j >= 0) & (seg_j == seg_t), j, -1)


def compressed_visibility(rows: jax.Array, segment_ids: jax.Array, ratio: int, n: int) -> jax.Array:
  """rows [B, C] -> [B, C, N] bool: entry i is complete ((i+1)·r ≤ t+1) and in the query's segment."""
  seg_t = jnp.take_along_axis(segment_ids, rows, axis=1)[..., None]
  block_seg = segment_ids[:, :n * ratio:ratio][:, None, :]
  i = jnp.arange(n)
  return (i < (rows[..., None] + 1) // ratio) & (block_seg == seg_t)


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
      self.compressor = Compressor(cfg, ratio, hd, rngs=rngs)
    if ratio == 4:
      self.indexer = Indexer(cfg, ratio, rngs=rngs)
    self.freqs = tuple(float(f) for f in layer_frequencies(cfg, compressed=ratio > 0))  # static, not state

  def _kv_quantise(self, kv: jax.Array) -> jax.Array:
    """QAT: FP8-simulate the non-RoPE dims; RoPE dims stay unquantised."""
    if not self.cfg.qat:
      return kv
    rd = self.cfg.qk_rope_head_dim
    return jnp.concatenate([fake_quant_fp8(kv[..., :-rd]), kv[..., -rd:]], axis=-1)

  def queries(self, x: jax.Array, positions: jax.Array):
    """x [B, S, d] -> (qr [B, S, q_lora], q [B, S, H, D]): q_norm(wq_a(x)), then wq_b, per-head RMS, RoPE."""
    b, s, _ = x.shape
    qr = self.q_norm(self.wq_a(x))
    q = self.wq_b(qr).reshape(b, s, self.n_heads, self.head_dim)
    return qr, apply_rope(rms_norm(q, self.cfg.rms_norm_eps).astype(q.dtype), positions, self.freqs)

  def window_kv(self, x: jax.Array, positions: jax.Array) -> jax.Array:
    """x [B, S, d] -> the shared key/value rows [B, S, D]: RoPE(kv_norm(wkv(x))), QAT-quantised."""
    return self._kv_quantise(apply_rope(self.kv_norm(self.wkv(x)), positions, self.freqs))

  def project_out(self, o: jax.Array, positions: jax.Array) -> jax.Array:
    """Attention output o [B, S, H, D] -> [B, S, d]: inverse RoPE at the query, grouped wo_a, wo_b."""
    b, s = o.shape[:2]
    o = apply_rope(o, positions, self.freqs, inverse=True)
    o = o.reshape(b, s, self.groups, self.n_heads * self.head_dim // self.groups)
    wo_a = self.wo_a.weight[...].reshape(self.groups, self.cfg.o_lora_rank, -1).astype(self.wo_a.dtype)
    o = jnp.einsum("bsgd,grd->bsgr", o.astype(self.wo_a.dtype), wo_a)
    return self.wo_b(o.reshape(b, s, -1))

  def __call__(self, x: jax.Array, positions: jax.Array, segment_ids: jax.Array, *,
               attention_mode: str = "sparse", with_indexer_loss: bool = True):
    """x [B, S, d], positions / segment_ids [B, S] -> (out [B, S, d], aux dict).

    aux: {"indexer_kl_sum", "indexer_kl_count"} (zeros outside CSA layers or when not requested).
    """
    if attention_mode not in ATTENTION_MODES:
      raise ValueError(f"attention_mode: expected one of {ATTENTION_MODES}, got {attention_mode!r}")
    cfg, r = self.cfg, self.ratio
    b, s, _ = x.shape
    hd = self.head_dim

    qr, q = self.queries(x, positions)
    kv = self.window_kv(x, positions)

    n = s // r if r else 0
    kv_all = kv
    if n:
      compressed = self._kv_quantise(self.compressor(x, positions, self.freqs, segment_ids))
      kv_all = jnp.concatenate([kv, compressed.astype(kv.dtype)], axis=1)  # rows S.. are entries 0..N-1
    use_indexer = r == 4 and n > 0 and (attention_mode == "sparse" or with_indexer_loss)
    index_q = index_w = index_k = None
    if use_indexer:
      index_q, index_w, index_k = self.indexer(jax.lax.stop_gradient(x), jax.lax.stop_gradient(qr),
                                               positions, self.freqs, segment_ids)
    want_kl = use_indexer and with_indexer_loss
    scale, window, sink = hd ** -0.5, cfg.sliding_window, self.attn_sink[...]
    pallas = dispatch.use_pallas(cfg.kernels)
    chunk_size = min(cfg.attention_chunk_size, s)
    if not pallas:  # window keys with W−1 rows in front and a chunk behind, so no slice is clamped
      kv_padded = jnp.pad(kv, [(0, 0), (window - 1, chunk_size), (0, 0)])
      seg_padded = jnp.pad(segment_ids, [(0, 0), (window - 1, chunk_size)], constant_values=-1)

    def chunk(rows, q_c, *index_c):
      cidx = valid = index_logits = None
      if n:
        valid = compressed_visibility(rows, segment_ids, r, n)
        if use_indexer:
          index_logits = indexer_scores(index_c[0], index_c[1], index_k)
        if r == 4 and attention_mode == "sparse":
          cidx, index_logits = select_topk(index_logits, valid, cfg.index_topk)
          valid = cidx >= 0
      if pallas:  # one kernel over window ∪ compressed rows gathered by index
        idx = window_indices(rows, segment_ids, window)
        if n:  # compressed entries are rows s.. of kv_all
          entries = jnp.where(valid, jnp.arange(n), -1) if cidx is None else cidx
          entry_rows = jnp.where(entries >= 0, entries + s, -1)
          idx = jnp.concatenate([idx, entry_rows], axis=-1)
        o, lse = dispatch.sparse_attention_fn(cfg.kernels)(q_c, kv_all, sink, idx, scale=scale, chunk_size=None,
                                                           return_lse=True)
        comp_logits = None
        if want_kl:
          comp_logits = attention_logits(q_c, gather_rows(kv_all, entry_rows), entry_rows, scale)
      else:
        o, lse, comp_logits = banded_attention(
            q_c, rows, kv_padded, seg_padded, window, sink, scale, compressed=kv_all[:, s:] if n else None,
            compressed_valid=valid, compressed_idx=cidx)
      kl = has = jnp.zeros(rows.shape, jnp.float32)
      if want_kl:
        kl, has = indexer_kl(comp_logits, lse, valid, index_logits)
        real = jnp.take_along_axis(segment_ids, rows, axis=1) != 0
        kl, has = kl * real, (has & real).astype(jnp.float32)
      return o, kl, has

    rows = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    chunk_inputs = (rows, q) + ((index_q, index_w) if use_indexer else ())
    o, kl, has = map_query_chunks(chunk, chunk_size, *chunk_inputs)

    out = self.project_out(o, positions)
    aux = {"indexer_kl_sum": jnp.sum(kl), "indexer_kl_count": jnp.sum(has)}
    return out.astype(x.dtype), aux
