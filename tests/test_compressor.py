"""The KV compressor against a per-block NumPy loop transcribing its equations (layers/compressor.py).

  kv = x Wkvᵀ, score = x Wgateᵀ + ape[t mod r]            (fp32; width coff·c, coff = 2 iff r = 4)
  plain:   entry_i = Σ_{k<r} softmax_k(score[i·r+k]) ⊙ kv[i·r+k]
  overlap: entry_i pools the previous block through channels [:c] and block i through channels [c:],
           one softmax per channel over the 2r slots; the previous half of a document's first block is
           padding (kv 0, score −inf)
  then RMSNorm(c) · weight, then RoPE of the last Dr dims (interleaved pairs) at position i·r.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv4_jax.layers.compressor import Compressor, pool_blocks
from tests.helpers import randomize, tiny_config


def numpy_pool(kv: np.ndarray, score: np.ndarray, ratio: int, overlap: bool,
               doc_start: np.ndarray | None = None) -> np.ndarray:
  """kv, score [S, coff·c] -> [S // ratio, c], one block at a time. doc_start[i]: block i opens a document."""
  n = kv.shape[0] // ratio
  c = kv.shape[1] // 2 if overlap else kv.shape[1]
  out = np.zeros((n, c))
  for i in range(n):
    cur = slice(i * ratio, (i + 1) * ratio)
    if overlap:
      first = i == 0 or (doc_start is not None and doc_start[i])
      if first:
        slots_kv = np.concatenate([np.zeros((ratio, c)), kv[cur, c:]])
        slots_score = np.concatenate([np.full((ratio, c), -np.inf), score[cur, c:]])
      else:
        prev = slice((i - 1) * ratio, i * ratio)
        slots_kv = np.concatenate([kv[prev, :c], kv[cur, c:]])
        slots_score = np.concatenate([score[prev, :c], score[cur, c:]])
    else:
      slots_kv, slots_score = kv[cur], score[cur]
    for ch in range(c):
      w = np.exp(slots_score[:, ch] - slots_score[:, ch].max())
      out[i, ch] = np.sum(w / w.sum() * slots_kv[:, ch])
  return out


def numpy_rope(x: np.ndarray, pos: np.ndarray, freqs: np.ndarray) -> np.ndarray:
  """Rotates pairs (2k, 2k+1) of the last 2·len(freqs) dims by pos·freqs[k]."""
  x = x.copy()
  rd = 2 * len(freqs)
  for k, f in enumerate(freqs):
    a, b = x[..., x.shape[-1] - rd + 2 * k], x[..., x.shape[-1] - rd + 2 * k + 1]
    cos, sin = np.cos(pos * f), np.sin(pos * f)
    x[..., x.shape[-1] - rd + 2 * k], x[..., x.shape[-1] - rd + 2 * k + 1] = a * cos - b * sin, a * sin + b * cos
  return x


def numpy_compressor(comp: Compressor, x: np.ndarray, positions: np.ndarray, freqs: np.ndarray, eps: float,
                     doc_start=None) -> np.ndarray:
  r = comp.ratio
  x = x.astype(np.float64)
  kv = x @ np.asarray(comp.wkv.weight[...], np.float64).T
  ape = np.asarray(comp.ape[...], np.float64)
  score = x @ np.asarray(comp.wgate.weight[...], np.float64).T + ape[np.arange(x.shape[0]) % r]
  pooled = numpy_pool(kv, score, r, comp.overlap, doc_start)
  normed = pooled / np.sqrt(np.mean(pooled ** 2, -1, keepdims=True) + eps) * np.asarray(comp.norm.weight[...])
  return numpy_rope(normed, positions[:len(pooled) * r:r].astype(np.float64), freqs)


FREQS = np.array([0.9, 0.31, 0.05, 0.002], np.float32)  # any frequencies: the layer passes its own


@pytest.mark.parametrize("ratio,out_dim,seq", [(4, 16, 23), (128, 12, 300)])
def test_compressor_matches_per_block_loop(ratio, out_dim, seq):
  cfg = tiny_config()
  comp = randomize(Compressor(cfg, ratio, out_dim, rngs=nnx.Rngs(0)), seed=ratio)
  assert comp.overlap == (ratio == 4)
  x = np.random.default_rng(1).standard_normal((2, seq, cfg.hidden_size)).astype(np.float32)
  positions = np.broadcast_to(np.arange(seq), (2, seq)) + np.array([[0], [1000]])
  got = np.asarray(nnx.jit(lambda m, *a: m(*a, tuple(FREQS))[0])(comp, jnp.asarray(x), jnp.asarray(positions)))
  assert got.shape == (2, seq // ratio, out_dim)  # the trailing partial block is not an entry
  for b in range(2):
    ref = numpy_compressor(comp, x[b], positions[b], FREQS.astype(np.float64), cfg.rms_norm_eps)
    np.testing.assert_allclose(got[b], ref, rtol=2e-4, atol=2e-5)


def test_overlap_first_block_has_padded_previous_half():
  """Block 0's entry depends on block 0's tokens only; block 1's on blocks 0 and 1."""
  rng = np.random.default_rng(2)
  c, r = 3, 4
  kv = rng.standard_normal((1, 12, 2 * c)).astype(np.float32)
  score = rng.standard_normal((1, 12, 2 * c)).astype(np.float32) * 3
  got = np.asarray(pool_blocks(jnp.asarray(kv), jnp.asarray(score), r, overlap=True))
  np.testing.assert_allclose(got[0], numpy_pool(kv[0], score[0], r, True), rtol=1e-5, atol=1e-6)
  # Entry 0 equals plain pooling of block 0's last-c channels.
  np.testing.assert_allclose(got[0, 0], numpy_pool(kv[0, :4, c:], score[0, :4, c:], r, False)[0],
                             rtol=1e-5, atol=1e-6)


def test_overlap_respects_document_starts():
  """In a packed row a document's first block pads its previous half, exactly as at sequence start."""
  cfg = tiny_config()
  comp = randomize(Compressor(cfg, 4, 16, rngs=nnx.Rngs(3)), seed=3)
  rng = np.random.default_rng(4)
  x = rng.standard_normal((1, 24, cfg.hidden_size)).astype(np.float32)
  segment_ids = np.array([[1] * 8 + [0] * 4 + [2] * 12])
  positions = np.array([list(range(8)) + [0] * 4 + list(range(12))])
  got = np.asarray(comp(jnp.asarray(x), jnp.asarray(positions), FREQS, jnp.asarray(segment_ids))[0])
  doc_start = np.array([0, 0, 1, 1, 0, 0], bool)  # blocks 2 (padding) and 3 (document 2) open a segment
  ref = numpy_compressor(comp, x[0], positions[0], FREQS.astype(np.float64), cfg.rms_norm_eps, doc_start)
  np.testing.assert_allclose(got[0], ref, rtol=2e-4, atol=2e-5)
  # Document 2's entries equal those of document 2 compressed on its own.
  alone = np.asarray(comp(jnp.asarray(x[:, 12:]), jnp.asarray(positions[:, 12:]), FREQS)[0])
  np.testing.assert_allclose(got[0, 3:], alone[0], rtol=1e-5, atol=1e-6)
