"""Pallas sparse shared-KV attention with an attention sink, GPU variant (Triton): forward with LSE, backward.

Same function, signature and argument checks as `pallas_kernels.sparse_attention` (the TPU variant) and
the XLA reference `dsv4_jax.ops.sparse_attention`:
  o[b,s,h] = Σ_k p[b,s,h,k] · kv[b, idx[b,s,k]],     ℓ[b,s,h,k] = scale · q[b,s,h] · kv[b, idx[b,s,k]]
  p = exp(ℓ − lse),   lse[b,s,h] = log(exp(sink[h]) + Σ_{k: idx ≥ 0} exp(ℓ[b,s,h,k]))
Shapes: q [B, S, H, D], kv [B, N, D], sink [H], idx [B, S, K] (−1 = empty slot); o [B, S, H, D] in q's
dtype, lse [B, S, H] fp32.

Kernel layout. The wrapper pads heads to Hp (a multiple of the head block hb, zeros), the head dim to a
power of two Dp ≥ 16 (zeros: no change to any dot product) and the slots to Kp (a multiple of the row
tile T, with −1); hb, Dp and T are powers of two, as Triton requires. Grid (B, S, Hp/hb): one
program per token and head block; its q block is [hb, Dp], its idx block all Kp slots of the token,
its kv block the whole [N, Dp] row array of the batch row. An in-kernel loop walks the slots in tiles of T: the tile's indices
are loaded as a vector, the rows are gathered from HBM with one Triton gather load
(`kv_ref[safe_row(idx), :]`, −1 slots read row 0 and are masked to −inf), and an online softmax that
starts from the sink (m = sink, l = 1) accumulates o in registers. Nothing the size of [S, K, D] is
materialised.

Backward (custom_vjp), recomputing p from the saved lse (no probabilities stored):
  dp = do · rowᵀ,  ds = p ⊙ (dp − Δ + ḡ_lse),  Δ = Σ_d do ⊙ o
  dq = scale · ds · rows,   drow = scale · dsᵀ q + pᵀ do,   dsink = Σ_{b,s} exp(sink − lse) (ḡ_lse − Δ)
Same grid; dq accumulates over the slot tiles in registers, and every tile's row gradients are
scatter-added straight into an fp32 dkv [B, N, Dp] with atomic adds (a row is shared by many tokens);
masked slots add exact zeros to row 0. No [B, S, K, D] per-slot gradient is written (the TPU variant
writes one and lets XLA scatter it). Atomic fp32 adds make dkv's summation order, and so its last bits,
run-dependent on GPU.

Blocks: hb = BLOCK_HEADS = 16, T = ROWS_FORWARD = 32 / ROWS_BACKWARD = 16 (all ≥ 16 for tl.dot),
num_warps 4 forward / 8 backward, num_stages 2; chosen for an H200 at Flash sizes (H = 64, D = 512,
K = 640) so that the fp32 accumulators ([hb, Dp], and [T, Dp] in the backward) fit in registers, but
not tuned on hardware.

Integer arithmetic: the slot layout (`padded_slots`, `slot_valid`, `safe_row`) is the TPU variant's,
shared; the grid, the index maps below and the tile walk (`common.tile_start`) are proved by
`pallas_kernels.verify.gpu.sparse_attention`. Callers build idx with `pallas_kernels.index_rules`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels import sparse_attention as layout
from pallas_kernels.common import map_query_chunks, resolve_interpret
from pallas_kernels.gpu import common
from pallas_kernels.gpu.common import dot, pad_axis
from pallas_kernels.intmath import floordiv
from pallas_kernels.sparse_attention import check_arguments

BLOCK_HEADS = 16
ROWS_FORWARD = 32
ROWS_BACKWARD = 16
NUM_WARPS = 4
NUM_WARPS_BACKWARD = 8  # q, do, dq and a tile's row gradients are all live in the backward
NUM_STAGES = 2


# ---- integer index arithmetic (proved by pallas_kernels.verify.gpu.sparse_attention) ----

def grid(b, s, h_padded, hb):
  """(batch, token, head block): every program owns its token's head block; all axes parallel."""
  return (b, s, floordiv(h_padded, hb))


def head_index_map(bi, si, hg):
  """q, o, do, dq [B, S, Hp, Dp] in blocks (None, None, hb, Dp)."""
  return (bi, si, hg, 0)


def head_column_index_map(bi, si, hg):
  """lse, Δ, ḡ_lse [B, S, Hp] in blocks (None, None, hb)."""
  return (bi, si, hg)


def sink_index_map(bi, si, hg):
  """sink [Hp] in blocks (hb,)."""
  return (hg,)


