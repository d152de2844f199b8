"""One query chunk of the hybrid attention: its window rows ∪ its compressed rows, one softmax with a sink.

Both functions compute, for queries at rows t (a chunk of consecutive sequence rows),
  logits = scale · q · [window rows of t | compressed rows of t];   lse = log(exp(sink) + Σ exp(logits))
  o = Σ exp(logits − lse) · rows
where the window rows are the rows s with `index_rules.window_visible(t, s, W, seg_t, seg_s)` and the
compressed rows are entries of the same kv array after the S sequence rows: all visible entries
(`compressed_valid` [B, C, N], HCA and dense CSA) or the indexer's picks (`compressed_idx` [B, C, K],
−1 empty, with `compressed_valid` its validity). They differ only in how rows are read:
  banded_attention    (XLA) the window as one contiguous band of C + W − 1 rows, masked: two dense
                      matmuls instead of gathering C·W rows (and scatter-adding them in the backward);
  gathered_attention  (kernels) every row gathered by index (`window_indices` + `compressed_row`) into
                      a sparse-attention kernel, e.g. the Pallas one.
`ops/dispatch.hybrid_attention` picks one. Returns (o [B, C, H, D] in q's dtype, lse [B, C, H] fp32,
compressed logits [B, C, H, N or K] fp32 with −inf where invalid, or None).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax.ops import index_rules
from dsv4_jax.ops.sparse_attention import attention_logits, gather_rows
from dsv4_jax.ops.visibility import window_indices


def banded_attention(q: jax.Array, rows: jax.Array, kv: jax.Array, segment_ids: jax.Array, sink: jax.Array, *,
                     window: int, scale: float, compressed_valid: jax.Array | None = None,
                     compressed_idx: jax.Array | None = None, with_compressed_logits: bool = False):
  """q [B, C, H, D], rows [B, C] (consecutive from rows[0, 0]), kv [B, S + N, D], segment_ids [B, S]."""
  del with_compressed_logits  # the compressed logits are part of the softmax here: always returned
  b, c, h, _ = q.shape
  s = segment_ids.shape[1]
  span = min(c + window - 1, s)
  # Rows t0 − W + 1 .. t0 + C − 1, shifted into [0, S); the mask below holds the rule, so a shifted band
  # only adds rows that the rule masks out.
  start = jnp.clip(rows[0, 0] - window + 1, 0, s - span)
  keys = jax.lax.dynamic_slice_in_dim(kv, start, span, axis=1)
  key_rows = start + jnp.arange(span, dtype=jnp.int32)
  key_seg = jax.lax.dynamic_slice_in_dim(segment_ids, start, span, axis=1)
  query_seg = jnp.take_along_axis(segment_ids, jnp.clip(rows, 0, s - 1), axis=1)
  mask = index_rules.window_visible(rows[:, :, None], key_rows[None, None, :], window, query_seg[:, :, None],
                                    key_seg[:, None, :])
  logits = jnp.einsum("bchd,bkd->bchk", q, keys, preferred_element_type=jnp.float32) * scale
  logits = jnp.where(mask[:, :, None, :], logits, -jnp.inf)

  compressed = kv[:, s:]
  comp_logits = comp_rows = None
  if compressed.shape[1]:
    if compressed_idx is not None:
      comp_rows = gather_rows(compressed, compressed_idx)  # [B, C, K, D]
      comp_logits = jnp.einsum("bchd,bckd->bchk", q, comp_rows, preferred_element_type=jnp.float32)
    else:
      comp_logits = jnp.einsum("bchd,bnd->bchn", q, compressed, preferred_element_type=jnp.float32)
    comp_logits = jnp.where(compressed_valid[:, :, None, :], comp_logits * scale, -jnp.inf)

  sink_logit = jnp.broadcast_to(sink.astype(jnp.float32)[None, None, :, None], (b, c, h, 1))
  parts = [logits, sink_logit] if comp_logits is None else [logits, comp_logits, sink_logit]
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


def gathered_attention(q: jax.Array, rows: jax.Array, kv: jax.Array, segment_ids: jax.Array, sink: jax.Array, *,
                       window: int, scale: float, compressed_valid: jax.Array | None = None,
                       compressed_idx: jax.Array | None = None, with_compressed_logits: bool = False,
                       sparse_attention):
  """Same arguments as banded_attention, plus the `sparse_attention(q, kv, sink, idx, ...)` to gather with."""
  s = segment_ids.shape[1]
  n = kv.shape[1] - s
  idx = window_indices(rows, segment_ids, window)
  entry_rows = None
  if n:
    entries = compressed_idx
    if entries is None:
      entries = index_rules.topk_slot(jnp.arange(n, dtype=jnp.int32), compressed_valid)
    entry_rows = index_rules.compressed_row(entries, s)
    idx = jnp.concatenate([idx, entry_rows], axis=-1)
  o, lse = sparse_attention(q, kv, sink, idx, scale=scale, chunk_size=None, return_lse=True)
  comp_logits = None
  if with_compressed_logits and n:
    comp_logits = attention_logits(q, gather_rows(kv, entry_rows), entry_rows, scale)
  return o, lse, comp_logits
