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


# --- the attention layer against a naive dense masked softmax -----------------------------------

from flax import nnx  # noqa: E402

from dsv4_jax.layers.attention import Attention, indexer_kl  # noqa: E402
from tests.helpers import randomize, tiny_config  # noqa: E402


def np_rms(x, w=None, eps=1e-6):
  y = x / np.sqrt(np.mean(x ** 2, -1, keepdims=True) + eps)
  return y if w is None else y * np.asarray(w, np.float64)


def np_rope(x, pos, freqs, inverse=False):
  """x [S, ..., D]; rotates interleaved pairs of the last 2·len(freqs) dims by ±pos·freqs."""
  x = x.copy()
  rd = 2 * len(freqs)
  ang = pos.astype(np.float64)[:, None] * np.asarray(freqs, np.float64)[None] * (-1 if inverse else 1)
  ang = ang.reshape((x.shape[0],) + (1,) * (x.ndim - 2) + (len(freqs),))
  a, b = x[..., -rd::2].copy(), x[..., -rd + 1::2].copy()
  x[..., -rd::2], x[..., -rd + 1::2] = a * np.cos(ang) - b * np.sin(ang), a * np.sin(ang) + b * np.cos(ang)
  return x


def naive_layer(attn: Attention, x: np.ndarray, compressed: np.ndarray | None, index_scores=None):
  """One sequence x [S, d] -> (out [S, d], per-query indexer KL [S] or None): a dense loop over queries.

  compressed [N, D]: the layer's compressor entries (tested in test_compressor.py). Every visible entry
  is attended (the "dense" mode). index_scores [S, N]: the indexer's scores, for the KL.
  """
  cfg, r = attn.cfg, attn.ratio
  w = lambda lin: np.asarray(lin.weight[...], np.float64)
  s, h, hd, eps = x.shape[0], attn.n_heads, attn.head_dim, cfg.rms_norm_eps
  pos, freqs = np.arange(s), np.asarray(attn.freqs)
  qr = np_rms(x @ w(attn.wq_a).T, attn.q_norm.weight[...], eps)
  q = np_rope(np_rms((qr @ w(attn.wq_b).T).reshape(s, h, hd), eps=eps), pos, freqs)
  kv = np_rope(np_rms(x @ w(attn.wkv).T, attn.kv_norm.weight[...], eps), pos, freqs)
  sink = np.asarray(attn.attn_sink[...], np.float64)
  o = np.zeros((s, h, hd))
  kl = np.zeros(s)
  for t in range(s):
    rows = [kv[j] for j in range(max(0, t - cfg.sliding_window + 1), t + 1)]
    n_visible = (t + 1) // r if r else 0
    keys = np.array(rows + [compressed[i] for i in range(n_visible)])
    logits = np.einsum("hd,kd->hk", q[t], keys) * hd ** -0.5
    m = np.maximum(logits.max(-1), sink)
    e = np.exp(logits - m[:, None])
    p = e / (np.exp(sink - m) + e.sum(-1))[:, None]
    o[t] = p @ keys
    if index_scores is not None and n_visible:
      target = p[:, len(rows):].sum(0)
      target /= target.sum()
      sc = index_scores[t, :n_visible]
      log_q = sc - sc.max() - np.log(np.exp(sc - sc.max()).sum())
      kl[t] = np.sum(target * (np.log(target) - log_q))
  o = np_rope(o, pos, freqs, inverse=True).reshape(s, attn.groups, -1)
  wo_a = w(attn.wo_a).reshape(attn.groups, cfg.o_lora_rank, -1)
  out = np.einsum("sgd,grd->sgr", o, wo_a).reshape(s, -1) @ w(attn.wo_b).T
  return out, (kl if index_scores is not None else None)


