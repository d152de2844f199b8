"""Pallas lightning-indexer scores with the causal compressed-entry mask, GPU variant (Triton).

Same function, signature and argument checks as `pallas_kernels.indexer` (the TPU variant):
  score[b, t, i] = Σ_h w[b, t, h] · ReLU(q[b, t, h] · k[b, i])     if entry i is visible to query t
                 = −inf                                             otherwise
where "visible" is `index_rules.entry_visible(t, i, ratio)` (i < (t + 1) // ratio), the model's one
definition, looked up at trace time; `ratio=None` skips the mask. Shapes: q [B, C, Hi, Di], w [B, C, Hi],
k [B, N, Di], rows [B, C] (query positions t); scores [B, C, N] fp32.

Kernel layout. The wrapper lays q out as [B, Hi, Cp, Dp] and w as [B, Hi, Cp] (heads leading, so a head's
[bc, Dp] tile is one load), pads the query rows to Cp with position −1 (sees nothing), the entries to Np
(zeros) and the head dim to a power of two Dp ≥ 16 (zeros); bc and bn are powers of two.
  scores  grid (B, Cp/bc, Np/bn): one [bc, bn] tile per program, a loop over the Hi heads with one
          [bc, Dp]·[Dp, bn] matmul each (no [C, Hi, N] tensor).
  dq, dw  grid (B, Cp/bc, Hi): one (query tile, head) per program, a loop over the entry tiles:
            dq[t,h] = w[t,h] Σ_i ḡ[t,i]·1[q_h·k_i > 0]·k_i,   dw[t,h] = Σ_i ḡ[t,i]·ReLU(q_h·k_i)
  dk      grid (B, Np/bn): one entry tile per program, loops over the query tiles and the heads:
            dk[i] = Σ_{t,h} ḡ[t,i]·w[t,h]·1[q_h·k_i > 0]·q[t,h]
(ḡ zeroed at masked entries). Every output block is owned by one program.

Causal tile skip: an entry tile is `tile_is_live` for a query tile iff its first entry is visible to the
tile's latest query; visibility is monotone (proved for the rule as it is), so a dead tile holds no
visible entry for any query of the tile: the forward writes −inf there without computing, the backward
loops skip it. About half of all (query, entry) tile pairs of a causal sequence are skipped.

Blocks QUERY_TILE × ENTRY_TILE (32 × 64), num_warps 4, num_stages 2: chosen for Hi = 64, Di = 128 (Flash)
on an H200, not tuned on hardware. The dk grid has only B · Np / bn programs (16 for one 4096-token
sequence): short sequences leave most of a GPU idle there.

Integer arithmetic: `entry` ((tile, lane) -> entry) and the rule are shared with the TPU variant; the
grids, index maps, tile walks and the skip are proved by `pallas_kernels.verify.gpu.indexer`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl

from pallas_kernels import index_rules
from pallas_kernels import indexer as layout
from pallas_kernels.common import resolve_interpret
from pallas_kernels.gpu import common
from pallas_kernels.gpu.common import dot, pad_axis
from pallas_kernels.indexer import check_arguments
from pallas_kernels.intmath import floordiv

QUERY_TILE = 32
ENTRY_TILE = 64
NUM_WARPS = 4
NUM_STAGES = 2


# ---- integer index arithmetic (proved by pallas_kernels.verify.gpu.indexer) ----

def grid(b, c_padded, n_padded, bc, bn):
  """Scores: (batch, query tile, entry tile)."""
  return (b, floordiv(c_padded, bc), floordiv(n_padded, bn))


def grid_dq(b, c_padded, hi, bc):
  """dq / dw: (batch, query tile, head)."""
  return (b, floordiv(c_padded, bc), hi)


def grid_dk(b, n_padded, bn):
  """dk: (batch, entry tile)."""
  return (b, floordiv(n_padded, bn))


def tile_is_live(t_max, ni, bn, ratio):
  """Entry tile ni may hold an entry visible to a query at a position ≤ t_max: its first entry is."""
  return index_rules.entry_visible(t_max, layout.entry(ni, 0, bn), ratio)


# scores grid (bi, ci, ni)
def q_tile_map(bi, ci, ni):
  """q [B, Hi, Cp, Dp] in blocks (None, Hi, bc, Dp): every head of the query tile."""
  return (bi, 0, ci, 0)


def w_tile_map(bi, ci, ni):
  """w [B, Hi, Cp] in blocks (None, Hi, bc)."""
  return (bi, 0, ci)


def rows_tile_map(bi, ci, ni):
  """rows [B, Cp] in blocks (None, bc)."""
  return (bi, ci)


def k_tile_map(bi, ci, ni):
  """k [B, Np, Dp] in blocks (None, bn, Dp)."""
  return (bi, ni, 0)


def score_tile_map(bi, ci, ni):
  """scores [B, Cp, Np] in blocks (None, bc, bn)."""
  return (bi, ci, ni)


# dq / dw grid (bi, ci, h)
def dq_head_map(bi, ci, h):
  """q, dq [B, Hi, Cp, Dp] in blocks (None, None, bc, Dp): head h of the query tile."""
  return (bi, h, ci, 0)


def dq_w_map(bi, ci, h):
  """w, dw [B, Hi, Cp] in blocks (None, None, bc)."""
  return (bi, h, ci)


def dq_rows_map(bi, ci, h):
  """rows [B, Cp] in blocks (None, bc)."""
  return (bi, ci)


def dq_k_map(bi, ci, h):
  """k [B, Np, Dp] in blocks (None, Np, Dp): all entries, walked in-kernel in tiles of bn."""
  return (bi, 0, 0)


def dq_g_map(bi, ci, h):
  """ḡ [B, Cp, Np] in blocks (None, bc, Np): the query tile's cotangent row."""
  return (bi, ci, 0)


