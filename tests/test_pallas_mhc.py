"""Pallas mHC kernels (interpret mode) against the XLA reference dsv4_jax.ops.mhc (mhc_pre, mhc_post):
forward and every gradient, fp32 and bf16, generic and TPU interpreters; outputs poisoned."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import tpu as pltpu

from dsv4_jax.ops import mhc as reference
from pallas_kernels.common import poison_outputs
from pallas_kernels.mhc import mhc_post, mhc_pre

ITERS, EPS = 20, 1e-6


def rel_err(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def normal(rng, *shape):
  return jnp.asarray(rng.standard_normal(shape), jnp.float32)


def reference_pre(x, mixes, scale, base):
  return reference.mhc_pre(x, mixes, scale, base, iters=ITERS, eps=EPS)


def value_and_grads(fn, args, cotangents, argnums):
  def loss(*a):
    outs = fn(*a)
    outs = outs if isinstance(outs, tuple) else (outs,)
    return sum(jnp.sum(o.astype(jnp.float32) * g) for o, g in zip(outs, cotangents)), outs
  (_, outs), grads = jax.value_and_grad(loss, argnums=argnums, has_aux=True)(*args)
  return outs + tuple(grads)


def check(ours, ref, args, cotangents, tol):
  argnums = tuple(range(len(args)))
  with poison_outputs():
    got = jax.jit(lambda *a: value_and_grads(ours, a, cotangents, argnums))(*args)
  f32 = [a.astype(jnp.float32) for a in args]
  want = jax.jit(lambda *a: value_and_grads(ref, a, cotangents, argnums))(*f32)
  for i, (g, w) in enumerate(zip(got, want)):
    assert np.all(np.isfinite(np.asarray(g, np.float32))), f"output {i}: unwritten elements"
    assert rel_err(g, w) <= tol, f"output {i}: relative error {rel_err(g, w):.3g}"


def pre_args(seed, b, s, n, d, dtype):
  rng = np.random.default_rng(seed)
  m = (2 + n) * n
  args = (normal(rng, b, s, n, d).astype(dtype), normal(rng, b, s, m), normal(rng, 3), normal(rng, m))
  return args, (normal(rng, b, s, d), normal(rng, b, s, n), normal(rng, b, s, n, n))


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_pre_matches_reference(dtype, tol):
  args, cot = pre_args(0, 2, 5, 4, 16, dtype)  # 10 tokens: not a multiple of the token tile
  check(lambda *a: mhc_pre(*a, iters=ITERS, eps=EPS), reference_pre, args, cot, tol)


def test_pre_output_is_doubly_stochastic():
  (x, mixes, scale, base), _ = pre_args(1, 1, 3, 4, 8, jnp.float32)
  _, _, comb = mhc_pre(x, mixes, scale, base, iters=ITERS, eps=EPS)
  np.testing.assert_allclose(jnp.sum(comb, axis=-2), 1.0, atol=1e-4)
  np.testing.assert_allclose(jnp.sum(comb, axis=-1), 1.0, atol=1e-3)


def post_args(seed, b, s, n, d, dtype):
  rng = np.random.default_rng(seed)
  comb = jax.nn.softmax(normal(rng, b, s, n, n), axis=-1)
  args = (normal(rng, b, s, d).astype(dtype), normal(rng, b, s, n, d).astype(dtype),
          normal(rng, b, s, n), comb)
  return args, (normal(rng, b, s, n, d),)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_post_matches_reference(dtype, tol):
  args, cot = post_args(2, 2, 5, 4, 16, dtype)
  check(mhc_post, reference.mhc_post, args, cot, tol)


def test_tpu_interpret_mode():
  params = pltpu.InterpretParams(uninitialized_memory="nan")
  args, cot = pre_args(3, 1, 2, 2, 8, jnp.float32)
  check(lambda *a: mhc_pre(*a, iters=3, eps=EPS, interpret=params),
        lambda *a: reference.mhc_pre(*a, iters=3, eps=EPS), args, cot, 1e-5)
  args, cot = post_args(4, 1, 2, 2, 8, jnp.float32)
  check(lambda *a: mhc_post(*a, interpret=params), reference.mhc_post, args, cot, 1e-5)


@pytest.mark.parametrize("impl", ["pallas", "xla"])
def test_shape_errors(impl):
  pre_fn, post_fn = (mhc_pre, mhc_post) if impl == "pallas" else (reference.mhc_pre, reference.mhc_post)
  (x, mixes, scale, base), _ = pre_args(5, 1, 2, 4, 8, jnp.float32)
  with pytest.raises(ValueError, match="mixes must be"):
    pre_fn(x, mixes[..., :-1], scale, base, iters=2, eps=EPS)
  with pytest.raises(ValueError, match="mhc_post"):
    post_fn(x[..., 0, :], x, mixes[..., :4], mixes[..., :3])
