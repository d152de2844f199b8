"""Quantisation-aware simulation: FP8 / FP4 fake quantisation, the Hadamard rotation, and the model with qat.

References: a numpy closed form (power-of-two block scale 2^⌈log2(amax/qmax)⌉ in float64, ml_dtypes
round-to-nearest-even casts), hand-worked grid values, and the Walsh–Hadamard entry formula
H[i, j] = (−1)^popcount(i & j).
"""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from dsv4_jax.config import ConfigError
from dsv4_jax.layers.model import Transformer
from dsv4_jax.ops.indexer import indexer_scores
from dsv4_jax.ops.quantization import fake_quant_fp4, fake_quant_fp8, hadamard_rotate, qat_quantise
from helpers import tiny_config, tiny_model

FP8 = dict(fn=fake_quant_fp8, block=64, qmax=448.0, floor=1e-4, dtype=ml_dtypes.float8_e4m3fn)
FP4 = dict(fn=fake_quant_fp4, block=32, qmax=6.0, floor=6.0 * 2.0 ** -126, dtype=ml_dtypes.float4_e2m1fn)
QAT_SHAPES = dict(head_dim=72, index_head_dim=32,  # 72 − 8 RoPE dims = 64: one FP8 block
                  num_hidden_layers=1, compress_ratios=(4, 0))  # one CSA layer (+ window MTP)


def reference_quant(x, block, qmax, floor, dtype, **_):
  xb = np.asarray(x, np.float32).reshape(-1, block)
  amax = np.maximum(np.abs(xb).max(axis=-1, keepdims=True), np.float32(floor)).astype(np.float64)
  scale = 2.0 ** np.ceil(np.log2(amax / qmax))
  q = np.clip(xb / scale, -qmax, qmax).astype(dtype).astype(np.float64) * scale
  return q.astype(np.float32).reshape(np.shape(x)), scale


@pytest.mark.parametrize("spec", [FP8, FP4], ids=["fp8", "fp4"])
def test_fake_quant_matches_closed_form(spec):
  rng = np.random.default_rng(0)
  # Blocks spanning many magnitudes, including an all-zero block and one below the amax floor.
  x = rng.standard_normal((6, 4 * spec["block"])).astype(np.float32)
  x *= (10.0 ** rng.integers(-6, 4, (6, 4)))[..., None].repeat(spec["block"], -1).reshape(6, -1).astype(np.float32)
  x[0, :spec["block"]] = 0.0
  x[1, :spec["block"]] *= 1e-30
  expected, scale = reference_quant(x, **spec)
  got = np.asarray(jax.jit(spec["fn"])(jnp.asarray(x)))
  np.testing.assert_array_equal(got, expected)
  exponent = np.log2(scale)
  np.testing.assert_array_equal(exponent, np.round(exponent))  # power-of-two block scales


@pytest.mark.parametrize("spec", [FP8, FP4], ids=["fp8", "fp4"])
def test_representable_values_are_unchanged(spec):
  rng = np.random.default_rng(1)
  codes = rng.integers(0, 256 if spec is FP8 else 16, (8, spec["block"]), dtype=np.uint8)
  if spec is FP8:
    codes[(codes & 0x7F) == 0x7F] = 0  # NaN codes
  values = codes.view(spec["dtype"]).astype(np.float32)
  values[:, 0] = spec["qmax"]  # each block's amax is the format's max, so its scale is exactly 2^k
  x = values * np.float32(2.0) ** rng.integers(-20, 10, (8, 1)).astype(np.float32)
  np.testing.assert_array_equal(np.asarray(spec["fn"](jnp.asarray(x))), x)