def slots_index_map(bi, si, hg):
  """idx [B, S, Kp] in blocks (None, None, Kp): all slots of the token."""
  return (bi, si, 0)


def rows_index_map(bi, si, hg):
  """kv, dkv [B, N, Dp] in blocks (None, N, Dp): the batch row's whole array, gathered in-kernel."""
  return (bi, 0, 0)


# ---- kernels ----

def _tile(idx_ref, kv_ref, kt, tile):
  """Tile kt of the token's slots -> (valid [T], safe rows [T], gathered kv rows [T, Dp])."""
  idx = idx_ref[pl.ds(common.tile_start(kt, tile), tile)]
  rows = layout.safe_row(idx)
  return layout.slot_valid(idx), rows, kv_ref[rows, :]


def _forward_kernel(q_ref, sink_ref, idx_ref, kv_ref, o_ref, lse_ref, *, scale, tile, n_tiles):
  q = q_ref[...]

  def step(kt, carry):
    m, l, acc = carry
    valid, _, rows = _tile(idx_ref, kv_ref, kt, tile)
    logits = jnp.where(valid[None, :], dot(q, rows, trans_b=True) * scale, -jnp.inf)  # [hb, T]
    m_new = jnp.maximum(m, jnp.max(logits, axis=1))
    alpha = jnp.exp(m - m_new)
    p = jnp.exp(logits - m_new[:, None])
    return m_new, alpha * l + jnp.sum(p, axis=1), alpha[:, None] * acc + dot(p.astype(rows.dtype), rows)

  m0 = sink_ref[...]  # the sink is a logit of value exp(sink − sink) = 1 in the denominator
  init = (m0, jnp.ones_like(m0), jnp.zeros(q.shape, jnp.float32))
  m, l, acc = jax.lax.fori_loop(0, n_tiles, step, init)
  o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
  lse_ref[...] = m + jnp.log(l)


def _backward_kernel(q_ref, do_ref, lse_ref, delta_ref, glse_ref, idx_ref, kv_ref, dq_ref, dkv_ref, *, scale,
                     tile, n_tiles):
  q, do = q_ref[...], do_ref[...]
  lse = lse_ref[...][:, None]
  shift = (glse_ref[...] - delta_ref[...])[:, None]

  def step(kt, dq):
    valid, safe, rows = _tile(idx_ref, kv_ref, kt, tile)
    logits = jnp.where(valid[None, :], dot(q, rows, trans_b=True) * scale, -jnp.inf)
    p = jnp.exp(logits - lse)  # [hb, T], 0 at masked slots
    ds = p * (dot(do, rows, trans_b=True) + shift)
    drows = (scale * dot(ds.astype(q.dtype), q, trans_a=True)
             + dot(p.astype(do.dtype), do, trans_a=True))  # [T, Dp]
    jax.ref.addupdate(dkv_ref, (safe, slice(None)), jnp.where(valid[:, None], drows, 0.0))
    return dq + scale * dot(ds.astype(rows.dtype), rows)

  dq_ref[...] = jax.lax.fori_loop(0, n_tiles, step, jnp.zeros(q.shape, jnp.float32))


def _specs(hb, dp, kp, n):
  heads = pl.BlockSpec((None, None, hb, dp), head_index_map)
  column = pl.BlockSpec((None, None, hb), head_column_index_map)
  slots = pl.BlockSpec((None, None, kp), slots_index_map)
  rows = pl.BlockSpec((None, n, dp), rows_index_map)
  return heads, column, slots, rows


def _layout(q, kv, idx, hb, tile):
  """Padded q [B, S, Hp, Dp], kv [B, N, Dp] (one dtype: tl.dot multiplies equal types), idx [B, S, Kp]
  (−1 padding) and (Hp, Dp, Kp)."""
  h, d, k = q.shape[2], q.shape[3], idx.shape[-1]
  hp, dp, kp = common.padded(h, hb), common.block_size(d, common.MIN_DOT, 1 << 30), layout.padded_slots(k, tile)
  dt = jnp.promote_types(q.dtype, kv.dtype)
  q = pad_axis(pad_axis(q.astype(dt), 2, hp), 3, dp)
  return q, pad_axis(kv.astype(dt), 2, dp), pad_axis(idx.astype(jnp.int32), 2, kp, fill=-1), (hp, dp, kp)