def np_index_scores(attn: Attention, x: np.ndarray) -> np.ndarray:
  ix, cfg = attn.indexer, attn.cfg
  s = x.shape[0]
  qr = np_rms(x @ np.asarray(attn.wq_a.weight[...], np.float64).T, attn.q_norm.weight[...], cfg.rms_norm_eps)
  q = np_rope((qr @ np.asarray(ix.wq_b.weight[...], np.float64).T).reshape(s, ix.n_heads, ix.head_dim),
              np.arange(s), np.asarray(attn.freqs))
  wts = x @ np.asarray(ix.weights_proj.weight[...], np.float64).T * (ix.head_dim * ix.n_heads) ** -0.5
  k = np.asarray(ix.compressor(jnp.asarray(x[None], jnp.float32), jnp.arange(s)[None], attn.freqs)[0][0], np.float64)
  return np.einsum("sh,shn->sn", wts, np.maximum(np.einsum("shd,nd->shn", q, k), 0.0))


@pytest.mark.parametrize("ratio,seq", [(0, 40), (128, 300), (4, 40)])
def test_attention_layer_matches_naive_dense(ratio, seq):
  cfg = tiny_config(sliding_window=8)
  attn = randomize(Attention(cfg, ratio, rngs=nnx.Rngs(ratio)), seed=ratio + 1)
  x = np.random.default_rng(2).standard_normal((1, seq, cfg.hidden_size)).astype(np.float32)
  pos, seg = jnp.arange(seq)[None], jnp.ones((1, seq), jnp.int32)
  out, aux, _ = nnx.jit(lambda m, *a: m(*a, attention_mode="dense"))(attn, jnp.asarray(x), pos, seg)
  compressed = None
  if ratio:
    compressed = np.asarray(attn.compressor(jnp.asarray(x), pos, attn.freqs)[0][0], np.float64)
  scores = np_index_scores(attn, x[0].astype(np.float64)) if ratio == 4 else None
  ref, kl = naive_layer(attn, x[0].astype(np.float64), compressed, scores)
  np.testing.assert_allclose(np.asarray(out)[0], ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())
  if ratio == 4:  # the indexer KL loss toward the main attention, against the direct computation
    count = np.sum(np.arange(seq) + 1 >= ratio)
    assert float(aux["indexer_kl_count"]) == count
    np.testing.assert_allclose(float(aux["indexer_kl_sum"]), kl.sum(), rtol=1e-3)
    assert np.all(kl >= 0) and kl.sum() > 0
  else:
    assert float(aux["indexer_kl_sum"]) == 0.0


def test_indexer_kl_is_zero_iff_indexer_matches_target():
  q, kv, sink, idx = random_case(6)
  scale = D ** -0.5
  _, lse = sparse_attention(q, kv, sink, idx, return_lse=True)
  # The target: the attention's probabilities at the slots, summed over heads and renormalised.
  member_logits = np.einsum("bshd,bskd->bshk", q, kv[np.arange(B)[:, None, None], np.maximum(idx, 0)]) * scale
  p = np.where(idx[:, :, None, :] >= 0, np.exp(member_logits - np.asarray(lse)[..., None]), 0.0).sum(2)
  p = p / np.where(p.sum(-1, keepdims=True) > 0, p.sum(-1, keepdims=True), 1.0)
  matched = np.where(idx >= 0, np.log(np.maximum(p, 1e-30)) + 3.0, -np.inf)  # a shift does not matter
  comp_logits = np.where(idx[:, :, None, :] >= 0, member_logits, -np.inf).astype(np.float32)
  valid = jnp.asarray(idx >= 0)
  kl, has = indexer_kl(jnp.asarray(comp_logits), lse, valid, jnp.asarray(matched, jnp.float32))
  np.testing.assert_array_equal(np.asarray(has), (idx >= 0).any(-1))
  np.testing.assert_allclose(np.asarray(kl), 0.0, atol=1e-5)
  noisy = matched + np.random.default_rng(7).standard_normal(matched.shape)
  kl_noisy, _ = indexer_kl(jnp.asarray(comp_logits), lse, valid, jnp.asarray(noisy, jnp.float32))
  kl_noisy = np.asarray(kl_noisy)
  assert np.all(kl_noisy >= -1e-6)
  assert np.all(kl_noisy[(idx >= 0).sum(-1) >= 2] > 1e-4)  # ≥ 2 slots: a different distribution
  np.testing.assert_array_equal(kl_noisy[~(idx >= 0).any(-1)], 0.0)  # no slots: no loss
