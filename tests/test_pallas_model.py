"""The model with `kernels: pallas` (interpret mode on CPU) gives the logits and gradients of `kernels: xla`."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from helpers import tiny_model


def test_model_with_pallas_kernels_matches_xla():
  kw = dict(num_hidden_layers=2, compress_ratios=(4, 128, 0), num_hash_layers=1, attention_chunk_size=80)
  xla = tiny_model(seed=5, kernels="xla", **kw)
  pallas = tiny_model(seed=5, kernels="pallas", **kw)
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 160)))

  def grads_and_logits(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
      out = nnx.merge(graphdef, params, rest)(ids)
      return jnp.mean(out.logits ** 2) + out.aux["indexer_loss"], out.logits

    return jax.jit(jax.grad(loss, has_aux=True))(params)

  g_xla, logits_xla = grads_and_logits(xla)
  g_pallas, logits_pallas = grads_and_logits(pallas)
  assert np.abs(np.asarray(logits_pallas - logits_xla)).max() <= 1e-5 * np.abs(np.asarray(logits_xla)).max()
  flat_x, flat_p = jax.tree.leaves(g_xla), jax.tree.leaves(g_pallas)
  norm = np.sqrt(sum(float(jnp.sum(g ** 2)) for g in flat_x))
  worst = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(flat_x, flat_p))
  assert worst <= 1e-5 * norm, (worst, norm)
