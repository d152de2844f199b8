"""The reference sparse attention against a naive dense masked softmax written here.

  o[b,s,h] = Σ_n m[b,s,n] · exp(ℓ[b,s,h,n] − lse) · kv[b,n],   ℓ = scale · q·kv[n],
  lse = log(exp(sink[h]) + Σ_n m[b,s,n] · exp(ℓ[b,s,h,n])),     m[b,s,n] = (n ∈ idx[b,s,:])
The dense version builds the [B, S, N] mask from idx and never gathers, so it checks the gather,
the −1 masking, the sink, chunking and the gradients independently.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsv4_jax.ops.sparse_attention import map_query_chunks, sparse_attention

B, S, H, D, N, K = 2, 13, 3, 16, 20, 6


def dense_attention(q, kv, sink, idx, scale):
  """Naive: a [B, S, H, N] logit tensor over every row with the idx-membership mask."""
  n = kv.shape[1]
  member = jnp.any(idx[..., None] == jnp.arange(n), axis=-2)  # [B, S, N]; −1 matches nothing
  logits = jnp.einsum("bshd,bnd->bshn", q, kv) * scale
  logits = jnp.where(member[:, :, None, :], logits, -jnp.inf)
  m = jnp.maximum(jnp.max(logits, axis=-1), sink[None, None, :])
  e = jnp.exp(logits - m[..., None])
  denom = jnp.exp(sink[None, None, :] - m) + jnp.sum(e, axis=-1)
  out = jnp.einsum("bshn,bnd->bshd", e / denom[..., None], kv)
  return out, m + jnp.log(denom)


def random_case(seed=0):
  rng = np.random.default_rng(seed)
  q = rng.standard_normal((B, S, H, D)).astype(np.float32)
  kv = rng.standard_normal((B, N, D)).astype(np.float32)
  sink = rng.standard_normal((H,)).astype(np.float32)
  idx = np.stack([np.stack([rng.permutation(N)[:K] for _ in range(S)]) for _ in range(B)])  # distinct
  idx = np.where(rng.random(idx.shape) < 0.3, -1, idx)
  idx[0][idx[0] >= N - 3] = -1  # the last rows of kv in batch 0 are never selected
  idx[0, 3] = -1  # an all-masked row
  idx[1, 0] = -1
  idx[1, 5, :] = [4, -1, -1, 7, -1, 19]
  return q, kv, sink, idx.astype(np.int32)


def test_matches_dense_including_masked_and_empty_rows():
  q, kv, sink, idx = random_case()
  scale = 0.7 * D ** -0.5
  out, lse = jax.jit(lambda *a: sparse_attention(*a, scale=scale, chunk_size=None, return_lse=True))(
      q, kv, sink, idx)
  ref_out, ref_lse = dense_attention(q, kv, sink, idx, scale)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(np.asarray(lse), np.asarray(ref_lse), rtol=1e-5, atol=1e-5)
  # An all-masked row attends to nothing: output 0, log-sum-exp = the sink alone.
  np.testing.assert_array_equal(np.asarray(out)[0, 3], 0.0)
  np.testing.assert_allclose(np.asarray(lse)[0, 3], sink, rtol=1e-6)


def test_default_scale_and_sink_is_denominator_only():
  q, kv, sink, idx = random_case(1)
  out = sparse_attention(q, kv, sink, idx)
  ref, _ = dense_attention(q, kv, sink, idx, D ** -0.5)
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), rtol=1e-5, atol=1e-5)
  # With a very negative sink the weights sum to one over the gathered rows.
  out_no_sink = sparse_attention(q, kv, jnp.full((H,), -1e9), idx)
  ref_no_sink, _ = dense_attention(q, kv, jnp.full((H,), -1e9), idx, D ** -0.5)
  np.testing.assert_allclose(np.asarray(out_no_sink), np.asarray(ref_no_sink), rtol=1e-5, atol=1e-5)
  assert np.abs(np.asarray(out_no_sink) - np.asarray(out)).max() > 1e-2


@pytest.mark.parametrize("chunk", [1, 4, 5, 13])
def test_chunked_equals_unchunked(chunk):
  q, kv, sink, idx = random_case(2)
  whole = sparse_attention(q, kv, sink, idx, chunk_size=None, return_lse=True)
  chunked = jax.jit(lambda *a: sparse_attention(*a, chunk_size=chunk, return_lse=True))(q, kv, sink, idx)
  for a, b in zip(whole, chunked):
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, atol=1e-6)


def test_map_query_chunks_pads_and_slices():
  x = jnp.arange(2 * 7 * 3, dtype=jnp.float32).reshape(2, 7, 3)
  out = map_query_chunks(lambda c: {"twice": 2 * c}, 3, x)
  np.testing.assert_array_equal(np.asarray(out["twice"]), 2 * np.asarray(x))


def test_gradients_match_dense():
  q, kv, sink, idx = random_case(3)
  cot = np.random.default_rng(4).standard_normal((B, S, H, D)).astype(np.float32)
  cot_lse = np.random.default_rng(5).standard_normal((B, S, H)).astype(np.float32)

  def loss(fn):
    def f(q, kv, sink):
      out, lse = fn(q, kv, sink)
      return jnp.sum(out * cot) + jnp.sum(lse * cot_lse)
    return jax.jit(jax.grad(f, argnums=(0, 1, 2)))

  sparse = loss(lambda q, kv, sink: sparse_attention(q, kv, sink, idx, chunk_size=4, return_lse=True))
  dense = loss(lambda q, kv, sink: dense_attention(q, kv, sink, idx, D ** -0.5))
  for name, g, r in zip(("q", "kv", "sink"), sparse(q, kv, sink), dense(q, kv, sink)):
    g, r = np.asarray(g), np.asarray(r)
    assert np.all(np.isfinite(g)), name
    np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5, err_msg=name)
  # Rows of kv that no query selects get exactly zero gradient.
  unused = np.setdiff1d(np.arange(N), idx[0])
  assert len(unused) >= 3
  g_kv = np.asarray(sparse(q, kv, sink)[1])
  np.testing.assert_array_equal(g_kv[0, unused], 0.0)


def test_shape_errors_name_the_argument():
  q, kv, sink, idx = random_case()
  with pytest.raises(ValueError, match="sink"):
    sparse_attention(q, kv, sink[:2], idx)
  with pytest.raises(ValueError, match="idx"):
    sparse_attention(q, kv, sink, idx[:, :4])
  with pytest.raises(ValueError, match="kv"):
    sparse_attention(q, kv[..., :8], sink, idx)