# dk grid (bi, ni)
def dk_q_map(bi, ni):
  """q [B, Hi, Cp, Dp] in blocks (None, Hi, Cp, Dp): all queries, walked in-kernel in tiles of bc."""
  return (bi, 0, 0, 0)


def dk_w_map(bi, ni):
  """w [B, Hi, Cp] in blocks (None, Hi, Cp)."""
  return (bi, 0, 0)


def dk_rows_map(bi, ni):
  """rows [B, Cp] in blocks (None, Cp)."""
  return (bi, 0)


def dk_k_map(bi, ni):
  """k, dk [B, Np, Dp] in blocks (None, bn, Dp)."""
  return (bi, ni, 0)


def dk_g_map(bi, ni):
  """ḡ [B, Cp, Np] in blocks (None, Cp, bn): the entry tile's cotangent column."""
  return (bi, 0, ni)


# ---- kernels ----

def _visible(rows, ni, bn, ratio):
  """[bc, bn] mask of entry tile ni for query positions rows [bc] (`index_rules.entry_visible`)."""
  lane = jax.lax.broadcasted_iota(jnp.int32, (1, bn), 1)
  return index_rules.entry_visible(rows[:, None], layout.entry(ni, lane, bn), ratio)


def _live(rows, ni, bn, ratio):
  return True if ratio is None else tile_is_live(jnp.max(rows), ni, bn, ratio)


def _when(cond, fn, *args):
  """fn(*args) if cond (a traced bool, or True) else args[0]: a lax.cond that skips work."""
  if cond is True:
    return fn(*args)
  return jax.lax.cond(cond, fn, lambda *a: a[0], *args)


def _scores_kernel(q_ref, w_ref, rows_ref, k_ref, s_ref, *, n_heads, ratio):
  bc, bn = s_ref.shape
  ni = pl.program_id(2)
  rows = rows_ref[...]

  def compute(dead):
    k = k_ref[...]

    def head(h, acc):
      return acc + w_ref[h, :].astype(jnp.float32)[:, None] * jnp.maximum(dot(q_ref[h, :, :], k, trans_b=True), 0.0)

    acc = jax.lax.fori_loop(0, n_heads, head, jnp.zeros((bc, bn), jnp.float32))
    return acc if ratio is None else jnp.where(_visible(rows, ni, bn, ratio), acc, dead)

  # a dead tile (no entry visible to any of its queries) is all −inf, written without computing
  s_ref[...] = _when(_live(rows, ni, bn, ratio), compute, jnp.full((bc, bn), -jnp.inf, jnp.float32))