def test_known_values_on_the_fp8_grid():
  x = np.zeros((2, 64), np.float32)
  x[0, :5] = [300.0, 1.1, 0.3, -0.3, 0.0]  # amax 300 -> scale 1: e4m3 steps 32 on [256, 512), 1/8 on [1, 2)
  x[1, :3] = [1000.0, 3.0, 1.1]  # amax 1000 -> scale 4: 250 -> 256, 0.75 exact, 0.275 -> 0.28125
  y = np.asarray(fake_quant_fp8(jnp.asarray(x)))
  np.testing.assert_array_equal(y[0, :5], [288.0, 1.125, 0.3125, -0.3125, 0.0])
  np.testing.assert_array_equal(y[1, :3], [1024.0, 3.0, 1.125])


def test_known_values_on_the_fp4_grid():
  x = np.zeros((2, 32), np.float32)
  x[0, :5] = [5.0, 2.4, 0.7, 0.25, -5.0]  # scale 1; ties 5 -> 4 and 0.25 -> 0 round to even
  x[1, :3] = [12.0, 5.0, 1.4]  # amax 12 -> scale 2: 2.5 -> 2 (tie, even), 0.7 -> 0.5
  y = np.asarray(fake_quant_fp4(jnp.asarray(x)))
  np.testing.assert_array_equal(y[0, :5], [4.0, 2.0, 0.5, 0.0, -4.0])
  np.testing.assert_array_equal(y[1, :3], [12.0, 4.0, 1.0])


@pytest.mark.parametrize("fn", [fake_quant_fp8, fake_quant_fp4], ids=["fp8", "fp4"])
def test_straight_through_gradient_is_identity(fn):
  rng = np.random.default_rng(2)
  x = jnp.asarray(rng.standard_normal((3, 128)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 128)), jnp.float32)
  grad = jax.grad(lambda x: jnp.sum(fn(x) * w))(x)
  np.testing.assert_array_equal(np.asarray(grad), np.asarray(w))


def test_hadamard_is_the_orthonormal_walsh_matrix():
  n = 32
  i, j = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
  popcount = np.vectorize(lambda v: bin(v).count("1"))(i & j)
  walsh = (-1.0) ** popcount / np.sqrt(n)
  rotated_identity = np.asarray(hadamard_rotate(jnp.eye(n, dtype=jnp.float32)))  # rows e_i H^T
  np.testing.assert_allclose(rotated_identity, walsh.T, atol=1e-7)
  np.testing.assert_allclose(rotated_identity @ rotated_identity.T, np.eye(n), atol=1e-6)


