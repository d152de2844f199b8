"""Linear layer and parameter helpers shared by every module.

Weights are stored as the released checkpoint stores them, `[out, in]`, so conversion is renaming.
Every parameter carries two pieces of metadata:
  logical_axes  its logical axis names (`dsv4_jax.parallel.mesh` maps them to mesh axes);
  optimizer     MUON (matrices [..., out, in]; leading axes are independent matrices, e.g. experts)
                or ADAMW (embedding, head, norm weights, biases, gates, sinks), read by the optimizer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4_jax.config import ModelConfig
from dsv4_jax.parallel.mesh import logical_spec


MUON, ADAMW = "muon", "adamw"
OPTIMIZERS = (MUON, ADAMW)


def param(rngs: nnx.Rngs | None, shape, axes: tuple[str | None, ...], *, optimizer: str,
          std: float | None = None, value: float | None = None, dtype=jnp.float32) -> nnx.Param:
  """An `nnx.Param` of `shape` filled with N(0, std²) noise or the constant `value`, annotated with
  its logical `axes` and the `optimizer` that updates it (MUON or ADAMW).

  Under a mesh (`jax.set_mesh`) the value is created sharded by `axes`: each device computes only its
  shard, so a model larger than one host's memory can be initialised. The noise is `jax.random`'s
  (partitionable threefry): the same values on every mesh.
  """
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"param: optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
  assert len(shape) == len(axes), (shape, axes)
  layout = dict(shape=tuple(shape), spec=logical_spec(axes, shape), dtype=jnp.dtype(dtype))
  if value is not None:
    data = _constant(value, **layout)
  else:
    data = _normal(rngs.params(), std, **layout)
  return nnx.Param(data, logical_axes=tuple(axes), optimizer=optimizer)


# One small program per (shape, layout on the mesh, dtype), shared by every parameter alike.
@functools.partial(jax.jit, static_argnames=("shape", "spec", "dtype"))
def _normal(key, std, *, shape, spec, dtype):
  return _laid_out(std * jax.random.normal(key, shape, jnp.float32), spec).astype(dtype)


@functools.partial(jax.jit, static_argnames=("shape", "spec", "dtype"))
def _constant(value, *, shape, spec, dtype):
  return _laid_out(jnp.full(shape, value, jnp.float32), spec).astype(dtype)


def _laid_out(x, spec):
  return x if spec is None else jax.lax.with_sharding_constraint(x, spec)


class Linear(nnx.Module):
  """y = x Wᵀ with W [out, in] (no bias). Computed in `dtype` (the config's compute dtype)."""

  def __init__(self, in_features: int, out_features: int, axes: tuple[str | None, str | None], *,
               rngs: nnx.Rngs, cfg: ModelConfig, dtype=None, optimizer: str = MUON):
    self.weight = param(rngs, (out_features, in_features), axes, std=cfg.init_std,
                        dtype=jnp.dtype(cfg.param_dtype), optimizer=optimizer)
    self.dtype = jnp.dtype(dtype or cfg.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.einsum("...i,oi->...o", x.astype(self.dtype), self.weight[...].astype(self.dtype))