def _dq_dw_kernel(q_ref, w_ref, rows_ref, k_ref, g_ref, dq_ref, dw_ref, *, ratio, bn, n_entry_tiles):
  q = q_ref[...]
  w = w_ref[...].astype(jnp.float32)[:, None]
  rows = rows_ref[...]
  t_max = jnp.max(rows)

  def entry_tile(ni, carry):
    def compute(carry):
      dq, dw = carry
      cols = pl.ds(common.tile_start(ni, bn), bn)
      k = k_ref[cols, :]
      g = g_ref[:, cols]
      if ratio is not None:
        g = jnp.where(_visible(rows, ni, bn, ratio), g, 0.0)
      dots = dot(q, k, trans_b=True)  # [bc, bn]
      gate = jnp.where(dots > 0, g * w, 0.0)
      return dq + dot(gate.astype(k.dtype), k), dw + jnp.sum(g * jnp.maximum(dots, 0.0), axis=1)

    return _when(True if ratio is None else tile_is_live(t_max, ni, bn, ratio), compute, carry)

  init = (jnp.zeros(q.shape, jnp.float32), jnp.zeros(rows.shape, jnp.float32))
  dq, dw = jax.lax.fori_loop(0, n_entry_tiles, entry_tile, init)
  dq_ref[...] = dq
  dw_ref[...] = dw


def _dk_kernel(q_ref, w_ref, rows_ref, k_ref, g_ref, dk_ref, *, n_heads, ratio, bc, n_query_tiles):
  ni = pl.program_id(1)
  k = k_ref[...]
  bn = k.shape[0]

  def query_tile(ci, dk):
    span = pl.ds(common.tile_start(ci, bc), bc)
    rows = rows_ref[span]

    def compute(dk):
      g = g_ref[span, :]
      if ratio is not None:
        g = jnp.where(_visible(rows, ni, bn, ratio), g, 0.0)

      def head(h, dk):
        q = q_ref[h, span, :]
        gate = jnp.where(dot(q, k, trans_b=True) > 0, g * w_ref[h, span].astype(jnp.float32)[:, None], 0.0)
        return dk + dot(gate.astype(q.dtype), q, trans_a=True)  # [bn, Dp]

      return jax.lax.fori_loop(0, n_heads, head, dk)

    return _when(_live(rows, ni, bn, ratio), compute, dk)

  dk_ref[...] = jax.lax.fori_loop(0, n_query_tiles, query_tile, jnp.zeros(k.shape, jnp.float32))


def _tiles(c, n, di):
  bc = common.block_size(c, common.MIN_DOT, QUERY_TILE)
  bn = common.block_size(n, common.MIN_DOT, ENTRY_TILE)
  return bc, bn, common.padded(c, bc), common.padded(n, bn), common.block_size(di, common.MIN_DOT, 1 << 30)


def _layout(q, w, k, rows, cp, np_, dp):
  """q [B, Hi, Cp, Dp], w [B, Hi, Cp], rows [B, Cp] (−1 padding), k [B, Np, Dp]; q and k in one dtype
  (tl.dot multiplies equal types: e.g. bf16 queries with the fp32-pooled compressed keys -> fp32)."""
  dt = jnp.promote_types(q.dtype, k.dtype)
  q_t = pad_axis(pad_axis(jnp.swapaxes(q.astype(dt), 1, 2), 2, cp), 3, dp)
  w_t = pad_axis(jnp.swapaxes(w, 1, 2), 2, cp)
  rows_t = pad_axis(rows.astype(jnp.int32), 1, cp, fill=-1)
  return q_t, w_t, rows_t, pad_axis(pad_axis(k.astype(dt), 1, np_), 2, dp)


def _scores_call(q, w, k, rows, ratio, interpret):
  b, c, hi, di = q.shape
  n = k.shape[1]
  bc, bn, cp, np_, dp = _tiles(c, n, di)
  (scores,) = common.triton_call(
      functools.partial(_scores_kernel, n_heads=hi, ratio=ratio),
      grid=grid(b, cp, np_, bc, bn),
      in_specs=[pl.BlockSpec((None, hi, bc, dp), q_tile_map), pl.BlockSpec((None, hi, bc), w_tile_map),
                pl.BlockSpec((None, bc), rows_tile_map), pl.BlockSpec((None, bn, dp), k_tile_map)],
      out_specs=[pl.BlockSpec((None, bc, bn), score_tile_map)],
      out_shape=[jax.ShapeDtypeStruct((b, cp, np_), jnp.float32)],
      num_warps=NUM_WARPS, num_stages=NUM_STAGES, interpret=interpret, name="indexer_scores_gpu",
  )(*_layout(q, w, k, rows, cp, np_, dp))
  return scores[:, :c, :n]


