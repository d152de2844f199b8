"""Manifold-constrained hyper-connections (mHC): n residual streams mixed by a doubly stochastic matrix.

Shapes: X [B, S, N, d] (N = hc_mult streams), y [B, S, d].
  mixes  = (flat(X) @ fnᵀ) · rsqrt(mean(flat(X)²) + eps)                    [B, S, (2+N)·N]
  pre_i  = sigmoid(mixes_i · scale₀ + base_i) + hc_eps                       (i < N)
  post_i = 2 · sigmoid(mixes_{N+i} · scale₁ + base_{N+i})
  comb   = Sinkhorn(mixes_{2N:}.reshape(N, N) · scale₂ + base_{2N:})
  mhc_pre:  y = Σ_i pre_i X_i
  mhc_post: Y_j = post_j · F(y) + Σ_i comb[i, j] X_i
All mixing arithmetic is fp32.

Use around any block of your own:
    hc = HyperConnection(dim, cfg, rngs=rngs)
    y, post, comb = hc.pre(X)
    X = mhc_post(my_block(y), X, post, comb)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4_jax.config import ModelConfig
from dsv4_jax.layers.linear import ADAMW, MUON, param
from dsv4_jax.ops.sinkhorn import sinkhorn


def hc_mixes(x: jax.Array, fn: jax.Array, norm_eps: float) -> jax.Array:
  """X [B, S, N, d], fn [M, N·d] -> mixes [B, S, M] (fp32; RMS normalisation applied after the matmul)."""
  flat = x.reshape(x.shape[:-2] + (-1,)).astype(jnp.float32)
  rsqrt = jax.lax.rsqrt(jnp.mean(jnp.square(flat), axis=-1, keepdims=True) + norm_eps)
  return jnp.einsum("bsk,mk->bsm", flat, fn.astype(jnp.float32)) * rsqrt


def hc_split(mixes: jax.Array, scale: jax.Array, base: jax.Array, n: int, iters: int, eps: float):
  """mixes [B, S, (2+n)·n] -> pre [B, S, n], post [B, S, n], comb [B, S, n, n] (all fp32)."""
  pre = jax.nn.sigmoid(mixes[..., :n] * scale[0] + base[:n]) + eps
  post = 2.0 * jax.nn.sigmoid(mixes[..., n:2 * n] * scale[1] + base[n:2 * n])
  logits = mixes[..., 2 * n:] * scale[2] + base[2 * n:]
  comb = sinkhorn(logits.reshape(logits.shape[:-1] + (n, n)), iters, eps)
  return pre, post, comb


def weighted_stream_sum(x: jax.Array, weights: jax.Array) -> jax.Array:
  """y = Σ_i weights_i · X_i in fp32, returned in X's dtype. X [B, S, N, d], weights [B, S, N]."""
  return jnp.einsum("bsn,bsnd->bsd", weights, x.astype(jnp.float32)).astype(x.dtype)


def mhc_post(y: jax.Array, residual: jax.Array, post: jax.Array, comb: jax.Array) -> jax.Array:
  """Y_j = post_j · y + Σ_i comb[i, j] · X_i.  y [B, S, d], residual X [B, S, N, d] -> [B, S, N, d]."""
  out = post[..., None] * y[..., None, :].astype(jnp.float32)
  out = out + jnp.einsum("bsij,bsid->bsjd", comb, residual.astype(jnp.float32))
  return out.astype(y.dtype)


class HyperConnection(nnx.Module):
  """The mHC parameters of one sublayer: fn [(2+N)·N, N·d], base [(2+N)·N], scale [3] (fp32)."""

  def __init__(self, dim: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
    n = cfg.hc_mult
    self.fn = param(rngs, (cfg.mix_hc, n * dim), ("hc_mix", "hc_embed"), std=cfg.init_std, optimizer=MUON)
    self.base = param(None, (cfg.mix_hc,), ("hc_mix",), value=0.0, optimizer=ADAMW)
    self.scale = param(None, (3,), (None,), value=1.0, optimizer=ADAMW)
    self.n, self.iters, self.hc_eps, self.norm_eps = n, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps

  def pre(self, x: jax.Array):
    """mhc_pre: X [B, S, N, d] -> (y [B, S, d], post [B, S, N], comb [B, S, N, N])."""
    mixes = hc_mixes(x, self.fn[...], self.norm_eps)
    pre, post, comb = hc_split(mixes, self.scale[...], self.base[...], self.n, self.iters, self.hc_eps)
    return weighted_stream_sum(x, pre), post, comb


class HyperConnectionHead(nnx.Module):
  """Collapses the streams before the output head with pre-weights only: fn [N, N·d], base [N], scale [1]."""

  def __init__(self, dim: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
    n = cfg.hc_mult
    self.fn = param(rngs, (n, n * dim), ("hc", "hc_embed"), std=cfg.init_std, optimizer=MUON)
    self.base = param(None, (n,), ("hc",), value=0.0, optimizer=ADAMW)
    self.scale = param(None, (1,), (None,), value=1.0, optimizer=ADAMW)
    self.hc_eps, self.norm_eps = cfg.hc_eps, cfg.rms_norm_eps

  def __call__(self, x: jax.Array) -> jax.Array:
    """X [B, S, N, d] -> y [B, S, d] = Σ_i (sigmoid(mixes_i · scale + base_i) + eps) X_i."""
    mixes = hc_mixes(x, self.fn[...], self.norm_eps)
    pre = jax.nn.sigmoid(mixes * self.scale[0] + self.base[...]) + self.hc_eps
    return weighted_stream_sum(x, pre)
