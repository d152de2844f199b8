"""The whole model with `kernels: pallas` (interpret mode on CPU) equals `kernels: xla`, end to end: in
training (logits and every gradient, with the sparse attention, the indexer scoring and mHC pre/post all
running as Pallas kernels) and in decoding (prefill, then cached decode steps). Tolerance: 1e-5 relative
(fp32; the kernels sum in another order)."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from helpers import forward_fn, tiny_model
from dsv4_jax.inference import Engine

# A CSA layer (indexer top-8), an HCA layer and a window-only MTP layer; 80-query chunks.
KW = dict(num_hidden_layers=2, compress_ratios=(4, 128, 0), num_hash_layers=1, attention_chunk_size=80)
TOL = 1e-5


def relative(a, b) -> float:
  a, b = np.asarray(a), np.asarray(b)
  return float(np.abs(a - b).max() / np.abs(b).max())


def test_training_logits_and_gradients_match_xla():
  ids = jnp.asarray(np.random.default_rng(0).integers(0, 256, (1, 160)))

  def grads_and_logits(model):
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
      out = nnx.merge(graphdef, params, rest)(ids)
      return jnp.mean(out.logits ** 2) + jnp.mean(out.mtp_logits ** 2) + out.aux["indexer_loss"], out.logits

    return jax.jit(jax.grad(loss, has_aux=True))(params)

  g_xla, logits_xla = grads_and_logits(tiny_model(seed=5, kernels="xla", **KW))
  g_pallas, logits_pallas = grads_and_logits(tiny_model(seed=5, kernels="pallas", **KW))
  assert relative(logits_pallas, logits_xla) <= TOL
  flat_x, flat_p = jax.tree.leaves(g_xla), jax.tree.leaves(g_pallas)
  norm = np.sqrt(sum(float(jnp.sum(g ** 2)) for g in flat_x))
  worst = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(flat_x, flat_p))
  assert worst <= TOL * norm, (worst, norm)
  indexer = g_pallas["layers"][0]["attn"]["indexer"]["wq_b"]["weight"][...]
  assert float(jnp.abs(indexer).max()) > 0  # the KL gradient reached the indexer through its kernel


def test_decoding_matches_xla_and_the_full_forward():
  """Prefill 150 tokens, then 10 decode steps (positions 150..159: entries complete at 151, 155, 159)."""
  seq = np.random.default_rng(1).integers(0, 256, (1, 160)).astype(np.int32)
  steps = {}
  for kernels in ("xla", "pallas"):
    engine = Engine(tiny_model(seed=6, kernels=kernels, **KW))
    logits, cache = engine.prefill(seq[:, :150], 160)
    steps[kernels] = [np.asarray(logits)[0, -1]]
    for t in range(150, 159):
      logits, cache = engine.decode(seq[:, t:t + 1], cache)
      steps[kernels].append(np.asarray(logits)[0, 0])
  reference = np.asarray(forward_fn(tiny_model(seed=6, kernels="xla", **KW), with_mtp=False)(
      jnp.asarray(seq)).logits)[0, 149:159]
  for kernels, got in steps.items():
    assert relative(np.stack(got), reference) <= TOL, kernels
  assert relative(np.stack(steps["pallas"]), np.stack(steps["xla"])) <= TOL
