"""Pallas sparse shared-KV attention with an attention sink (forward + backward).

  o[b,s,h] = Σ_k p[b,s,h,k] · kv[b, idx[b,s,k]],     ℓ[b,s,h,k] = scale · q[b,s,h] · kv[b, idx[b,s,k]]
  p = exp(ℓ − lse),   lse[b,s,h] = log(exp(sink[h]) + Σ_{k: idx ≥ 0} exp(ℓ[b,s,h,k]))

Shapes: q [B, S, H, D], kv [B, N, D] (one head used as key and value), sink [H], idx [B, S, K] with
−1 marking an empty slot. Same function and signature as `dsv4_jax.ops.sparse_attention`. Callers build
idx with the rules of `pallas_kernels.index_rules` (window rows, compressed rows, top-k slots); the kernel
itself only reads idx, so its own integer arithmetic is the grid / slot / tile layout below.

Kernel layout. Grid (B, S, K/T): one program per token holds all H heads of that token, and walks the
token's K slots in tiles of T gathered rows along the last, sequential grid axis. `idx` is scalar-
prefetched (SMEM) so that T kv operands, each a one-row BlockSpec, can pick their row in the index map
(`kv_row_block`): the Pallas pipeline DMAs (and double-buffers) the gathered rows, no gather tensor is
materialised in HBM. Online softmax in VMEM scratch starts from the sink (m = sink, l = 1), so the
running max is always finite and −1 slots (masked to −inf, their DMA clamped to row 0 but never used)
contribute exactly nothing.

Backward (custom_vjp): recomputes p from the saved log-sum-exp — no probabilities are stored:
  dp = do · rowᵀ,  ds = p ⊙ (dp − Δ + ḡ_lse),  Δ = Σ_d do ⊙ o
  dq = scale · ds · rows,  drow = scale · dsᵀ q + pᵀ do,  dsink = Σ_{b,s} exp(sink − lse) (ḡ_lse − Δ)
The per-slot row gradients drow [B, S, K, D] are written once each by the kernel and scatter-added into
dkv by XLA (a row is shared by many tokens and TPUs have no atomic adds). The lse output is fully
differentiable (its cotangent enters ds and dsink).

Backends. Interpret mode on CPU (default there). Written for TPU Mosaic: token-level grid axes are
"parallel", the tile axis "arbitrary"; the one-row kv blocks squeeze the second-minor dimension, which
Mosaic lowers as a strided one-row DMA (untested on hardware in this repository). GPU (Triton / Mosaic
GPU) cannot express scalar-prefetched index maps: the GPU variant is pallas_kernels/gpu/sparse_attention.py
(an in-kernel gather load instead), and `interpret=None` refuses GPU here.

Every grid, index map, slot computation and mask below is a plain integer function proved by
`pallas_kernels.verify` for symbolic sizes.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels.common import kernel_call, map_query_chunks, resolve_interpret
from pallas_kernels.intmath import cdiv, floordiv, land, select

ROWS_PER_TILE = 8
DIMENSION_SEMANTICS = ("parallel", "parallel", "arbitrary")  # the tile axis accumulates: sequential


# ---- integer index arithmetic (used by the kernel and proved by pallas_kernels.verify) ----

def padded_slots(k, tile):
  """K slots padded up to a whole number of tiles (padding slots hold −1)."""
  return cdiv(k, tile) * tile


def grid(b, s, k_padded, tile):
  """(batch, token, tile of slots); the last axis is sequential (online-softmax / dq accumulation)."""
  return (b, s, floordiv(k_padded, tile))


def token_block(bi, si, kt):
  """Block index of the per-token blocks: q, o, do, dq [B, S, H, D] and lse-like [B, S, H, 1]."""
  return (bi, si, 0, 0)


def slot(kt, j, tile):
  """The idx slot read by the j-th row operand of tile kt."""
  return kt * tile + j


def slot_valid(row):
  """A slot contributes iff its index is not −1."""
  return row >= 0


def safe_row(row):
  """The kv row a slot reads: its index if valid, else row 0 (in bounds; masked, never used)."""
  return select(slot_valid(row), row, 0)


def kv_row_block(bi, row):
  """Block index of a one-row kv block: the slot's safe_row."""
  return (bi, safe_row(row), 0)


