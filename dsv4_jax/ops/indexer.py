"""Lightning-indexer scores and top-k selection (reference, one query chunk at a time).

  score[b, t, i] = Σ_h w[b, t, h] · ReLU(q[b, t, h] · k[b, i])
Entries a query may not see get −inf before top-k; selected slots that are not visible become −1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax.ops import index_rules


def indexer_scores(q: jax.Array, w: jax.Array, k: jax.Array) -> jax.Array:
  """q [B, C, Hi, Di], w [B, C, Hi], k [B, N, Di] -> scores [B, C, N] (fp32)."""
  dots = jnp.einsum("bchd,bnd->bchn", q, k, preferred_element_type=jnp.float32)
  return jnp.einsum("bchn,bch->bcn", jax.nn.relu(dots), w.astype(jnp.float32))


def select_topk(scores: jax.Array, visible: jax.Array, topk: int):
  """scores, visible [B, C, N] -> (idx [B, C, K] with −1 for invisible picks, masked scores [B, C, K]).

  K = min(topk, N). Ties between equal scores are broken by the lower index.
  """
  k = min(topk, scores.shape[-1])
  masked = jnp.where(visible, scores, -jnp.inf)
  values, idx = jax.lax.top_k(masked, k)
  return index_rules.topk_slot(idx, jnp.take_along_axis(visible, idx, axis=-1)), values
