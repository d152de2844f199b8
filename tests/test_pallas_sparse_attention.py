"""Pallas sparse attention (interpret mode) against the XLA reference dsv4_jax.ops.sparse_attention.

Forward (o, lse) and every gradient (q, kv, sink; with a non-zero lse cotangent), on random shapes and
index patterns: random −1 slots, fully masked rows and tails, window ∪ top-k indices of sequences
shorter than the window, K not a multiple of the tile. Outputs are poisoned with NaN before each run.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from dsv4_jax.ops.sparse_attention import sparse_attention as reference
from pallas_kernels import index_rules
from pallas_kernels.common import poison_outputs
from pallas_kernels.sparse_attention import sparse_attention


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def random_inputs(seed, b, s, h, d, n, dtype=jnp.float32):
  """q, kv (in dtype), sink, and the output cotangents go, glse (numpy RNG: no per-shape compiles)."""
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return (normal(b, s, h, d).astype(dtype), normal(b, n, d).astype(dtype), normal(h), normal(b, s, h, d),
          normal(b, s, h))


def random_idx(seed, b, s, k, n):
  """Distinct rows per query (a random permutation prefix), ~30% −1, row 0 of batch 0 all −1,
  and the last two slots of every query −1 (a masked tail)."""
  rng = np.random.default_rng(seed)
  idx = np.stack([np.stack([rng.permutation(n)[:k] for _ in range(s)]) for _ in range(b)])
  idx[rng.random(idx.shape) < 0.3] = -1
  idx[0, 0] = -1
  idx[:, :, -2:] = -1
  return jnp.asarray(idx, jnp.int32)


def window_idx(rows, window, segment_ids=None):
  """rows [B, C] query positions -> [B, C, W] window rows, −1 where not visible (index_rules)."""
  t = rows[..., None].astype(jnp.int32)
  s = index_rules.window_row(t, jnp.arange(window, dtype=jnp.int32), window)
  if segment_ids is None:
    seg_t = seg_s = 0
  else:
    b, c, w = s.shape
    seg_t = jnp.take_along_axis(segment_ids, rows, axis=1)[..., None]
    seg_s = jnp.take_along_axis(segment_ids, jnp.clip(s, 0).reshape(b, c * w), axis=1).reshape(b, c, w)
  return jnp.where(index_rules.window_visible(t, s, window, seg_t, seg_s), s, -1)


def window_topk_idx(seed, b, s, window, n_compressed, topk, ratio):
  """Window rows of each query ∪ a duplicate-free top-k of its compressed entries (rows ≥ S), kept iff
  visible; the layout [window rows | compressed rows] is index_rules.compressed_row with base S."""
  rng = np.random.default_rng(seed)
  rows = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  win = np.asarray(window_idx(rows, window))
  comp = np.full((b, s, topk), -1)
  for bi in range(b):
    for t in range(s):
      pick = rng.permutation(n_compressed)[:topk]
      kept = [index_rules.topk_slot(int(i), index_rules.entry_visible(t, int(i), ratio)) for i in pick]
      comp[bi, t, :len(pick)] = [index_rules.compressed_row(e, s) for e in kept]
  return jnp.asarray(np.concatenate([win, comp], axis=-1), jnp.int32)


def outputs_and_grads(fn, q, kv, sink, idx, go, glse, **kw):
  def loss(q, kv, sink):
    o, lse = fn(q, kv, sink, idx, return_lse=True, **kw)
    return jnp.sum(o.astype(jnp.float32) * go) + jnp.sum(lse * glse), (o, lse)

  (_, (o, lse)), grads = jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(q, kv, sink)
  return (o, lse) + tuple(grads)


def check_against_reference(q, kv, sink, idx, go, glse, tol, interpret=None, chunk_size=None):
  with poison_outputs():
    got = jax.jit(lambda *a: outputs_and_grads(sparse_attention, *a, interpret=interpret,
                                               chunk_size=chunk_size))(q, kv, sink, idx, go, glse)
  f32 = lambda x: x.astype(jnp.float32)
  want = jax.jit(lambda *a: outputs_and_grads(reference, *a, chunk_size=None))(f32(q), f32(kv), sink, idx, go, glse)
  names = ("o", "lse", "dq", "dkv", "dsink")
  for name, g, w in zip(names, got, want):
    assert np.all(np.isfinite(np.asarray(g, np.float32))), f"{name}: non-finite (unwritten) elements"
    assert rel_err(g, w) <= tol, f"{name}: relative error {rel_err(g, w):.3g} > {tol}"
  return got


def test_random_indices_fp32():
  b, s, h, d, n, k = 2, 5, 4, 16, 24, 11  # K = 11: not a multiple of the 8-row tile
  q, kv, sink, go, glse = random_inputs(0, b, s, h, d, n)
  idx = random_idx(1, b, s, k, n)
  o, lse, *_ = check_against_reference(q, kv, sink, idx, go, glse, 1e-5)
  # the fully masked query attends to nothing: o = 0 and lse = sink
  np.testing.assert_allclose(o[0, 0], 0.0, atol=1e-6)
  np.testing.assert_allclose(lse[0, 0], sink, rtol=1e-6)


def test_window_and_topk_short_sequence_fp32():
  b, s, window, ratio, topk = 1, 6, 8, 2, 2  # S < W: every window reaches before the sequence start
  n_compressed = s // ratio
  q, kv, sink, go, glse = random_inputs(2, b, s, 2, 8, s + n_compressed)
  idx = window_topk_idx(3, b, s, window, n_compressed, topk, ratio)
  assert int(jnp.sum(idx[0, 0] >= 0)) == 1  # query 0 sees only itself
  check_against_reference(q, kv, sink, idx, go, glse, 1e-5, chunk_size=4)  # also the chunked path


def test_bf16():
  b, s, h, d, n, k = 1, 4, 4, 32, 16, 8
  q, kv, sink, go, glse = random_inputs(4, b, s, h, d, n, jnp.bfloat16)
  check_against_reference(q, kv, sink, random_idx(5, b, s, k, n), go, glse, 2e-2)


def test_tpu_interpret_mode():
  """The TPU interpreter simulates scalar prefetch into SMEM, VMEM blocks and the DMA pipeline."""
  b, s, h, d, n, k = 1, 2, 2, 8, 10, 5
  q, kv, sink, go, glse = random_inputs(6, b, s, h, d, n)
  params = pltpu.InterpretParams(uninitialized_memory="nan", out_of_bounds_reads="raise")
  check_against_reference(q, kv, sink, random_idx(7, b, s, k, n), go, glse, 1e-5, interpret=params)


def test_inside_lax_map_checkpoint_and_grad():
  """As the model uses it: per query chunk under jax.lax.map(jax.checkpoint(...)), chunk_size=None."""
  b, s, h, d, n, k, chunk = 1, 6, 2, 8, 12, 4, 3
  q, kv, sink, go, _ = random_inputs(8, b, s, h, d, n)
  idx = random_idx(9, b, s, k, n)

  def loss(fn, q, kv, sink):
    split = lambda x: jnp.moveaxis(x.reshape((b, s // chunk, chunk) + x.shape[2:]), 1, 0)
    o = jax.lax.map(jax.checkpoint(lambda a: fn(a[0], kv, sink, a[1], chunk_size=None)), (split(q), split(idx)))
    return jnp.sum(jnp.moveaxis(o, 0, 1).reshape(go.shape) * go)

  got = jax.jit(jax.grad(lambda *a: loss(sparse_attention, *a), argnums=(0, 1, 2)))(q, kv, sink)
  want = jax.jit(jax.grad(lambda *a: loss(reference, *a), argnums=(0, 1, 2)))(q, kv, sink)
  for g, w in zip(got, want):
    assert rel_err(g, w) <= 1e-5


def test_window_idx_from_index_rules_match_spec():
  rows = jnp.array([[0, 3, 9]], jnp.int32)
  got = np.asarray(window_idx(rows, 4))
  want = [[t - 3 + w if t - 3 + w >= 0 else -1 for w in range(4)] for t in (0, 3, 9)]
  np.testing.assert_array_equal(got[0], want)
  segments = jnp.array([[0] * 5 + [1] * 5], jnp.int32)  # two packed documents: rows 0..4 | 5..9
  got = np.asarray(window_idx(jnp.array([[4, 6, 9]], jnp.int32), 4, segments))
  np.testing.assert_array_equal(got[0], [[1, 2, 3, 4], [-1, -1, 5, 6], [6, 7, 8, 9]])


def test_shape_errors_name_the_argument():
  q, kv, sink, _, _ = random_inputs(0, 1, 2, 2, 8, 4)
  with pytest.raises(ValueError, match="sink must be"):
    sparse_attention(q, kv, sink[:1], jnp.zeros((1, 2, 3), jnp.int32))
  with pytest.raises(ValueError, match="idx must be"):
    sparse_attention(q, kv, sink, jnp.zeros((1, 3, 3), jnp.int32))