def drows_block(bi, si, kt):
  """Block index of the [T, D] tile of per-slot row gradients drows [B, S, K_padded, D]."""
  return (bi, si, kt, 0)


def is_first_tile(kt):
  return kt == 0


def is_last_tile(kt, n_tiles):
  return kt == n_tiles - 1


# ---- kernels ----

def _tile_mask(idx_ref, bi, si, kt, tile):
  """[1, T] bool: slot validity of tile kt of token (bi, si), built from SMEM scalars."""
  lane = jax.lax.broadcasted_iota(jnp.int32, (1, tile), 1)
  valid = jnp.zeros((1, tile), jnp.bool_)
  for j in range(tile):
    valid = valid | land(lane == j, slot_valid(idx_ref[bi, si, slot(kt, j, tile)]))
  return valid


def _logits(q, rows, valid, scale):
  """q [H, D], rows [T, D] -> masked fp32 logits [H, T]."""
  logits = jax.lax.dot_general(q, rows, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  return jnp.where(valid, logits * scale, -jnp.inf)


def _forward_kernel(idx_ref, q_ref, sink_ref, *refs, scale, tile, n_tiles):
  row_refs, (o_ref, lse_ref, m_ref, l_ref, acc_ref) = refs[:tile], refs[tile:]
  bi, si, kt = pl.program_id(0), pl.program_id(1), pl.program_id(2)

  @pl.when(is_first_tile(kt))
  def _init():
    m_ref[...] = sink_ref[...]  # the sink is a logit with value 1 = exp(sink − sink) in the sum
    l_ref[...] = jnp.ones_like(l_ref)
    acc_ref[...] = jnp.zeros_like(acc_ref)

  rows = jnp.stack([r[...] for r in row_refs], axis=0)
  logits = _logits(q_ref[...], rows, _tile_mask(idx_ref, bi, si, kt, tile), scale)
  m_prev = m_ref[...]
  m_new = jnp.maximum(m_prev, jnp.max(logits, axis=1, keepdims=True))
  alpha = jnp.exp(m_prev - m_new)
  p = jnp.exp(logits - m_new)
  l_ref[...] = alpha * l_ref[...] + jnp.sum(p, axis=1, keepdims=True)
  acc_ref[...] = alpha * acc_ref[...] + jnp.dot(p.astype(rows.dtype), rows,
                                                preferred_element_type=jnp.float32)
  m_ref[...] = m_new

  @pl.when(is_last_tile(kt, n_tiles))
  def _finish():
    o_ref[...] = (acc_ref[...] / l_ref[...]).astype(o_ref.dtype)
    lse_ref[...] = m_ref[...] + jnp.log(l_ref[...])


def _backward_kernel(idx_ref, q_ref, do_ref, lse_ref, delta_ref, glse_ref, *refs, scale, tile, n_tiles):
  row_refs, (dq_ref, drows_ref, dq_acc) = refs[:tile], refs[tile:]
  bi, si, kt = pl.program_id(0), pl.program_id(1), pl.program_id(2)

  @pl.when(is_first_tile(kt))
  def _init():
    dq_acc[...] = jnp.zeros_like(dq_acc)

  q = q_ref[...].astype(jnp.float32)
  do = do_ref[...].astype(jnp.float32)
  rows = jnp.stack([r[...] for r in row_refs], axis=0).astype(jnp.float32)
  logits = _logits(q, rows, _tile_mask(idx_ref, bi, si, kt, tile), scale)
  p = jnp.exp(logits - lse_ref[...])  # [H, T], 0 at masked slots
  dp = jax.lax.dot_general(do, rows, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  ds = p * (dp - delta_ref[...] + glse_ref[...])
  dq_acc[...] += scale * jnp.dot(ds, rows, preferred_element_type=jnp.float32)
  transposed = (((0,), (0,)), ((), ()))
  drows_ref[...] = (scale * jax.lax.dot_general(ds, q, transposed, preferred_element_type=jnp.float32)
                    + jax.lax.dot_general(p, do, transposed, preferred_element_type=jnp.float32))

  @pl.when(is_last_tile(kt, n_tiles))
  def _finish():
    dq_ref[...] = dq_acc[...].astype(dq_ref.dtype)


def token_index_map(bi, si, kt, idx_ref):
  return token_block(bi, si, kt)


def kv_row_index_map(j, tile):
  """Index map of the j-th of the T one-row kv operands: the row named by idx at slot(kt, j)."""
  return lambda bi, si, kt, idx_ref: kv_row_block(bi, idx_ref[bi, si, slot(kt, j, tile)])


def drows_index_map(bi, si, kt, idx_ref):
  return drows_block(bi, si, kt)


def sink_index_map(bi, si, kt, idx_ref):
  return (0, 0)


def _specs(h, d, tile):
  token = pl.BlockSpec((None, None, h, d), token_index_map)
  token_col = pl.BlockSpec((None, None, h, 1), token_index_map)
  rows = [pl.BlockSpec((None, None, d), kv_row_index_map(j, tile)) for j in range(tile)]
  return token, token_col, rows


def _tiled_slots(idx):
  """idx [B, S, K] -> (idx padded with −1 to Kp = padded_slots(K, T) slots, T, Kp)."""
  k = idx.shape[-1]
  tile = min(ROWS_PER_TILE, k)
  kp = padded_slots(k, tile)
  return jnp.pad(idx.astype(jnp.int32), [(0, 0), (0, 0), (0, kp - k)], constant_values=-1), tile, kp


def _forward_call(q, kv, sink, idx, scale, interpret):
  b, s, h, d = q.shape
  idx, tile, kp = _tiled_slots(idx)
  n_tiles = kp // tile
  token, token_col, rows = _specs(h, d, tile)
  sink_spec = pl.BlockSpec((h, 1), sink_index_map)
  call = kernel_call(
      functools.partial(_forward_kernel, scale=scale, tile=tile, n_tiles=n_tiles),
      grid=grid(b, s, kp, tile), num_scalar_prefetch=1,
      in_specs=[token, sink_spec] + rows, out_specs=[token, token_col],
      out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, s, h, 1), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((h, 1), jnp.float32), pltpu.VMEM((h, 1), jnp.float32),
                      pltpu.VMEM((h, d), jnp.float32)],
      dimension_semantics=DIMENSION_SEMANTICS, interpret=interpret, name="sparse_attention_fwd")
  o, lse = call(idx, q, sink.astype(jnp.float32).reshape(h, 1), *([kv] * tile))
  return o, lse[..., 0]


