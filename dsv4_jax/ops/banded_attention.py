"""XLA-friendly evaluation of the hybrid attention of one query chunk: window band + compressed rows.

The same function as `sparse_attention` with idx = window ∪ compressed (see that module), computed
without gathering window rows: for queries t0..t0+C−1 the window keys are the contiguous rows
t0−W+1..t0+C−1, read with one dynamic slice and masked to the band (t−W, t] ∩ same segment. On
CPU/GPU this replaces a gather of C·W rows (and a scatter-add in the backward pass) by two dense
matmuls. Compressed rows are either all N entries with a visibility mask (HCA, dense CSA) or the
indexer's top-k rows, gathered.

  logits = scale · q · [window rows | compressed rows];  lse = log(exp(sink) + Σ exp(logits))
  o = Σ exp(logits − lse) · rows
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax.ops.sparse_attention import gather_rows


def banded_attention(q: jax.Array, rows: jax.Array, kv_padded: jax.Array, seg_padded: jax.Array,
                     window: int, sink: jax.Array, scale: float, compressed: jax.Array | None = None,
                     compressed_valid: jax.Array | None = None, compressed_idx: jax.Array | None = None):
  """One query chunk.

  q: [B, C, H, D]; rows: [B, C] query rows (consecutive; the same for every batch row).
  kv_padded: [B, W−1+S, D] window keys with W−1 leading pad rows; seg_padded: [B, W−1+S] their
    segment ids (pad rows −1; a query's segment is never −1).
  compressed: [B, N, D] entries; compressed_valid: [B, C, N] visibility (dense) or, with
    compressed_idx [B, C, K] (top-k entry ids, −1 empty), the [B, C, K] validity of each slot.
  Returns (o [B, C, H, D] in q's dtype, lse [B, C, H] fp32, compressed logits [B, C, H, N or K] fp32
  (−inf where invalid) or None).
  """
  b, c, h, d = q.shape
  t0 = rows[0, 0]
  span = c + window - 1
  keys = jax.lax.dynamic_slice_in_dim(kv_padded, t0, span, axis=1)  # rows t0−W+1 .. t0+C−1
  key_seg = jax.lax.dynamic_slice_in_dim(seg_padded, t0, span, axis=1)
  query_seg = jax.lax.dynamic_slice_in_dim(seg_padded, t0 + window - 1, c, axis=1)
  offset = jnp.arange(span)[None, :] - jnp.arange(c)[:, None]  # key row − query row + W − 1
  band = (offset >= 0) & (offset < window)
  mask = band[None] & (key_seg[:, None, :] == query_seg[:, :, None])
  logits = jnp.einsum("bchd,bkd->bchk", q, keys, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask[:, :, None, :], logits, -jnp.inf)

  comp_logits = comp_rows = None
  if compressed is not None:
    if compressed_idx is not None:
      comp_rows = gather_rows(compressed, compressed_idx)  # [B, C, K, D]
      comp_logits = jnp.einsum("bchd,bckd->bchk", q, comp_rows, preferred_element_type=jnp.float32)
    else:
      comp_logits = jnp.einsum("bchd,bnd->bchn", q, compressed, preferred_element_type=jnp.float32)
    comp_logits = jnp.where(compressed_valid[:, :, None, :], comp_logits * scale, -jnp.inf)

  parts = [logits, jnp.broadcast_to(sink.astype(jnp.float32)[None, None, :, None], (b, c, h, 1))]
  if comp_logits is not None:
    parts.insert(1, comp_logits)
  lse = jax.nn.logsumexp(jnp.concatenate(parts, axis=-1), axis=-1)
  out = jnp.einsum("bchk,bkd->bchd", jnp.exp(logits - lse[..., None]).astype(keys.dtype), keys,
                   preferred_element_type=jnp.float32)
  if comp_logits is not None:
    probs = jnp.exp(comp_logits - lse[..., None]).astype(compressed.dtype)
    if compressed_idx is not None:
      out = out + jnp.einsum("bchk,bckd->bchd", probs, comp_rows, preferred_element_type=jnp.float32)
    else:
      out = out + jnp.einsum("bchn,bnd->bchd", probs, compressed, preferred_element_type=jnp.float32)
  return out.astype(q.dtype), lse, comp_logits