def test_rotation_alone_leaves_indexer_scores_unchanged():
  rng = np.random.default_rng(3)
  q = jnp.asarray(rng.standard_normal((2, 5, 4, 32)), jnp.float32)
  k = jnp.asarray(rng.standard_normal((2, 7, 32)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((2, 5, 4)), jnp.float32)
  np.testing.assert_allclose(np.asarray(indexer_scores(hadamard_rotate(q), w, hadamard_rotate(k))),
                             np.asarray(indexer_scores(q, w, k)), rtol=1e-5, atol=1e-5)


def _on_grid(y, block, qmax, dtype):
  """Each block of y is a grid value of `dtype` times a power of two (the block's scale)."""
  yb = np.asarray(y, np.float32).reshape(-1, block).astype(np.float64)
  amax = np.maximum(np.abs(yb).max(-1, keepdims=True), 1e-30)
  scale = 2.0 ** np.ceil(np.log2(amax / qmax))
  return np.array_equal((yb / scale).astype(dtype).astype(np.float64), yb / scale)


@pytest.fixture(scope="module")
def models():
  """The same weights with qat off and on."""
  model = tiny_model(seed=6, **QAT_SHAPES)
  return model, nnx.merge(nnx.graphdef(nnx.eval_shape(lambda: Transformer(model.cfg.replace(qat=True),
                                                                          rngs=nnx.Rngs(0)))),
                          nnx.state(model))


def test_layers_quantise_what_the_release_quantises(models):
  plain_model, model = models
  cfg, rd = model.cfg, model.cfg.qk_rope_head_dim
  attn = model.layers[0].attn  # CSA
  rng = np.random.default_rng(4)
  kv = jnp.asarray(rng.standard_normal((2, 9, cfg.head_dim)), jnp.float32)
  out = np.asarray(qat_quantise(kv, "kv", rd))
  np.testing.assert_array_equal(out[..., -rd:], np.asarray(kv)[..., -rd:])  # RoPE dims untouched
  np.testing.assert_array_equal(out[..., :-rd], reference_quant(np.asarray(kv)[..., :-rd], **FP8)[0])

  # Indexer q and k: FP4 values (times power-of-two block scales) of the Hadamard-rotated vectors.
  s = 16
  x = jnp.asarray(rng.standard_normal((1, s, cfg.hidden_size)), jnp.float32)
  qr = jnp.asarray(rng.standard_normal((1, s, cfg.q_lora_rank)), jnp.float32)
  positions = jnp.arange(s)[None]
  run = jax.jit(lambda indexer, x, qr: indexer(x, qr, positions, attn.freqs))
  q, _, k, _ = run(attn.indexer, x, qr)
  assert _on_grid(q, 32, 6.0, ml_dtypes.float4_e2m1fn) and _on_grid(k, 32, 6.0, ml_dtypes.float4_e2m1fn)
  q0, _, k0, _ = run(plain_model.layers[0].attn.indexer, x, qr)
  assert not _on_grid(q0, 32, 6.0, ml_dtypes.float4_e2m1fn)
  # Undoing the rotation (H is symmetric and orthonormal, its own inverse) lands near the unquantised q, k.
  for quantised, plain in ((q, q0), (k, k0)):
    err = np.abs(np.asarray(hadamard_rotate(quantised)) - np.asarray(plain)).max() / np.abs(np.asarray(plain)).max()
    assert 0 < err < 0.25, err


def test_model_with_qat_trains_and_stays_close(models):
  plain_model, model = models
  ids = jnp.asarray(np.random.default_rng(6).integers(0, model.cfg.vocab_size, (1, 64)))

  def loss_and_logits(model):
    out = model(ids, with_mtp=False)
    logp = jax.nn.log_softmax(out.logits[:, :-1], axis=-1)
    loss = -jnp.mean(jnp.take_along_axis(logp, ids[:, 1:, None], axis=-1))
    return loss + out.aux["indexer_loss"], out.logits

  (loss_q, logits_q), grads = nnx.jit(nnx.value_and_grad(loss_and_logits, has_aux=True))(model)
  loss_f, logits_f = nnx.jit(loss_and_logits)(plain_model)
  assert np.isfinite(float(loss_q)) and all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
  attn = grads["layers"][0]["attn"]
  for through in (attn["wkv"]["weight"], attn["compressor"]["wkv"]["weight"],  # FP8 KV
                  attn["indexer"]["wq_b"]["weight"], attn["indexer"]["compressor"]["wkv"]["weight"]):  # FP4
    assert np.abs(np.asarray(through[...])).max() > 0  # straight-through gradients reach the projections
  # Per position: max |Δlogit| / max |logit|. FP8 moves the KV by ~2.5% (relative norm) and FP4 indexer
  # scores can flip near-tied top-k picks, which a randomised model amplifies at a few positions, so
  # judge the median over positions.
  per_position = np.abs(np.asarray(logits_q - logits_f)).max(-1)[0] / np.abs(np.asarray(logits_f)).max()
  assert 1e-4 < np.median(per_position) < 0.1, np.median(per_position)
  assert abs(float(loss_q) - float(loss_f)) < 0.05 * abs(float(loss_f))


def test_qat_needs_block_aligned_dims():
  with pytest.raises(ConfigError, match=r"qat: head_dim − qk_rope_head_dim \(24\) must be a multiple of 64"):
    Transformer(tiny_config(qat=True), rngs=nnx.Rngs(0))
  with pytest.raises(ConfigError, match=r"qat: index_head_dim must be a power of two ≥ 32 .*got 48"):
    Transformer(tiny_config(qat=True, head_dim=72, index_head_dim=48), rngs=nnx.Rngs(0))
