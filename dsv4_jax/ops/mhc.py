"""Manifold-constrained hyper-connections (mHC), XLA reference: pure functions, fp32 mixing.

The Pallas kernels in pallas_kernels/mhc.py compute `mhc_pre` and `mhc_post` with the same arguments;
dsv4_jax.ops.dispatch chooses between the two.

Shapes: X [B, S, N, d] (N = hc_mult streams), y [B, S, d], M = (2+N)·N mixes.
  mixes  = (flat(X) @ fnᵀ) · rsqrt(mean(flat(X)²) + norm_eps)              [B, S, M]   (hc_mixes)
  pre_i  = sigmoid(mixes_i · scale₀ + base_i) + eps                          (i < N)
  post_i = 2 · sigmoid(mixes_{N+i} · scale₁ + base_{N+i})
  comb   = Sinkhorn(mixes_{2N:}.reshape(N, N) · scale₂ + base_{2N:})   (row-major: (i, j) at 2N + i·N + j)
  mhc_pre:  y = Σ_i pre_i X_i                                                -> (y, post, comb)
  mhc_post: Y_j = post_j · F(y) + Σ_i comb[i, j] X_i
Sinkhorn(logits): comb = softmax over j + eps; columns /= (col sum + eps); then (iters − 1) rounds of
rows /= (row sum + eps), columns /= (col sum + eps): (nearly) doubly stochastic.
All mixing arithmetic is fp32; y and Y are returned in the dtype of X and y.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from pallas_kernels.mhc import check_post_arguments, check_pre_arguments


def sinkhorn(logits: jax.Array, iters: int, eps: float) -> jax.Array:
  """logits [..., n, n] -> comb [..., n, n] (fp32), `iters` Sinkhorn-Knopp normalisations in all."""
  comb = jax.nn.softmax(logits.astype(jnp.float32), axis=-1) + eps
  comb = comb / (jnp.sum(comb, axis=-2, keepdims=True) + eps)

  def round_(_, c):
    c = c / (jnp.sum(c, axis=-1, keepdims=True) + eps)
    return c / (jnp.sum(c, axis=-2, keepdims=True) + eps)

  return jax.lax.fori_loop(0, iters - 1, round_, comb)


def hc_mixes(x: jax.Array, fn: jax.Array, norm_eps: float) -> jax.Array:
  """X [B, S, N, d], fn [M, N·d] -> mixes [B, S, M] (fp32; RMS normalisation applied after the matmul)."""
  flat = x.reshape(x.shape[:-2] + (-1,)).astype(jnp.float32)
  rsqrt = jax.lax.rsqrt(jnp.mean(jnp.square(flat), axis=-1, keepdims=True) + norm_eps)
  return jnp.einsum("bsk,mk->bsm", flat, fn.astype(jnp.float32)) * rsqrt


def hc_split(mixes: jax.Array, scale: jax.Array, base: jax.Array, n: int, iters: int, eps: float):
  """mixes [B, S, (2+n)·n], scale [3], base [(2+n)·n] -> pre [B, S, n], post [B, S, n], comb [B, S, n, n] (fp32)."""
  mixes, scale, base = (a.astype(jnp.float32) for a in (mixes, scale, base))
  pre = jax.nn.sigmoid(mixes[..., :n] * scale[0] + base[:n]) + eps
  post = 2.0 * jax.nn.sigmoid(mixes[..., n:2 * n] * scale[1] + base[n:2 * n])
  logits = mixes[..., 2 * n:] * scale[2] + base[2 * n:]
  comb = sinkhorn(logits.reshape(logits.shape[:-1] + (n, n)), iters, eps)
  return pre, post, comb


def weighted_stream_sum(x: jax.Array, weights: jax.Array) -> jax.Array:
  """y = Σ_i weights_i · X_i in fp32, returned in X's dtype. X [B, S, N, d], weights [B, S, N]."""
  return jnp.einsum("bsn,bsnd->bsd", weights.astype(jnp.float32), x.astype(jnp.float32)).astype(x.dtype)


def mhc_pre(x: jax.Array, mixes: jax.Array, scale: jax.Array, base: jax.Array, *, iters: int, eps: float):
  """X [B, S, N, d], mixes [B, S, (2+N)·N], scale [3], base [(2+N)·N] ->
  (y [B, S, d] in X's dtype, post [B, S, N], comb [B, S, N, N]) (fp32 mixing); hc_split + weighted_stream_sum."""
  check_pre_arguments(x, mixes, scale, base, iters)
  pre, post, comb = hc_split(mixes, scale, base, x.shape[2], iters, eps)
  return weighted_stream_sum(x, pre), post, comb


def mhc_post(y: jax.Array, residual: jax.Array, post: jax.Array, comb: jax.Array) -> jax.Array:
  """Y_j = post_j · y + Σ_i comb[i, j] · X_i.  y [B, S, d], residual X [B, S, N, d] -> [B, S, N, d] in y's dtype."""
  check_post_arguments(y, residual, post, comb)
  out = post.astype(jnp.float32)[..., None] * y[..., None, :].astype(jnp.float32)
  out = out + jnp.einsum("bsij,bsid->bsjd", comb.astype(jnp.float32), residual.astype(jnp.float32))
  return out.astype(y.dtype)