def _forward_call(q, kv, sink, idx, scale, interpret):
  b, s, h, d = q.shape
  hb, tile = BLOCK_HEADS, common.block_size(idx.shape[-1], common.MIN_DOT, ROWS_FORWARD)
  q_p, kv_p, idx_p, (hp, dp, kp) = _layout(q, kv, idx, hb, tile)
  heads, column, slots, rows = _specs(hb, dp, kp, kv.shape[1])
  o, lse = common.triton_call(
      functools.partial(_forward_kernel, scale=scale, tile=tile, n_tiles=common.tile_count(kp, tile)),
      grid=grid(b, s, hp, hb), in_specs=[heads, pl.BlockSpec((hb,), sink_index_map), slots, rows],
      out_specs=[heads, column],
      out_shape=[jax.ShapeDtypeStruct((b, s, hp, dp), q.dtype), jax.ShapeDtypeStruct((b, s, hp), jnp.float32)],
      num_warps=NUM_WARPS, num_stages=NUM_STAGES, interpret=interpret, name="sparse_attention_fwd_gpu",
  )(q_p, pad_axis(sink.astype(jnp.float32), 0, hp), idx_p, kv_p)
  return o[:, :, :h, :d], lse[:, :, :h]


def _backward_call(q, kv, idx, lse, delta, glse, do, scale, interpret):
  b, s, h, d = q.shape
  n = kv.shape[1]
  hb, tile = BLOCK_HEADS, common.block_size(idx.shape[-1], common.MIN_DOT, ROWS_BACKWARD)
  q_p, kv_p, idx_p, (hp, dp, kp) = _layout(q, kv, idx, hb, tile)
  heads, column, slots, rows = _specs(hb, dp, kp, n)
  heads_cols = lambda x: pad_axis(x.astype(jnp.float32), 2, hp)
  dq, dkv = common.triton_call(
      functools.partial(_backward_kernel, scale=scale, tile=tile, n_tiles=common.tile_count(kp, tile)),
      grid=grid(b, s, hp, hb), in_specs=[heads, heads, column, column, column, slots, rows],
      out_specs=[heads, rows],
      out_shape=[jax.ShapeDtypeStruct((b, s, hp, dp), jnp.float32), jax.ShapeDtypeStruct((b, n, dp), jnp.float32)],
      zero_outputs=(1,), num_warps=NUM_WARPS_BACKWARD, num_stages=NUM_STAGES, interpret=interpret,
      name="sparse_attention_bwd_gpu",
  )(q_p, pad_axis(pad_axis(do.astype(q_p.dtype), 2, hp), 3, dp), heads_cols(lse), heads_cols(delta),
    heads_cols(glse), idx_p, kv_p)
  return dq[:, :, :h, :d], dkv[:, :, :d]


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
  dq, dkv = _backward_call(q, kv, idx, lse, delta, glse, do, scale, interpret)
  dsink = jnp.sum(jnp.exp(sink.astype(jnp.float32) - lse) * (glse - delta), axis=(0, 1))
  return (dq.astype(q.dtype), dkv.astype(kv.dtype), dsink.astype(sink.dtype),
          np.zeros(idx.shape, dtype=jax.dtypes.float0))


_attend.defvjp(_attend_fwd, _attend_bwd)


def sparse_attention(q: jax.Array, kv: jax.Array, sink: jax.Array, idx: jax.Array, *,
                     scale: float | None = None, chunk_size: int | None = 256, return_lse: bool = False,
                     interpret=None):
  """Sparse shared-KV attention (Pallas, GPU / Triton); drop-in for dsv4_jax.ops.sparse_attention.

  Args:
    q: [B, S, H, D] queries.
    kv: [B, N, D] rows used as both keys and values.
    sink: [H] per-head sink logits (denominator only).
    idx: [B, S, K] int rows of `kv` each query attends to, in [0, N); −1 marks an empty slot.
    scale: logit scale, default D^-0.5.
    chunk_size: queries per chunk (None: one chunk), as in the reference.
    return_lse: also return the fp32 log-sum-exp [B, S, H] (sink included; differentiable).
    interpret: None = interpret on CPU, compile (Triton) on GPU; True to force the interpreter; False to
      compile (e.g. to lower for CUDA from a CPU host with jax.export).
  Returns:
    o [B, S, H, D] in q's dtype (and lse).
  """
  check_arguments(q, kv, sink, idx)
  s, d = q.shape[1], q.shape[3]
  if idx.shape[-1] == 0:
    raise ValueError("sparse_attention: idx must have at least one slot (K ≥ 1), got K = 0")
  scale = float(d ** -0.5 if scale is None else scale)
  interpret = resolve_interpret(interpret, "pallas_kernels.gpu.sparse_attention", variant="gpu")
  attend = lambda q_c, idx_c: _attend(q_c, kv, sink, idx_c, scale, interpret)
  if chunk_size is None or s <= chunk_size:
    o, lse = attend(q, idx)
  else:
    o, lse = map_query_chunks(attend, chunk_size, q, idx)
  return (o, lse) if return_lse else o
