"""Context parallelism: every sequence split over the mesh axis `context` in contiguous chunks.

With C shards, shard k holds rows [k·L, (k+1)·L) of each sequence (L = S / C, a multiple of 128, so every
compression block lies in one shard). Projections, norms, mHC and the MoE are per token and need nothing;
an attention layer runs inside `jax.shard_map` over `context` (`shard_sequence`) and exchanges only:
  previous_rows(x, m)   the last m rows of shard k−1 (ppermute k−1 → k; shard 0 gets `fill`): the sliding
                        window's W−1-row halo and the overlapping CSA compressor's previous block;
  gather_sequence(x)    all shards' rows in order (all_gather): the compressed entries, S/4 (CSA) or
                        S/128 (HCA) rows, the indexer keys (S/4) and their segment ids.
Each shard computes its own queries, forward and backward; no full-length key/value array is gathered.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import PartitionSpec as P

from dsv4_jax.parallel.mesh import axis_size

AXIS = "context"
ALIGN = 128  # shard length multiple: the largest compression ratio


def context_size() -> int:
  """Devices of the `context` axis in the current mesh (1: the layers run unsharded; see mesh.axis_size)."""
  return axis_size(AXIS)


def previous_rows(x: jax.Array, m: int, fill) -> jax.Array:
  """Inside shard_sequence: x [B, L, ...] -> the previous shard's last m rows [B, m, ...] (`fill` on shard 0)."""
  n = jax.lax.axis_size(AXIS)
  got = jax.lax.ppermute(x[:, x.shape[1] - m:], AXIS, [(k, k + 1) for k in range(n - 1)])
  return jnp.where(jax.lax.axis_index(AXIS) == 0, jnp.asarray(fill, x.dtype), got)


def gather_sequence(x: jax.Array) -> jax.Array:
  """Inside shard_sequence: x [B, L', ...] on each shard -> [B, C·L', ...], shards in order."""
  return jax.lax.all_gather(x, AXIS, axis=1, tiled=True)


def shard_offset(length: int) -> jax.Array:
  """Inside shard_sequence: the global row of this shard's first row."""
  return jax.lax.axis_index(AXIS) * length


def shard_sequence(fn: Callable, module: nnx.Module, *sequences: jax.Array, min_rows: int = 1):
  """Runs `fn(module, *local_sequences) -> (out [B, L, ...], aux {name: scalar})` on each shard.

  sequences: [B, S, ...] arrays, split along S over `context`; the segment ids among them must be 0 on
  padding. When S is not a multiple of C·128 (e.g. the MTP block's S − 1 rows), every sequence is padded
  at its end with zeros (segment 0: padding) to the next one and `out` cut back to S rows: rows after a
  query and entries completed after it are never visible, so the padding changes no row before it.
  The module's state is replicated over `context` (other mesh axes stay automatic); aux scalars are
  summed over the shards. min_rows: the fewest rows per shard the caller's halo needs (e.g. W − 1).
  """
  shards = context_size()
  s = sequences[0].shape[1]
  padded = -(-s // (shards * ALIGN)) * shards * ALIGN
  if padded // shards < min_rows:
    raise ValueError(f"context parallelism over {shards} shards: a shard of {padded // shards} rows is shorter "
                     f"than the {min_rows} rows of the window's halo; use fewer context shards or longer sequences")
  sequences = [jnp.pad(a, [(0, 0), (0, padded - s)] + [(0, 0)] * (a.ndim - 2)) for a in sequences]
  graphdef, state = nnx.split(module)

  def local(state, *local_sequences):
    out, aux = fn(nnx.merge(graphdef, state), *local_sequences)
    return out, jax.tree.map(lambda a: jax.lax.psum(a, AXIS), aux)

  seq_spec = P(None, AXIS)
  out, aux = jax.shard_map(local, in_specs=(P(),) + (seq_spec,) * len(sequences), out_specs=(seq_spec, P()),
                           axis_names={AXIS})(state, *sequences)
  return out[:, :s], aux
