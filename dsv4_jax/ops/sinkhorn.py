"""Sinkhorn-Knopp normalisation of the mHC residual-mixing matrix (fp32).

comb = softmax_lastdim(logits) + eps; cols /= (col sum + eps); then (iters − 1) rounds of
rows /= (row sum + eps), cols /= (col sum + eps). The result is (nearly) doubly stochastic.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def sinkhorn(logits: jax.Array, iters: int, eps: float) -> jax.Array:
  """logits [..., n, n] -> comb [..., n, n] (fp32), `iters` Sinkhorn-Knopp normalisations in all."""
  comb = jax.nn.softmax(logits.astype(jnp.float32), axis=-1) + eps
  comb = comb / (jnp.sum(comb, axis=-2, keepdims=True) + eps)

  def round_(_, c):
    c = c / (jnp.sum(c, axis=-1, keepdims=True) + eps)
    return c / (jnp.sum(c, axis=-2, keepdims=True) + eps)

  return jax.lax.fori_loop(0, iters - 1, round_, comb)
