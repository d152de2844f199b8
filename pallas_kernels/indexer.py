"""Pallas lightning-indexer scores with the causal compressed-entry mask (top-k selection: dsv4_jax.ops.indexer).

  score[b, t, i] = Σ_h w[b, t, h] · ReLU(q[b, t, h] · k[b, i])     if entry i is visible to query t
                 = −inf                                             otherwise
  entry i is visible to the query at position t  iff  i < (t + 1) // ratio
(entry i pools tokens i·r .. i·r + r − 1, so it exists once all of them are ≤ t). The mask is
`index_rules.entry_visible`, the model's one definition of the rule, looked up at trace time.

Shapes: q [B, C, Hi, Di], w [B, C, Hi], k [B, N, Di], rows [B, C] (query positions, default 0..C−1);
scores [B, C, N] fp32. `ratio=None` skips the mask (then equal to dsv4_jax.ops.indexer.indexer_scores).

Kernel layout. Grid (B, C/bc, N/bn), all axes parallel: each program computes one [bc, bn] tile of
scores, looping over the Hi heads with one [bc, Di]·[Di, bn] matmul each, so no [C, Hi, N] tensor is
ever built. Backward (custom_vjp, recomputing the dots):
  dq[t,h] = w[t,h] Σ_i ḡ[t,i]·1[q_h·k_i > 0]·k_i,   dw[t,h] = Σ_i ḡ[t,i]·ReLU(q_h·k_i)
  dk[i]   = Σ_{t,h} ḡ[t,i]·w[t,h]·1[q_h·k_i > 0]·q[t,h]          (ḡ zeroed at masked entries)
in two kernels: dq/dw accumulate over entry tiles (grid (B, C/bc, N/bn), last axis sequential), dk
accumulates over query tiles (grid (B, N/bn, C/bc), last axis sequential), so every output block is
owned by one program.

Backends: interpret on CPU (default there); written for TPU Mosaic (bn a multiple of 128 lanes, bc of
8 sublanes, heads on the leading block axis); `interpret=None` refuses GPU, whose variant (power-of-two
blocks, in-kernel loops instead of scratch accumulators, and a causal tile skip) is
pallas_kernels/gpu/indexer.py. The causal tile skip is not implemented here.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from pallas_kernels import index_rules
from pallas_kernels.common import kernel_call, resolve_interpret
from pallas_kernels.intmath import cdiv, floordiv

QUERY_TILE = 128
ENTRY_TILE = 512
SUBLANES, LANES = 8, 128


# ---- integer index arithmetic (used by the kernels and proved by pallas_kernels.verify) ----

def padded(n, tile):
  return cdiv(n, tile) * tile


def grid(b, c_padded, n_padded, bc, bn):
  """Forward and dq/dw grid: (batch, query tile, entry tile)."""
  return (b, floordiv(c_padded, bc), floordiv(n_padded, bn))


def grid_dk(b, c_padded, n_padded, bc, bn):
  """dk grid: (batch, entry tile, query tile); the query-tile axis accumulates."""
  return (b, floordiv(n_padded, bn), floordiv(c_padded, bc))


def head_query_block(bi, ci):
  """q [B, Hi, Cp, Di] and w [B, Hi, Cp, 1] blocks (None, Hi, bc, Di|1)."""
  return (bi, 0, ci, 0)


def rows_block(bi, ci):
  """rows [B, Cp, 1] block (None, bc, 1)."""
  return (bi, ci, 0)


def key_block(bi, ni):
  """k [B, Np, Di] block (None, bn, Di)."""
  return (bi, ni, 0)


def score_block(bi, ci, ni):
  """scores [B, Cp, Np] block (None, bc, bn)."""
  return (bi, ci, ni)


def entry(ni, lane, bn):
  """Compressed-entry index of lane `lane` of entry tile ni."""
  return ni * bn + lane


# index maps: forward / dq-dw grid (bi, ci, ni); dk grid (bi, ni, ci). The two sets name the same blocks
# on purpose, one per grid in that grid's argument order, so each contract is proved against its own maps.
def q_index_map(bi, ci, ni):
  return head_query_block(bi, ci)


def rows_index_map(bi, ci, ni):
  return rows_block(bi, ci)


def k_index_map(bi, ci, ni):
  return key_block(bi, ni)


def score_index_map(bi, ci, ni):
  return score_block(bi, ci, ni)


def dk_q_index_map(bi, ni, ci):
  return head_query_block(bi, ci)


def dk_rows_index_map(bi, ni, ci):
  return rows_block(bi, ci)


def dk_k_index_map(bi, ni, ci):
  return key_block(bi, ni)


def dk_score_index_map(bi, ni, ci):
  return score_block(bi, ci, ni)


def is_first_tile(step):
  return step == 0


def is_last_tile(step, n_steps):
  return step == n_steps - 1


# ---- kernels ----

def _visible(rows_ref, ni, bc, bn, ratio):
  """[bc, bn] mask of tile (·, ni); all True when ratio is None."""
  if ratio is None:
    return jnp.ones((bc, bn), jnp.bool_)
  lane = jax.lax.broadcasted_iota(jnp.int32, (1, bn), 1)
  return index_rules.entry_visible(rows_ref[...], entry(ni, lane, bn), ratio)


def _head_dots(q_ref, k, h):
  """[bc, bn] fp32 dots of head h's queries with the entry tile."""
  return jax.lax.dot_general(q_ref[h], k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _scores_kernel(q_ref, w_ref, rows_ref, k_ref, s_ref, *, n_heads, ratio):
  bc, bn = s_ref.shape
  k = k_ref[...]

  def head(h, acc):
    return acc + w_ref[h].astype(jnp.float32) * jnp.maximum(_head_dots(q_ref, k, h), 0.0)

  acc = jax.lax.fori_loop(0, n_heads, head, jnp.zeros((bc, bn), jnp.float32))
  s_ref[...] = jnp.where(_visible(rows_ref, pl.program_id(2), bc, bn, ratio), acc, -jnp.inf)


def _dq_dw_kernel(q_ref, w_ref, rows_ref, k_ref, g_ref, dq_ref, dw_ref, dq_acc, dw_acc, *, n_heads, ratio,
                  n_tiles):
  ni = pl.program_id(2)
  bc, bn = g_ref.shape

  @pl.when(is_first_tile(ni))
  def _init():
    dq_acc[...] = jnp.zeros_like(dq_acc)
    dw_acc[...] = jnp.zeros_like(dw_acc)

  k = k_ref[...]
  k_f32 = k.astype(jnp.float32)
  g = jnp.where(_visible(rows_ref, ni, bc, bn, ratio), g_ref[...], 0.0)

  @pl.loop(0, n_heads)
  def _head(h):
    dots = _head_dots(q_ref, k, h)
    dw_acc[h] += jnp.sum(g * jnp.maximum(dots, 0.0), axis=1, keepdims=True)
    gate = jnp.where(dots > 0, g * w_ref[h].astype(jnp.float32), 0.0)
    dq_acc[h] += jnp.dot(gate, k_f32, preferred_element_type=jnp.float32)

  @pl.when(is_last_tile(ni, n_tiles))
  def _finish():
    dq_ref[...] = dq_acc[...]
    dw_ref[...] = dw_acc[...]


def _dk_kernel(q_ref, w_ref, rows_ref, k_ref, g_ref, dk_ref, dk_acc, *, n_heads, ratio, n_tiles):
  ni, ci = pl.program_id(1), pl.program_id(2)
  bc, bn = g_ref.shape

  @pl.when(is_first_tile(ci))
  def _init():
    dk_acc[...] = jnp.zeros_like(dk_acc)

  k = k_ref[...]
  g = jnp.where(_visible(rows_ref, ni, bc, bn, ratio), g_ref[...], 0.0)

  def head(h, acc):
    dots = _head_dots(q_ref, k, h)
    gate = jnp.where(dots > 0, g * w_ref[h].astype(jnp.float32), 0.0)
    return acc + jax.lax.dot_general(gate, q_ref[h].astype(jnp.float32), (((0,), (0,)), ((), ())),
                                     preferred_element_type=jnp.float32)

  dk_acc[...] += jax.lax.fori_loop(0, n_heads, head, jnp.zeros(dk_acc.shape, jnp.float32))

  @pl.when(is_last_tile(ci, n_tiles))
  def _finish():
    dk_ref[...] = dk_acc[...]


def _tiles(c, n):
  bc = min(QUERY_TILE, padded(c, SUBLANES))
  bn = min(ENTRY_TILE, padded(n, LANES))
  return bc, bn, padded(c, bc), padded(n, bn)


def _layout(q, w, k, rows, cp, np_):
  """Kernel layouts: q [B, Hi, Cp, Di], w [B, Hi, Cp, 1], rows [B, Cp, 1], k [B, Np, Di] (zero padded)."""
  c, n = q.shape[1], k.shape[1]
  q_t = jnp.pad(jnp.swapaxes(q, 1, 2), [(0, 0), (0, 0), (0, cp - c), (0, 0)])
  w_t = jnp.pad(jnp.swapaxes(w, 1, 2), [(0, 0), (0, 0), (0, cp - c)])[..., None]
  rows_t = jnp.pad(rows.astype(jnp.int32), [(0, 0), (0, cp - c)])[..., None]
  k_t = jnp.pad(k, [(0, 0), (0, np_ - n), (0, 0)])
  return q_t, w_t, rows_t, k_t


def _specs(hi, di, bc, bn, dk_grid=False):
  maps = ((dk_q_index_map, dk_rows_index_map, dk_k_index_map, dk_score_index_map) if dk_grid
          else (q_index_map, rows_index_map, k_index_map, score_index_map))
  return [pl.BlockSpec((None, hi, bc, di), maps[0]), pl.BlockSpec((None, hi, bc, 1), maps[0]),
          pl.BlockSpec((None, bc, 1), maps[1]), pl.BlockSpec((None, bn, di), maps[2]),
          pl.BlockSpec((None, bc, bn), maps[3])]


def _scores_call(q, w, k, rows, ratio, interpret):
  b, c, hi, di = q.shape
  n = k.shape[1]
  bc, bn, cp, np_ = _tiles(c, n)
  q_t, w_t, rows_t, k_t = _layout(q, w, k, rows, cp, np_)
  specs = _specs(hi, di, bc, bn)
  (scores,) = kernel_call(
      functools.partial(_scores_kernel, n_heads=hi, ratio=ratio),
      grid=grid(b, cp, np_, bc, bn), in_specs=specs[:4], out_specs=specs[4:],
      out_shape=[jax.ShapeDtypeStruct((b, cp, np_), jnp.float32)],
      dimension_semantics=("parallel", "parallel", "parallel"), interpret=interpret,
      name="indexer_scores")(q_t, w_t, rows_t, k_t)
  return scores[:, :c, :n]


def _grad_call(q, w, k, rows, g, ratio, interpret):
  b, c, hi, di = q.shape
  n = k.shape[1]
  bc, bn, cp, np_ = _tiles(c, n)
  q_t, w_t, rows_t, k_t = _layout(q, w, k, rows, cp, np_)
  g_t = jnp.pad(g.astype(jnp.float32), [(0, 0), (0, cp - c), (0, np_ - n)])
  specs = _specs(hi, di, bc, bn)
  n_c, n_n = cp // bc, np_ // bn
  dq, dw = kernel_call(
      functools.partial(_dq_dw_kernel, n_heads=hi, ratio=ratio, n_tiles=n_n),
      grid=grid(b, cp, np_, bc, bn), in_specs=specs, out_specs=specs[:2],
      out_shape=[jax.ShapeDtypeStruct((b, hi, cp, di), jnp.float32),
                 jax.ShapeDtypeStruct((b, hi, cp, 1), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((hi, bc, di), jnp.float32), pltpu.VMEM((hi, bc, 1), jnp.float32)],
      dimension_semantics=("parallel", "parallel", "arbitrary"), interpret=interpret,
      name="indexer_scores_dq_dw")(q_t, w_t, rows_t, k_t, g_t)
  specs_dk = _specs(hi, di, bc, bn, dk_grid=True)
  (dk,) = kernel_call(
      functools.partial(_dk_kernel, n_heads=hi, ratio=ratio, n_tiles=n_c),
      grid=grid_dk(b, cp, np_, bc, bn), in_specs=specs_dk, out_specs=[specs_dk[3]],
      out_shape=[jax.ShapeDtypeStruct((b, np_, di), jnp.float32)],
      scratch_shapes=[pltpu.VMEM((bn, di), jnp.float32)],
      dimension_semantics=("parallel", "parallel", "arbitrary"), interpret=interpret,
      name="indexer_scores_dk")(q_t, w_t, rows_t, k_t, g_t)
  dq = jnp.swapaxes(dq[:, :, :c], 1, 2)
  return dq, jnp.swapaxes(dw[:, :, :c, 0], 1, 2), dk[:, :n]


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


def check_arguments(q: jax.Array, w: jax.Array, k: jax.Array, ratio: int | None, rows: jax.Array | None) -> jax.Array:
  """The shape contract of the indexer-score kernels (both variants); returns rows (default 0..C−1)."""
  b, c, hi, di = q.shape
  if w.shape != (b, c, hi):
    raise ValueError(f"indexer_scores: w must be [B={b}, C={c}, Hi={hi}], got {w.shape}")
  if k.ndim != 3 or k.shape[0] != b or k.shape[-1] != di:
    raise ValueError(f"indexer_scores: k must be [B={b}, N, Di={di}], got {k.shape}")
  if ratio is not None and ratio < 1:
    raise ValueError(f"indexer_scores: ratio must be ≥ 1 or None, got {ratio}")
  if rows is None:
    return jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c))
  if rows.shape != (b, c):
    raise ValueError(f"indexer_scores: rows must be [B={b}, C={c}], got {rows.shape}")
  return rows


def indexer_scores(q: jax.Array, w: jax.Array, k: jax.Array, *, ratio: int | None = None,
                   rows: jax.Array | None = None, interpret=None) -> jax.Array:
  """q [B, C, Hi, Di], w [B, C, Hi], k [B, N, Di] -> fp32 scores [B, C, N] (−inf where not visible).

  ratio: compression ratio for the causal mask (None: no mask). rows [B, C]: query positions t
  (default 0..C−1). Differentiable in q, w and k.
  """
  rows = check_arguments(q, w, k, ratio, rows)
  interpret = resolve_interpret(interpret, "pallas_kernels.indexer_scores")
  return _scores(q, w, k, rows, ratio, interpret)

