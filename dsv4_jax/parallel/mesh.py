"""Device meshes and the one table mapping logical axis names to mesh axes.

Mesh axes: data (pure data parallel), fsdp (data parallel with sharded parameters), expert (expert
parallel), tensor (tensor parallel), context (sequence parallel). Parameters carry logical axis names
in their `logical_axes` metadata (see `dsv4_jax.layers.linear.param`); `LOGICAL_RULES` maps each to
a mesh axis (or None = replicated). A dimension is only sharded when the mesh axis size divides it,
so small configs run unchanged on big meshes (a dimension is split over the axes of its rule that
divide it, the others replicate it).
"""

from __future__ import annotations

from typing import Mapping

import jax
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor", "context")

# Logical parameter / activation axis -> mesh axis (or a tuple of mesh axes, or None).
LOGICAL_RULES: dict[str, str | tuple[str, ...] | None] = {
    # parameters
    "vocab": "tensor",
    "embed": "fsdp",
    "embed_in": None,
    "q_lora": None,
    # Heads over fsdp as well: wq_b [H·D, q_lora], wo_a [G·o_lora, H·D/G] and the indexer's wq_b have no
    # embed dimension, and would otherwise be whole on every fsdp chip (most of Flash's attention state).
    "heads": ("tensor", "fsdp"),
    "index_heads": ("tensor", "fsdp"),
    "kv": None,
    "kv_pool": None,
    "o_lora": None,
    "experts": "expert",
    "mlp": "tensor",
    "hc_mix": None,
    "hc": None,
    "hc_embed": "fsdp",
    "layers": None,   # the stacked-layer axis of scanned layer groups
    # activations
    "batch": ("data", "fsdp", "expert"),
    "seq": "context",
    "streams": None,
    "act_embed": None,
}


def make_mesh(data: int = 1, fsdp: int = 1, expert: int = 1, tensor: int = 1, context: int = 1,
              devices=None) -> jax.sharding.Mesh:
  """A mesh with axes (data, fsdp, expert, tensor, context) of the given sizes.

  The product must equal the number of devices used (all of `jax.devices()` by default).
  """
  sizes = (data, fsdp, expert, tensor, context)
  devices = jax.devices() if devices is None else devices
  if int(np.prod(sizes)) != len(devices):
    raise ValueError(f"mesh axis sizes {dict(zip(MESH_AXES, sizes))} multiply to {int(np.prod(sizes))}, "
                     f"but {len(devices)} devices are available")
  # Auto axes: XLA's partitioner propagates shardings from the parameters and the constraints.
  return jax.make_mesh(sizes, MESH_AXES, devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * len(MESH_AXES))


def logical_to_spec(axes, shape, mesh: jax.sharding.Mesh,
                    rules: Mapping[str, object] = LOGICAL_RULES) -> P:
  """PartitionSpec for a value of `shape` with logical `axes`.

  A dimension is split over the mesh axes its rule names, in order, skipping each axis that would
  not divide it (e.g. 2 rows over batch axes (data 2, expert 4) are split over data only)."""
  spec, used = [], set()
  for name, dim in zip(axes, shape):
    target = rules.get(name) if name is not None else None
    targets, size = [], 1
    for t in (target,) if isinstance(target, str) else tuple(target or ()):
      if t not in used and mesh.shape[t] > 1 and dim % (size * mesh.shape[t]) == 0:
        targets.append(t)
        size *= mesh.shape[t]
    used.update(targets)
    spec.append(None if not targets else targets[0] if len(targets) == 1 else tuple(targets))
  return P(*spec)


def spec_axes(spec: P) -> list[str]:
  """The mesh axes a PartitionSpec splits over, in order."""
  return [axis for entry in spec if entry for axis in ((entry,) if isinstance(entry, str) else entry)]


def state_shardings(state: nnx.State, mesh: jax.sharding.Mesh, rules=LOGICAL_RULES):
  """A NamedSharding for every variable of an nnx.State, from its `logical_axes` metadata."""
  def one(var):
    axes = var.get_metadata().get("logical_axes") or (None,) * var.value.ndim
    return NamedSharding(mesh, logical_to_spec(axes, var.value.shape, mesh, rules))

  return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_model(model: nnx.Module, mesh: jax.sharding.Mesh, rules=LOGICAL_RULES) -> nnx.Module:
  """Places every variable of `model` on `mesh` according to its logical axes (in place)."""
  state = nnx.state(model)
  shardings = state_shardings(state, mesh, rules)
  nnx.update(model, jax.tree.map(lambda v, s: jax.device_put(v, s), nnx.to_pure_dict(state),
                                 nnx.to_pure_dict(shardings)))
  return model


def logical_spec(axes, shape, rules=LOGICAL_RULES) -> P | None:
  """The PartitionSpec of logical `axes` on the current mesh (`jax.set_mesh`); None when there is no
  mesh or the value is not split on it."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return None
  spec = logical_to_spec(axes, shape, mesh, rules)
  return spec if any(entry is not None for entry in spec) else None


def constrain(x: jax.Array, axes: tuple[str | None, ...], rules=LOGICAL_RULES) -> jax.Array:
  """with_sharding_constraint by logical activation axes; a no-op when no mesh is set."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return x
  return jax.lax.with_sharding_constraint(x, logical_to_spec(axes, x.shape, mesh, rules))


def axis_size(axis: str) -> int:
  """Devices of mesh axis `axis` in the current mesh (`jax.set_mesh`); 1 without one, and inside a
  `shard_map` that already made `axis` manual (a parallel scheme is then running)."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or axis not in mesh.axis_names:
    return 1
  if dict(zip(mesh.axis_names, mesh.axis_types))[axis] == jax.sharding.AxisType.Manual:
    return 1
  return mesh.shape[axis]
