"""Linear layer and parameter helpers shared by every module.

Weights are stored as the released checkpoint stores them, `[out, in]`, so conversion is renaming.
Every parameter carries two pieces of metadata:
  logical_axes  its logical axis names (`dsv4_jax.parallel.mesh` maps them to mesh axes);
  optimizer     MUON (matrices [..., out, in]; leading axes are independent matrices, e.g. experts)
                or ADAMW (embedding, head, norm weights, biases, gates, sinks), read by the optimizer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4_jax.config import ModelConfig


MUON, ADAMW = "muon", "adamw"
OPTIMIZERS = (MUON, ADAMW)


def param(rngs: nnx.Rngs | None, shape, axes: tuple[str | None, ...], *, optimizer: str,
          std: float | None = None, value: float | None = None, dtype=jnp.float32) -> nnx.Param:
  """An `nnx.Param` of `shape` filled with N(0, std²) noise or the constant `value`, annotated with
  its logical `axes` and the `optimizer` that updates it (MUON or ADAMW)."""
  if optimizer not in OPTIMIZERS:
    raise ValueError(f"param: optimizer must be one of {OPTIMIZERS}, got {optimizer!r}")
  assert len(shape) == len(axes), (shape, axes)
  if value is not None:
    data = np.full(shape, value, np.float32)
  else:
    key = rngs.params()
    if isinstance(key, jax.core.Tracer):  # under jit / eval_shape
      data = std * jax.random.normal(key, shape, jnp.float32)
    else:  # eager: draw on the host, avoiding one XLA compilation per parameter shape
      seed = np.asarray(jax.random.key_data(key)).astype(np.uint32)
      data = std * np.random.default_rng(seed).standard_normal(shape, np.float32)
    data = jnp.asarray(data, dtype)
  return nnx.Param(data, logical_axes=tuple(axes), optimizer=optimizer)


class Linear(nnx.Module):
  """y = x Wᵀ with W [out, in] (no bias). Computed in `dtype` (the config's compute dtype)."""

  def __init__(self, in_features: int, out_features: int, axes: tuple[str | None, str | None], *,
               rngs: nnx.Rngs, cfg: ModelConfig, dtype=None, optimizer: str = MUON):
    self.weight = param(rngs, (out_features, in_features), axes, std=cfg.init_std,
                        dtype=jnp.dtype(cfg.param_dtype), optimizer=optimizer)
    self.dtype = jnp.dtype(dtype or cfg.dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jnp.einsum("...i,oi->...o", x.astype(self.dtype), self.weight[...].astype(self.dtype))