def _grad_call(q, w, k, rows, g, ratio, interpret):
  b, c, hi, di = q.shape
  n = k.shape[1]
  bc, bn, cp, np_, dp = _tiles(c, n, di)
  q_t, w_t, rows_t, k_t = _layout(q, w, k, rows, cp, np_, dp)
  g_t = pad_axis(pad_axis(g.astype(jnp.float32), 1, cp), 2, np_)
  dq, dw = common.triton_call(
      functools.partial(_dq_dw_kernel, ratio=ratio, bn=bn, n_entry_tiles=common.tile_count(np_, bn)),
      grid=grid_dq(b, cp, hi, bc),
      in_specs=[pl.BlockSpec((None, None, bc, dp), dq_head_map), pl.BlockSpec((None, None, bc), dq_w_map),
                pl.BlockSpec((None, bc), dq_rows_map), pl.BlockSpec((None, np_, dp), dq_k_map),
                pl.BlockSpec((None, bc, np_), dq_g_map)],
      out_specs=[pl.BlockSpec((None, None, bc, dp), dq_head_map), pl.BlockSpec((None, None, bc), dq_w_map)],
      out_shape=[jax.ShapeDtypeStruct((b, hi, cp, dp), jnp.float32), jax.ShapeDtypeStruct((b, hi, cp), jnp.float32)],
      num_warps=NUM_WARPS, num_stages=NUM_STAGES, interpret=interpret, name="indexer_scores_dq_dw_gpu",
  )(q_t, w_t, rows_t, k_t, g_t)
  (dk,) = common.triton_call(
      functools.partial(_dk_kernel, n_heads=hi, ratio=ratio, bc=bc, n_query_tiles=common.tile_count(cp, bc)),
      grid=grid_dk(b, np_, bn),
      in_specs=[pl.BlockSpec((None, hi, cp, dp), dk_q_map), pl.BlockSpec((None, hi, cp), dk_w_map),
                pl.BlockSpec((None, cp), dk_rows_map), pl.BlockSpec((None, bn, dp), dk_k_map),
                pl.BlockSpec((None, cp, bn), dk_g_map)],
      out_specs=[pl.BlockSpec((None, bn, dp), dk_k_map)],
      out_shape=[jax.ShapeDtypeStruct((b, np_, dp), jnp.float32)],
      num_warps=NUM_WARPS, num_stages=NUM_STAGES, interpret=interpret, name="indexer_scores_dk_gpu",
  )(q_t, w_t, rows_t, k_t, g_t)
  return jnp.swapaxes(dq[:, :, :c, :di], 1, 2), jnp.swapaxes(dw[:, :, :c], 1, 2), dk[:, :n, :di]


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _scores(q, w, k, rows, ratio, interpret):
  return _scores_call(q, w, k, rows, ratio, interpret)


def _scores_fwd(q, w, k, rows, ratio, interpret):
  return _scores_call(q, w, k, rows, ratio, interpret), (q, w, k, rows)


def _scores_bwd(ratio, interpret, residuals, g):
  q, w, k, rows = residuals
  dq, dw, dk = _grad_call(q, w, k, rows, g, ratio, interpret)
  return (dq.astype(q.dtype), dw.astype(w.dtype), dk.astype(k.dtype),
          np.zeros(rows.shape, dtype=jax.dtypes.float0))


_scores.defvjp(_scores_fwd, _scores_bwd)


def indexer_scores(q: jax.Array, w: jax.Array, k: jax.Array, *, ratio: int | None = None,
                   rows: jax.Array | None = None, interpret=None) -> jax.Array:
  """q [B, C, Hi, Di], w [B, C, Hi], k [B, N, Di] -> fp32 scores [B, C, N] (−inf where not visible).

  ratio: compression ratio for the causal mask (None: no mask). rows [B, C]: query positions t
  (default 0..C−1). Differentiable in q, w and k. interpret: None = interpret on CPU, Triton on GPU.
  """
  rows = check_arguments(q, w, k, ratio, rows)
  interpret = resolve_interpret(interpret, "pallas_kernels.gpu.indexer_scores", variant="gpu")
  return _scores(q, w, k, rows, ratio, interpret)
