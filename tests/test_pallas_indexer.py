"""Pallas indexer scores (interpret mode) against dsv4_jax.ops.indexer (scores, select_topk).

The kernel applies the causal rule itself (`index_rules.entry_visible`: entry i visible to query t iff
i < (t+1)//ratio); the reference gets the same rule as an explicit mask built here from the definition
(all of entry i's tokens i·r .. i·r+r−1 are ≤ t). Forward, top-k and every gradient; outputs poisoned
with NaN.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from dsv4_jax.ops.indexer import indexer_scores as reference_scores
from dsv4_jax.ops.indexer import select_topk as reference_topk
from pallas_kernels import index_rules
from pallas_kernels.common import poison_outputs
from pallas_kernels.indexer import indexer_scores


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def inputs(seed, b, c, hi, di, n, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return normal(b, c, hi, di).astype(dtype), normal(b, c, hi).astype(dtype), normal(b, n, di).astype(dtype), \
      normal(b, c, n)


def spec_visible(rows, n, ratio):
  """[B, C, N]: every token of entry i (i·r .. i·r + r − 1) is at or before the query position."""
  i = np.arange(n)
  return jnp.asarray((i[None, None, :] + 1) * ratio - 1 <= np.asarray(rows)[..., None])


def run(q, w, k, g, rows, ratio, interpret=None):
  visible = spec_visible(rows, k.shape[1], ratio)

  def ours(q, w, k):
    s = indexer_scores(q, w, k, ratio=ratio, rows=rows, interpret=interpret)
    return jnp.sum(jnp.where(visible, s, 0.0) * g), s

  def ref(q, w, k):
    s = jnp.where(visible, reference_scores(q, w, k), -jnp.inf)
    return jnp.sum(jnp.where(visible, s, 0.0) * g), s

  grad = lambda f: jax.jit(jax.grad(f, argnums=(0, 1, 2), has_aux=True))
  with poison_outputs():
    got_grads, got = grad(ours)(q, w, k)
  f32 = lambda x: x.astype(jnp.float32)
  want_grads, want = grad(ref)(f32(q), f32(w), f32(k))
  return visible, got, want, got_grads, want_grads


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_scores_and_grads_match_reference(dtype, tol):
  b, c, hi, di, n, ratio = 2, 9, 3, 8, 5, 2  # C, N not multiples of any tile
  q, w, k, g = inputs(0, b, c, hi, di, n, dtype)
  rows = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32) + 3, (b, c))  # a query chunk starting at t = 3
  visible, got, want, got_grads, want_grads = run(q, w, k, g, rows, ratio)
  np.testing.assert_array_equal(np.isneginf(got), ~np.asarray(visible))  # mask = the causal rule
  assert rel_err(jnp.where(visible, got, 0), jnp.where(visible, want, 0)) <= tol
  for name, a, e in zip(("dq", "dw", "dk"), got_grads, want_grads):
    assert np.all(np.isfinite(np.asarray(a, np.float32))), f"{name}: unwritten elements"
    assert rel_err(a, e) <= tol, f"{name}: {rel_err(a, e):.3g}"


def test_tpu_interpret_mode():
  b, c, hi, di, n, ratio = 1, 4, 2, 8, 3, 1
  q, w, k, g = inputs(1, b, c, hi, di, n)
  rows = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c))
  params = pltpu.InterpretParams(uninitialized_memory="nan")
  visible, got, want, got_grads, want_grads = run(q, w, k, g, rows, ratio, interpret=params)
  assert rel_err(jnp.where(visible, got, 0), jnp.where(visible, want, 0)) <= 1e-5
  for a, e in zip(got_grads, want_grads):
    assert rel_err(a, e) <= 1e-5


def test_topk_of_kernel_scores_matches_reference_and_is_duplicate_free():
  """The model's top-k (ops.indexer.select_topk, visibility from the index rules) over the kernel's masked
  scores picks what it picks over the reference scores."""
  b, c, hi, di, n, ratio, topk = 2, 16, 2, 8, 4, 4, 3  # early queries see fewer than topk entries
  q, w, k, _ = inputs(2, b, c, hi, di, n)
  rows = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c))
  with poison_outputs():
    idx, values = jax.jit(lambda *a: reference_topk(indexer_scores(*a, ratio=ratio), spec_visible(rows, n, ratio),
                                                    topk))(q, w, k)
  want_idx, want_values = reference_topk(reference_scores(q, w, k), spec_visible(rows, n, ratio), topk)
  np.testing.assert_array_equal(idx, want_idx)
  finite = np.isfinite(np.asarray(want_values))
  np.testing.assert_allclose(np.asarray(values)[finite], np.asarray(want_values)[finite], rtol=1e-5, atol=1e-6)
  idx = np.asarray(idx)
  for row in idx.reshape(-1, idx.shape[-1]):
    chosen = row[row >= 0]
    assert len(set(chosen.tolist())) == len(chosen)
  assert np.all(idx[:, :3] == -1)  # queries 0..2 see no complete entry of 4 tokens


def test_kernel_mask_is_the_index_rule(monkeypatch):
  """The in-kernel mask is index_rules.entry_visible, looked up at trace time: patching it changes it."""
  b, c, hi, di, n, ratio = 1, 8, 2, 8, 4, 2
  q, w, k, _ = inputs(5, b, c, hi, di, n)
  rows = jnp.broadcast_to(jnp.arange(c, dtype=jnp.int32), (b, c))
  t, i = np.arange(c)[:, None], np.arange(n)[None, :]
  rule = np.vectorize(lambda t, i: bool(index_rules.entry_visible(int(t), int(i), ratio)))(t, i)
  np.testing.assert_array_equal(rule, np.asarray(spec_visible(rows, n, ratio))[0])
  got = indexer_scores(q, w, k, ratio=ratio, rows=rows)
  np.testing.assert_array_equal(~np.isneginf(np.asarray(got))[0], rule)
  monkeypatch.setattr(index_rules, "entry_visible", lambda t, i, r: i <= (t + 1) // r)  # off by one
  got = indexer_scores(q, w, k, ratio=ratio, rows=rows)
  np.testing.assert_array_equal(~np.isneginf(np.asarray(got))[0], i <= (t + 1) // ratio)


def test_unmasked_scores_equal_reference():
  q, w, k, _ = inputs(3, 1, 3, 2, 8, 7)
  with poison_outputs():
    got = indexer_scores(q, w, k)
  assert rel_err(got, reference_scores(q, w, k)) <= 1e-5


def test_shape_errors():
  q, w, k, _ = inputs(4, 1, 3, 2, 8, 7)
  with pytest.raises(ValueError, match="w must be"):
    indexer_scores(q, w[:, :, :1], k)
  with pytest.raises(ValueError, match="ratio must be"):
    indexer_scores(q, w, k, ratio=0)
