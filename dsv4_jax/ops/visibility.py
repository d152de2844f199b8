"""Which rows a query attends: the model's index rules (`index_rules`) applied to arrays.

Rows are sequence indices (packed documents share a row of the batch; `segment_ids` tells them apart,
and documents start at multiples of the largest compression ratio, so each compression block lies in
one document).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax.ops import index_rules


def _segment_at(segment_ids: jax.Array, rows: jax.Array) -> jax.Array:
  """segment_ids [B, S], rows [B, ...] (clipped into [0, S)) -> the rows' segment ids [B, ...]."""
  b = rows.shape[0]
  flat = jnp.clip(rows, 0, segment_ids.shape[1] - 1).reshape(b, -1)
  return jnp.take_along_axis(segment_ids, flat, axis=1).reshape(rows.shape)


def window_indices(rows: jax.Array, segment_ids: jax.Array, window: int) -> jax.Array:
  """Query rows [B, C] -> [B, C, W] the window rows each attends (slot w reads window_row(t, w)), −1 where
  that row is not visible (before the sequence start or in another document)."""
  slots = jnp.arange(window, dtype=jnp.int32)
  key = index_rules.window_row(rows[..., None], slots, window)
  visible = index_rules.window_visible(rows[..., None], key, window, _segment_at(segment_ids, rows)[..., None],
                                       _segment_at(segment_ids, key))
  return jnp.where(visible, key, -1)


def compressed_visibility(rows: jax.Array, segment_ids: jax.Array, ratio: int, n: int) -> jax.Array:
  """Query rows [B, C] -> [B, C, N] bool: entry i is complete at the query and lies in its document."""
  # an entry's segment is its first token's: entry_first_token(i) = i·r, a slice
  return entry_visibility(rows, _segment_at(segment_ids, rows), segment_ids[:, :n * ratio:ratio], ratio)


def entry_visibility(rows: jax.Array, row_segment: jax.Array, entry_segment: jax.Array, ratio: int) -> jax.Array:
  """compressed_visibility from the segments themselves: query rows and their segments [B, C], the entries'
  segments [B, N] (e.g. gathered from every context shard) -> [B, C, N] bool."""
  entries = jnp.arange(entry_segment.shape[1], dtype=jnp.int32)
  same_document = entry_segment[:, None, :] == row_segment[..., None]
  return index_rules.entry_visible(rows[..., None], entries, ratio) & same_document