def _backward_call(q, kv, idx, lse, delta, glse, do, scale, interpret):
  b, s, h, d = q.shape
  k = idx.shape[-1]
  idx, tile, kp = _tiled_slots(idx)
  n_tiles = kp // tile
  token, token_col, rows = _specs(h, d, tile)
  drows_spec = pl.BlockSpec((None, None, tile, d), drows_index_map)
  call = kernel_call(
      functools.partial(_backward_kernel, scale=scale, tile=tile, n_tiles=n_tiles),
      grid=grid(b, s, kp, tile), num_scalar_prefetch=1,
      in_specs=[token, token, token_col, token_col, token_col] + rows, out_specs=[token, drows_spec],
      out_shape=[jax.ShapeDtypeStruct(q.shape, jnp.float32), jax.ShapeDtypeStruct((b, s, kp, d), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((h, d), jnp.float32)],
      dimension_semantics=DIMENSION_SEMANTICS, interpret=interpret, name="sparse_attention_bwd")
  col = lambda x: x.astype(jnp.float32)[..., None]
  dq, drows = call(idx, q, do, col(lse), col(delta), col(glse), *([kv] * tile))
  return dq, drows[:, :, :k]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _attend(q, kv, sink, idx, scale, interpret):
  return _forward_call(q, kv, sink, idx, scale, interpret)


def _attend_fwd(q, kv, sink, idx, scale, interpret):
  o, lse = _forward_call(q, kv, sink, idx, scale, interpret)
  return (o, lse), (q, kv, sink, idx, o, lse)


def _attend_bwd(scale, interpret, residuals, cotangents):
  q, kv, sink, idx, o, lse = residuals
  do, glse = cotangents
  delta = jnp.sum(do.astype(jnp.float32) * o.astype(jnp.float32), axis=-1)
  dq, drows = _backward_call(q, kv, idx, lse, delta, glse, do, scale, interpret)
  b, n, d = kv.shape
  target = jnp.where(idx >= 0, idx, n).reshape(b, -1)  # −1 slots scatter out of range: dropped
  dkv = jax.vmap(lambda t, g: jnp.zeros((n, d), jnp.float32).at[t].add(g, mode="drop"))(
      target, drows.reshape(b, -1, d))
  dsink = jnp.sum(jnp.exp(sink.astype(jnp.float32) - lse) * (glse - delta), axis=(0, 1))
  return (dq.astype(q.dtype), dkv.astype(kv.dtype), dsink.astype(sink.dtype),
          np.zeros(idx.shape, dtype=jax.dtypes.float0))


_attend.defvjp(_attend_fwd, _attend_bwd)


def check_arguments(q: jax.Array, kv: jax.Array, sink: jax.Array, idx: jax.Array) -> None:
  """The shape contract of sparse attention (this kernel and the XLA reference alike)."""
  b, s, h, d = q.shape
  if kv.ndim != 3 or kv.shape[0] != b or kv.shape[-1] != d:
    raise ValueError(f"sparse_attention: kv must be [B={b}, N, D={d}], got {kv.shape}")
  if idx.shape[:2] != (b, s) or idx.ndim != 3:
    raise ValueError(f"sparse_attention: idx must be [B={b}, S={s}, K], got {idx.shape}")
  if sink.shape != (h,):
    raise ValueError(f"sparse_attention: sink must be [H={h}], got {sink.shape}")


def sparse_attention(q: jax.Array, kv: jax.Array, sink: jax.Array, idx: jax.Array, *,
                     scale: float | None = None, chunk_size: int | None = 256, return_lse: bool = False,
                     interpret=None):
  """Sparse shared-KV attention (Pallas); drop-in for dsv4_jax.ops.sparse_attention.

  Args:
    q: [B, S, H, D] queries.
    kv: [B, N, D] rows used as both keys and values.
    sink: [H] per-head sink logits (denominator only).
    idx: [B, S, K] int rows of `kv` each query attends to, in [0, N); −1 marks an empty slot.
    scale: logit scale, default D^-0.5.
    chunk_size: queries per chunk (None: one chunk); bounds the backward's per-slot row gradients.
    return_lse: also return the fp32 log-sum-exp [B, S, H] (sink included; differentiable).
    interpret: None = interpret on CPU, compile on TPU; True or a pltpu.InterpretParams to force.
  Returns:
    o [B, S, H, D] in q's dtype (and lse).
  """
  check_arguments(q, kv, sink, idx)
  s, d = q.shape[1], q.shape[3]
  if idx.shape[-1] == 0:
    raise ValueError("sparse_attention: idx must have at least one slot (K ≥ 1), got K = 0")
  scale = float(d ** -0.5 if scale is None else scale)
  interpret = resolve_interpret(interpret, "pallas_kernels.sparse_attention")
  attend = lambda q_c, idx_c: _attend(q_c, kv, sink, idx_c, scale, interpret)
  if chunk_size is None or s <= chunk_size:
    o, lse = attend(q, idx)
  else:
    o, lse = map_query_chunks(attend, chunk_size, q, idx)
  return (o, lse) if return_lse else o
