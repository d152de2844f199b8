"""Muon (DeepSeek-V4 report, training) as Optax transformations: Nesterov momentum, hybrid Newton-Schulz,
RMS-matched update.

For every matrix G (gradient, shape [n, m] after moving the two matrix axes last; any other axes are
batch axes, e.g. the expert axis of a routed-expert stack [E, out, in], so each expert is its own matrix):
  M ← μ M + G                         (momentum, μ = 0.95)
  N = μ M + G                         (Nesterov input)
  X₀ = N / ‖N‖_F
  X_{k+1} = a_k X_k + (b_k A_k + c_k A_k²) X_k,   A_k = X_k X_kᵀ
      k < 8: (a, b, c) = (3.4445, −4.7750, 2.0315)   (fast: lifts small singular values)
      k ≥ 8: (a, b, c) = (2, −1.5, 0.5)               (final: pulls every singular value to 1)
  O = X_K · sqrt(max(n, m)) · 0.18    (an orthogonal n×m matrix has RMS 1/sqrt(max(n, m)))
Weight decay and the learning rate are applied after this, by the builder (decoupled: −lr·(O + wd·W)).

Relation to `optax.contrib.scale_by_muon` (optax 0.2.8), whose pieces were checked against the DeepSeek-V4 report:
  - its momentum is an EMA with bias correction, m ← βm + (1−β)g, Nesterov input
    β·m/(1−β^{t+1}) + (1−β)·g/(1−β^t): the weight on M versus G differs from the report's μM + G by
    (1−β^t)/(1−β^{t+1}) (0.51 at t = 1), so `optax.trace(decay=μ, nesterov=True)`, which is exactly
    M ← μM + G, N = μM + G, is used instead;
  - its per-step coefficient tables, batch axes (`MuonDimensionNumbers`) and consistent-RMS scaling do
    fit, but the Newton-Schulz routine and the RMS scaling live in the private `optax.contrib._muon`
    module and `scale_by_muon(beta=0)` would keep a second, unused parameter-sized momentum buffer.
    So the orthogonalisation below is written here (batched einsums, fp32), taking optax's public
    `MuonDimensionNumbers` to say which axes form the matrix.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import optax
from optax.contrib import MuonDimensionNumbers

FAST_NS_COEFFS = (3.4445, -4.7750, 2.0315)
FINAL_NS_COEFFS = (2.0, -1.5, 0.5)
HYBRID_NS_COEFFS = (FAST_NS_COEFFS,) * 8 + (FINAL_NS_COEFFS,) * 2

# Weights are stored [..., out, in] (see dsv4_jax.layers.linear): the matrix is the last two axes and
# every leading axis (the expert axis of a routed-expert stack) is a batch axis.
WEIGHT_DIMENSION_NUMBERS = MuonDimensionNumbers(reduction_axis=-1, output_axis=-2)

# Below this Frobenius norm the input is treated as zero (keeps 0 ↦ 0 instead of 0/0).
_TINY_NORM = 1e-30


def newton_schulz(x: jax.Array, coeffs: Sequence[Sequence[float]] = HYBRID_NS_COEFFS) -> jax.Array:
  """Approximately orthogonalises each matrix x[..., n, m] (its last two axes), in fp32.

  Returns X_K ≈ U Vᵀ for x = U S Vᵀ: singular values near 1, singular vectors kept, batch axes independent.
  """
  if x.ndim < 2:
    raise ValueError(f"newton_schulz: expected a matrix or a stack of matrices, got shape {x.shape}")
  coeffs = jnp.asarray(coeffs, jnp.float32)
  if coeffs.ndim != 2 or coeffs.shape[1] != 3:
    raise ValueError(f"newton_schulz: coefficients must have shape (steps, 3), got {coeffs.shape}")
  x32 = x.astype(jnp.float32)
  # f(X) = f(Xᵀ)ᵀ, so iterate on the wide orientation where the Gram matrix X Xᵀ is the smaller one.
  tall = x.shape[-2] > x.shape[-1]
  if tall:
    x32 = jnp.swapaxes(x32, -1, -2)
  norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=(-2, -1), keepdims=True))
  x32 = x32 / jnp.maximum(norm, _TINY_NORM)

  def step(xk, abc):
    gram = jnp.einsum("...ij,...kj->...ik", xk, xk)
    poly = abc[1] * gram + abc[2] * jnp.einsum("...ij,...jk->...ik", gram, gram)
    return abc[0] * xk + jnp.einsum("...ij,...jk->...ik", poly, xk), None

  x32, _ = jax.lax.scan(step, x32, coeffs)
  if tall:
    x32 = jnp.swapaxes(x32, -1, -2)
  return x32.astype(x.dtype)


def _matrix_axes(x: jax.Array, dims: MuonDimensionNumbers) -> tuple[int, int]:
  """(output axis, reduction axis) of x as non-negative ints; one axis each."""
  out_axis, red_axis = dims.output_axis, dims.reduction_axis
  if not isinstance(out_axis, int) or not isinstance(red_axis, int):
    raise ValueError(f"Muon: expected one output and one reduction axis, got {dims}")
  if x.ndim < 2:
    raise ValueError(f"Muon: parameters must have rank >= 2, got shape {x.shape}")
  out_axis, red_axis = out_axis % x.ndim, red_axis % x.ndim
  if out_axis == red_axis:
    raise ValueError(f"Muon: output and reduction axes coincide ({out_axis}) for shape {x.shape}")
  return out_axis, red_axis


def orthogonalize(x: jax.Array, dims: MuonDimensionNumbers = WEIGHT_DIMENSION_NUMBERS,
                  coeffs: Sequence[Sequence[float]] = HYBRID_NS_COEFFS) -> jax.Array:
  """Newton-Schulz on the (output, reduction) matrix of x; every other axis is a batch axis."""
  out_axis, red_axis = _matrix_axes(x, dims)
  moved = jnp.moveaxis(x, (out_axis, red_axis), (-2, -1))
  return jnp.moveaxis(newton_schulz(moved, coeffs), (-2, -1), (out_axis, red_axis))


def rms_scale(x: jax.Array, dims: MuonDimensionNumbers = WEIGHT_DIMENSION_NUMBERS) -> float:
  """sqrt(max(n, m)): the factor that gives an orthogonal n×m matrix RMS 1."""
  out_axis, red_axis = _matrix_axes(x, dims)
  return max(x.shape[out_axis], x.shape[red_axis]) ** 0.5


def orthogonalize_updates(
    coeffs: Sequence[Sequence[float]] = HYBRID_NS_COEFFS,
    update_rms: float = 0.18,
    dimension_numbers: MuonDimensionNumbers = WEIGHT_DIMENSION_NUMBERS,
) -> optax.GradientTransformation:
  """Stateless: every update leaf ↦ newton_schulz(leaf) · sqrt(max(n, m)) · update_rms."""

  def update_fn(updates, state, params=None):
    del params
    return jax.tree.map(
        lambda u: orthogonalize(u, dimension_numbers, coeffs) * (rms_scale(u, dimension_numbers) * update_rms),
        updates), state

  return optax.GradientTransformation(optax.init_empty_state, update_fn)


def scale_by_muon(
    momentum: float = 0.95,
    coeffs: Sequence[Sequence[float]] = HYBRID_NS_COEFFS,
    update_rms: float = 0.18,
    dimension_numbers: MuonDimensionNumbers = WEIGHT_DIMENSION_NUMBERS,
) -> optax.GradientTransformation:
  """Muon direction of the DeepSeek-V4 report: Nesterov momentum (μM + G), then orthogonalised and RMS-matched.

  Learning rate and weight decay are not included (see `dsv4_jax.optim.builder`).
  """
  return optax.chain(
      optax.trace(decay=momentum, nesterov=True),
      orthogonalize_updates(coeffs, update_rms, dimension_numbers),
  )
