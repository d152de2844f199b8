"""Where a run's arrays live on the device mesh: the train state, batches, routing indices, metrics.

  parameters      by their logical axes (`parallel.mesh.state_shardings`, LOGICAL_RULES)
  optimizer state each per-parameter leaf (momentum, Adam moments) like its parameter; counts replicated
  batch [B, S]    rows over the batch axes (data, fsdp, expert: those that divide B), the sequence over
                  context; built from each process's own rows (`jax.make_array_from_process_local_data`)
  routing         [R, B, S, K] like the batch
  metrics, step   replicated
The train and eval steps are compiled with exactly these shardings (train/step.py), so a step's output
state has the layout of its input and the donated buffers are reused.
"""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from dsv4_jax.parallel.mesh import LOGICAL_RULES, logical_to_spec, spec_axes, state_shardings
from dsv4_jax.train.step import TrainState

BATCH_AXES = ("batch", "seq")
ROUTING_AXES = (None, "batch", "seq", None)


@dataclasses.dataclass(frozen=True)
class Placement:
  """The shardings of one run on `mesh`. state: a TrainState of NamedSharding."""
  mesh: jax.sharding.Mesh
  state: TrainState

  @classmethod
  def of(cls, mesh: jax.sharding.Mesh, params, extra, tx: optax.GradientTransformation) -> "Placement":
    """The placement of a train state with these `params` / `extra` (nnx.State, arrays or shapes)."""
    replicated = NamedSharding(mesh, P())
    param_shardings = state_shardings(params, mesh)
    # Per-parameter leaves (masked ones, of the other optimizer group, hold nothing) take the parameter's.
    opt_state = optax.tree_utils.tree_map_params(
        tx, lambda leaf, sharding: jax.tree.map(lambda _: sharding, leaf), jax.eval_shape(tx.init, params),
        param_shardings, transform_non_params=lambda leaf: jax.tree.map(lambda _: replicated, leaf),
        is_leaf=lambda x: isinstance(x, nnx.Variable))
    return cls(mesh, TrainState(step=replicated, params=param_shardings, extra=state_shardings(extra, mesh),
                                opt_state=opt_state))

  def batch_sharding(self, shape: tuple[int, ...]) -> NamedSharding:
    return NamedSharding(self.mesh, logical_to_spec(BATCH_AXES, shape, self.mesh))

  def routing_sharding(self, shape: tuple[int, ...]) -> NamedSharding:
    return NamedSharding(self.mesh, logical_to_spec(ROUTING_AXES, shape, self.mesh))

  def batch(self, rows: dict[str, np.ndarray]) -> dict[str, jax.Array]:
    """This process's rows of a batch -> global arrays laid out by `batch_sharding`.

    With one process `rows` is the whole batch; with several, each passes its own consecutive rows.
    """
    return {key: jax.make_array_from_process_local_data(self.batch_sharding(self._global(value.shape)),
                                                        np.asarray(value), self._global(value.shape))
            for key, value in rows.items()}

  def local_rows(self, rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """This process's consecutive rows of a batch every process holds whole (e.g. a validation sample)."""
    count = jax.process_count()
    return {key: np.split(np.asarray(value), count)[jax.process_index()] for key, value in rows.items()}

  def routing(self, ids) -> jax.Array:
    """Routing indices [R, B, S, K] (from a route step, a checkpoint or −1s) laid out for the train step.
    Host values (every process holds the same) are placed shard by shard."""
    sharding = self.routing_sharding(ids.shape)
    if isinstance(ids, jax.Array) and (ids.sharding == sharding or not ids.is_fully_addressable):
      return jax.device_put(ids, sharding)
    host = np.asarray(ids)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])

  def put_state(self, state: TrainState) -> TrainState:
    return jax.device_put(state, self.state)

  @staticmethod
  def _global(shape: tuple[int, ...]) -> tuple[int, ...]:
    return (shape[0] * jax.process_count(), *shape[1:])

  def describe(self, batch_size: int, seq_len: int) -> str:
    """One line: the mesh and how a [batch_size, seq_len] batch is split (replicated axes named)."""
    spec = logical_to_spec(BATCH_AXES, (batch_size, seq_len), self.mesh)
    used = set(spec_axes(spec))
    split_axes = (*LOGICAL_RULES["batch"], LOGICAL_RULES["seq"])
    idle = [f"{axis} {size}" for axis, size in self.mesh.shape.items()
            if size > 1 and axis in split_axes and axis not in used]
    sizes = ", ".join(f"{axis} {size}" for axis, size in self.mesh.shape.items() if size > 1) or "1 device"
    line = f"mesh ({sizes}); batch [{batch_size}, {seq_len}] split as {tuple(spec)}"
    if idle:
      line += f" (does not divide over {', '.join(idle)}: those devices compute copies)"
    return line
