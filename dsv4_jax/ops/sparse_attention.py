"""Reference sparse attention: shared-KV MQA over rows gathered by index, with an attention sink.

  o[b,s,h] = Σ_k p[b,s,h,k] · kv[b, idx[b,s,k]],
  p[b,s,h,k] = exp(ℓ[b,s,h,k] − lse[b,s,h]),   ℓ = scale · q[b,s,h] · kv[b, idx[b,s,k]],
  lse[b,s,h] = log(exp(sink[h]) + Σ_k exp(ℓ[b,s,h,k]))      (idx = −1 slots contribute nothing)

The sink adds exp(sink) to the denominator only. Queries are processed in chunks and each chunk is
rematerialised in the backward pass, so peak memory is O(chunk · K · D) rather than O(S · K · D), and
no S×S tensor is ever built.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from pallas_kernels.common import map_query_chunks
from pallas_kernels.sparse_attention import check_arguments


def gather_rows(kv: jax.Array, idx: jax.Array) -> jax.Array:
  """kv [B, N, D], idx [B, S, K] (−1 allowed) -> rows [B, S, K, D] (masked rows read row 0)."""
  b, s, k = idx.shape
  safe = jnp.where(idx < 0, 0, idx).reshape(b, s * k)
  return jnp.take_along_axis(kv, safe[..., None], axis=1).reshape(b, s, k, kv.shape[-1])


def attention_logits(q: jax.Array, rows: jax.Array, idx: jax.Array, scale: float) -> jax.Array:
  """q [B, S, H, D], rows [B, S, K, D] -> fp32 logits [B, S, H, K], −inf at idx = −1."""
  logits = jnp.einsum("bshd,bskd->bshk", q, rows, preferred_element_type=jnp.float32) * scale
  return jnp.where((idx >= 0)[:, :, None, :], logits, -jnp.inf)


def _attend(q, kv, sink, idx, scale):
  rows = gather_rows(kv, idx)
  logits = attention_logits(q, rows, idx, scale)
  sink = jnp.broadcast_to(sink.astype(jnp.float32)[None, None, :, None], logits.shape[:3] + (1,))
  lse = jax.nn.logsumexp(jnp.concatenate([logits, sink], axis=-1), axis=-1)  # finite: the sink is
  probs = jnp.exp(logits - lse[..., None])
  out = jnp.einsum("bshk,bskd->bshd", probs.astype(rows.dtype), rows, preferred_element_type=jnp.float32)
  return out.astype(q.dtype), lse


def sparse_attention(q: jax.Array, kv: jax.Array, sink: jax.Array, idx: jax.Array, *,
                     scale: float | None = None, chunk_size: int | None = 256, return_lse: bool = False):
  """Sparse shared-KV attention.

  Args:
    q: [B, S, H, D] queries.
    kv: [B, N, D] rows used as both keys and values.
    sink: [H] per-head sink logits (denominator only).
    idx: [B, S, K] int rows of `kv` each query attends to; −1 marks an empty slot.
    scale: logit scale, default D^-0.5.
    chunk_size: queries per chunk (None: one chunk).
    return_lse: also return the fp32 log-sum-exp [B, S, H] (sink included).
  Returns:
    o [B, S, H, D] in q's dtype (and lse).
  """
  check_arguments(q, kv, sink, idx)
  s, d = q.shape[1], q.shape[3]
  scale = d ** -0.5 if scale is None else scale
  attend = functools.partial(_attend, scale=scale)
  if chunk_size is None or s <= chunk_size:
    o, lse = attend(q, kv, sink, idx)
  else:
    o, lse = map_query_chunks(lambda q_c, idx_c: attend(q_c, kv, sink, idx_c), chunk_size, q, idx)
  return (o, lse) if return_lse else o
