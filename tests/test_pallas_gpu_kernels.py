"""The GPU (Triton) kernel variants, run in interpret mode on CPU, against the XLA references in dsv4_jax/ops.

Forward and every gradient, fp32 (1e-5 relative) and bf16 (2e-2), outputs poisoned with NaN: sparse
attention (−1 slots, fully masked queries, window ∪ top-k rows across a document boundary, repeated rows,
K / H / D not multiples of the tiles, the chunked path), the indexer scores (several query and entry tiles,
dead tiles skipped by the causal test, the mask is the shared index rule) and mHC pre / post (several token
and model-dim tiles, non-multiple sizes, four and three streams). Block sizes are shrunk by monkeypatching the
modules' tile constants so that small inputs still span several tiles.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax.ops import index_rules
from dsv4_jax.ops import mhc as mhc_ref
from dsv4_jax.ops.indexer import indexer_scores as reference_scores
from dsv4_jax.ops.indexer import select_topk
from dsv4_jax.ops.sparse_attention import sparse_attention as reference_attention
from dsv4_jax.ops.visibility import compressed_visibility
from pallas_kernels import common as kernel_common
from pallas_kernels.common import poison_outputs
from pallas_kernels.gpu import common, indexer as gpu_indexer, mhc as gpu_mhc, sparse_attention as gpu_sa
from test_pallas_mhc import ITERS, EPS, check as check_mhc, post_args, pre_args
from test_pallas_sparse_attention import outputs_and_grads, random_idx, random_inputs, rel_err, window_idx


def check_attention(q, kv, sink, idx, go, glse, tol, chunk_size=None):
  with poison_outputs():
    got = jax.jit(lambda *a: outputs_and_grads(gpu_sa.sparse_attention, *a, chunk_size=chunk_size))(
        q, kv, sink, idx, go, glse)
  f32 = lambda x: x.astype(jnp.float32)
  want = jax.jit(lambda *a: outputs_and_grads(reference_attention, *a, chunk_size=None))(
      f32(q), f32(kv), sink, idx, go, glse)
  for name, g, w in zip(("o", "lse", "dq", "dkv", "dsink"), got, want):
    assert np.all(np.isfinite(np.asarray(g, np.float32))), f"{name}: non-finite (unwritten) elements"
    assert float(jnp.max(jnp.abs(w))) > 0, f"{name}: the reference is zero, the check would be empty"
    assert rel_err(g, w) <= tol, f"{name}: relative error {rel_err(g, w):.3g} > {tol}"
  return got


def test_sparse_attention_random_indices_fp32():
  # H = 3 (one padded head block of 16), D = 24 (padded to 32), K = 37: two forward tiles of 32 slots,
  # three backward tiles of 16, the last ones mostly −1 padding.
  b, s, h, d, n, k = 2, 5, 3, 24, 48, 37
  q, kv, sink, go, glse = random_inputs(0, b, s, h, d, n)
  o, lse, *_ = check_attention(q, kv, sink, random_idx(1, b, s, k, n), go, glse, 1e-5)
  np.testing.assert_allclose(o[0, 0], 0.0, atol=1e-6)  # query (0, 0) has no slot: o = 0, lse = sink
  np.testing.assert_allclose(lse[0, 0], sink, rtol=1e-6)


def test_sparse_attention_window_topk_across_documents_chunked_fp32():
  """The model's index layout: window rows (index_rules, isolated per document) ∪ a top-k of the visible
  compressed rows, for two packed documents; the chunked path (map_query_chunks) with a partial chunk."""
  b, s, window, ratio, topk = 1, 20, 6, 2, 3
  n = s // ratio
  rows = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  segments = jnp.asarray([[1] * 8 + [2] * 12], jnp.int32)  # documents start at multiples of the ratio
  scores = jax.random.normal(jax.random.key(0), (b, s, n))
  picks, _ = select_topk(scores, compressed_visibility(rows, segments, ratio, n), topk)
  idx = jnp.concatenate([window_idx(rows, window, segments), index_rules.compressed_row(picks, s)], axis=-1)
  assert int(jnp.sum(idx[0, 8, :window] >= 0)) == 1  # the second document's first token sees only itself
  q, kv, sink, go, glse = random_inputs(2, b, s, 2, 16, s + n)
  check_attention(q, kv, sink, idx, go, glse, 1e-5, chunk_size=8)


def test_sparse_attention_repeated_rows_bf16():
  """A row named by several slots of one query (and by many queries): its gradients add up (atomics)."""
  b, s, h, d, n, k = 1, 4, 4, 32, 6, 20
  q, kv, sink, go, glse = random_inputs(3, b, s, h, d, n, jnp.bfloat16)
  idx = jnp.asarray(np.random.default_rng(4).integers(-1, n, (b, s, k)), jnp.int32)
  check_attention(q, kv, sink, idx, go, glse, 2e-2)


def indexer_inputs(seed, b, c, hi, di, n, dtype):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return normal(b, c, hi, di).astype(dtype), normal(b, c, hi).astype(dtype), normal(b, n, di).astype(dtype), \
      normal(b, c, n)


def spec_visible(rows, n, ratio):
  """[B, C, N]: every token of entry i (i·r .. i·r + r − 1) is at or before the query position."""
  return jnp.asarray((np.arange(n)[None, None, :] + 1) * ratio - 1 <= np.asarray(rows)[..., None])


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_indexer_scores_several_tiles(monkeypatch, dtype, tol):
  # tiles of 16: C = 40 -> 3 query tiles, N = 37 -> 3 entry tiles; queries at t = 3..42 see at most 21
  # entries (ratio 2), so entry tile 2 is dead for every query tile and tile 1 for the first one.
  monkeypatch.setattr(gpu_indexer, "QUERY_TILE", 16)
  monkeypatch.setattr(gpu_indexer, "ENTRY_TILE", 16)
  b, c, hi, di, n, ratio = 2, 40, 3, 8, 37, 2
  q, w, k, g = indexer_inputs(0, b, c, hi, di, n, dtype)
  rows = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32) + 3, (b, c))
  visible = spec_visible(rows, n, ratio)

  def loss(fn):
    def f(q, w, k):
      s = fn(q, w, k)
      return jnp.sum(jnp.where(visible, s, 0.0) * g), s
    return jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))

  with poison_outputs():
    got_grads, got = loss(lambda *a: gpu_indexer.indexer_scores(*a, ratio=ratio, rows=rows))(q, w, k)
  f32 = lambda x: x.astype(jnp.float32)
  want_grads, want = loss(reference_scores)(f32(q), f32(w), f32(k))
  np.testing.assert_array_equal(np.isneginf(got), ~np.asarray(visible))  # the mask is the causal rule
  assert rel_err(jnp.where(visible, got, 0), jnp.where(visible, want, 0)) <= tol
  for name, a, e in zip(("dq", "dw", "dk"), got_grads, want_grads):
    assert np.all(np.isfinite(np.asarray(a, np.float32))), f"{name}: unwritten elements"
    assert float(jnp.max(jnp.abs(e))) > 0
    assert rel_err(a, e) <= tol, f"{name}: {rel_err(a, e):.3g}"


def test_indexer_unmasked_and_mask_is_the_index_rule(monkeypatch):
  """ratio=None: the plain scores. With a ratio the in-kernel mask (and tile skip) is index_rules.entry_visible,
  looked up at trace time: patching the rule changes the kernel's mask."""
  q, w, k, _ = indexer_inputs(1, 1, 8, 2, 8, 4, jnp.float32)
  with poison_outputs():
    assert rel_err(gpu_indexer.indexer_scores(q, w, k), reference_scores(q, w, k)) <= 1e-5
  t, i = np.arange(8)[:, None], np.arange(4)[None, :]
  got = gpu_indexer.indexer_scores(q, w, k, ratio=2)
  np.testing.assert_array_equal(~np.isneginf(np.asarray(got))[0], i < (t + 1) // 2)
  monkeypatch.setattr(index_rules, "entry_visible", lambda t, i, r: i <= (t + 1) // r)  # off by one
  got = gpu_indexer.indexer_scores(q, w, k, ratio=2)
  np.testing.assert_array_equal(~np.isneginf(np.asarray(got))[0], i <= (t + 1) // 2)


@pytest.fixture
def small_mhc_tiles(monkeypatch):
  """Tiles of 4 tokens and 16 model dims, so that 10 tokens × d = 40 span 3 × 3 tiles (with padding)."""
  monkeypatch.setattr(gpu_mhc, "TOKEN_TILE", 4)
  monkeypatch.setattr(gpu_mhc, "MODEL_TILE", 16)


@pytest.mark.parametrize("dtype, tol, streams", [(jnp.float32, 1e-5, 4), (jnp.bfloat16, 2e-2, 3)])
def test_mhc_pre_matches_reference(small_mhc_tiles, dtype, tol, streams):
  args, cot = pre_args(0, 2, 5, streams, 40, dtype)  # 10 tokens, d = 40: 3 token tiles × 3 model-dim tiles
  check_mhc(lambda *a: gpu_mhc.mhc_pre(*a, iters=ITERS, eps=EPS),
            lambda *a: mhc_ref.mhc_pre(*a, iters=ITERS, eps=EPS), args, cot, tol)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_mhc_post_matches_reference(small_mhc_tiles, dtype, tol):
  args, cot = post_args(3, 2, 5, 4, 40, dtype)
  check_mhc(gpu_mhc.mhc_post, mhc_ref.mhc_post, args, cot, tol)


def test_shape_errors_are_the_shared_checks():
  q, kv, sink, _, _ = random_inputs(0, 1, 2, 2, 8, 4)
  with pytest.raises(ValueError, match="sink must be"):
    gpu_sa.sparse_attention(q, kv, sink[:1], jnp.zeros((1, 2, 3), jnp.int32))
  with pytest.raises(ValueError, match="at least one slot"):
    gpu_sa.sparse_attention(q, kv, sink, jnp.zeros((1, 2, 0), jnp.int32))
  iq, iw, ik, _ = indexer_inputs(0, 1, 3, 2, 8, 7, jnp.float32)
  with pytest.raises(ValueError, match="w must be"):
    gpu_indexer.indexer_scores(iq, iw[:, :, :1], ik)
  (x, mixes, scale, base), _ = pre_args(5, 1, 2, 4, 8, jnp.float32)
  with pytest.raises(ValueError, match="mixes must be"):
    gpu_mhc.mhc_pre(x, mixes[..., :-1], scale, base, iters=2, eps=EPS)


def test_interpret_resolution_per_variant(monkeypatch):
  """None: interpret on CPU; compiled on the variant's own accelerator; the other variant is refused."""
  for backend, variant, want in (("cpu", "gpu", True), ("cpu", "tpu", True), ("gpu", "gpu", False),
                                 ("tpu", "tpu", False)):
    monkeypatch.setattr(kernel_common.jax, "default_backend", lambda: backend)
    assert kernel_common.resolve_interpret(None, "k", variant=variant) is want
  monkeypatch.setattr(kernel_common.jax, "default_backend", lambda: "gpu")
  with pytest.raises(NotImplementedError, match="pallas_kernels.gpu"):
    kernel_common.resolve_interpret(None, "k", variant="tpu")
  assert kernel_common.resolve_interpret(True, "k", variant="tpu") is True


def test_power_of_two_blocks():
  assert [common.next_power_of_two(n) for n in (0, 1, 2, 3, 16, 17, 640)] == [1, 1, 2, 4, 16, 32, 1024]
  assert common.block_size(5, 16, 64) == 16 and common.block_size(37, 16, 64) == 64
  assert common.block_size(640, 16, 32) == 32
  with pytest.raises(ValueError, match="powers of two"):
    common.block_size(5, 12, 64)
  x = jnp.ones((2, 3))
  assert common.pad_axis(x, 1, 3) is x and common.pad_axis(x, 1, 8, fill=-1).shape == (2, 8)
