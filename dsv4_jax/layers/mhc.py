"""Manifold-constrained hyper-connections (mHC): n residual streams mixed by a doubly stochastic matrix.

The NNX modules only; the math (shapes, equations) is in dsv4_jax/ops/mhc.py, and `pre` / `post` run
the kernel chosen by `dispatch.mhc_pre(cfg.kernels)` / `dispatch.mhc_post(cfg.kernels)` (Pallas or the
XLA reference, same function).

Shapes: X [B, S, N, d] (N = hc_mult streams), y [B, S, d].
  pre:  mixes = hc_mixes(X, fn);  y = Σ_i pre_i X_i  -> (y, post [B, S, N], comb [B, S, N, N])
  post: Y_j = post_j · F(y) + Σ_i comb[i, j] X_i
All mixing arithmetic is fp32.

Use around any block of your own:
    hc = HyperConnection(dim, cfg, rngs=rngs)
    y, post, comb = hc.pre(X)
    X = hc.post(my_block(y), X, post, comb)
"""

from __future__ import annotations

import jax
from flax import nnx

from dsv4_jax.config import ModelConfig
from dsv4_jax.layers.linear import ADAMW, MUON, param
from dsv4_jax.ops import dispatch
from dsv4_jax.ops import mhc as mhc_ops


class HyperConnection(nnx.Module):
  """The mHC parameters of one sublayer: fn [(2+N)·N, N·d], base [(2+N)·N], scale [3] (fp32)."""

  def __init__(self, dim: int, cfg: ModelConfig, *, rngs: nnx.Rngs):
    n = cfg.hc_mult
    self.fn = param(rngs, (cfg.mix_hc, n * dim), ("hc_mix", "hc_embed"), std=cfg.init_std, optimizer=MUON)
    self.base = param(None, (cfg.mix_hc,), ("hc_mix",), value=0.0, optimizer=ADAMW)
    self.scale = param(None, (3,), (None,), value=1.0, optimizer=ADAMW)
    self.n, self.iters, self.hc_eps, self.norm_eps = n, cfg.hc_sinkhorn_iters, cfg.hc_eps, cfg.rms_norm_eps
    self.kernels = cfg.kernels

  def pre(self, x: jax.Array):
    """mhc_pre: X [B, S, N, d] -> (y [B, S, d], post [B, S, N], comb [B, S, N, N])."""
    mixes = mhc_ops.hc_mixes(x, self.fn[...], self.norm_eps)
    return dispatch.mhc_pre(self.kernels)(x, mixes, self.scale[...], self.base[...], iters=self.iters,
                                          eps=self.hc_eps)

  def post(self, y: jax.Array, x: jax.Array, post: jax.Array, comb: jax.Array) -> jax.Array:
    """mhc_post: y = F(pre output) [B, S, d], X [B, S, N, d] -> Y [B, S, N, d] = post_j · y + Σ_i comb[i, j] X_i."""
    return dispatch.mhc_post(self.kernels)(y, x, post, comb)


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
    mixes = mhc_ops.hc_mixes(x, self.fn[...], self.norm_eps)
    pre = jax.nn.sigmoid(mixes * self.scale[0] + self.base[...]) + self.hc_eps
    return mhc_ops.weighted_stream_sum(x, pre)
