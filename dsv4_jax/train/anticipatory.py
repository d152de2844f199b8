"""Anticipatory routing: MoE routing indices computed with the parameters of Δt steps earlier.

While active (after a loss-spike rollback, spike.py), step s trains on batch s as usual except that
every score-routed MoE layer uses the experts the parameters θ_{s−Δt} chose for that batch:

  at step s:   R_{s+Δt} = route(θ_s, batch_{s+Δt})     (routing-only forward, no gradients; the batch
                                                       is read Δt steps ahead, batch_stream.py)
               θ_{s+1}  = train_step(θ_s, batch_s, routing=R_s)
                 (gate weights = the current scores of the given experts, so they are trained as usual)

The first Δt steps of a period have no earlier step in the period: their indices are computed with
the parameters the period starts with. Indices are [R, B, S, K] int32 per step (R score-routed
layers; hash-routed layers take tid2eid[token], which no parameter changes, and the MTP block routes
by itself); they stay on the device, at most Δt + 1 of them at a time, and are saved with checkpoints
(`arrays` / `load`), so a resumed run continues an active period exactly.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
from flax import nnx

from dsv4_jax.train.curriculum import StepKind


def make_route_fn(graphdef, mesh: jax.sharding.Mesh | None = None):
  """A jitted `route(params, extra, batch, attention) -> [R, B, S, K] int32` (Transformer.route); with a
  `mesh`, traced on it (`jax.set_mesh`)."""

  @functools.partial(jax.jit, static_argnums=3)
  def route(params, extra, batch: dict, attention: str):
    model = nnx.merge(graphdef, params, extra)
    return model.route(batch["input_ids"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                       attention_mode=attention)

  if mesh is None:
    return route

  def route_on_mesh(*args):
    with jax.set_mesh(mesh):
      return route(*args)

  return route_on_mesh


class AnticipatoryRouting:
  """The routing indices computed ahead, and the steps [start, end) of the active period.

  route_fn: `make_route_fn(graphdef)`; delay: Δt; kind_at(step) -> the StepKind of a global step
  (its attention mode is the routing forward's); to_device(batch) -> the batch as device arrays.
  """

  def __init__(self, route_fn, delay: int, kind_at: Callable[[int], StepKind],
               to_device: Callable[[dict], dict] = lambda batch: batch):
    self.route_fn, self.delay, self.kind_at, self.to_device = route_fn, delay, kind_at, to_device
    self.start: int | None = None
    self.end: int | None = None
    self.stored: dict[int, jax.Array] = {}

  @property
  def active(self) -> bool:
    return self.end is not None

  def activate(self, step: int, steps: int) -> None:
    """Anticipate the routing of steps [step, step + steps); earlier indices are dropped."""
    self.start, self.end = step, step + steps
    self.stored = {}
    if steps <= 0:
      self.deactivate()

  def deactivate(self) -> None:
    self.start = self.end = None
    self.stored = {}

  def routing_for(self, step: int, state, peek: Callable[[int], dict], last_step: int) -> jax.Array | None:
    """Before training `step`: the indices it uses (None when inactive). Also computes, with the
    current parameters `state`, those of step + Δt (peek(Δt): its batch) and of any step in between
    that has none yet (the start of a period). No step at or past `last_step` (the end of the
    schedule) is looked at."""
    if not self.active or not self.start <= step < self.end:
      return None
    for t in range(step, min(step + self.delay, self.end - 1, last_step - 1) + 1):
      if t not in self.stored:
        self.stored[t] = self.route_fn(state.params, state.extra, self.to_device(peek(t - step)),
                                       self.kind_at(t).attention)
    return self.stored[step]

  def done(self, step: int) -> bool:
    """After training `step`: forgets its indices; True when that ended the active period."""
    self.stored.pop(step, None)
    if self.active and step + 1 >= self.end:
      self.deactivate()
      return True
    return False

  # --- checkpointing --------------------------------------------------------------------------------
  def state_dict(self) -> dict[str, Any]:
    """The JSON part (period and the steps whose indices are stored)."""
    return {"start": self.start, "end": self.end, "delay": self.delay, "steps": sorted(self.stored)}

  def arrays(self) -> dict[str, jax.Array]:
    """The stored indices, named by step (the array part of a checkpoint)."""
    return {str(step): ids for step, ids in self.stored.items()}

  def load(self, state: dict[str, Any] | None, arrays: dict[str, Any]) -> None:
    """Restores `state_dict()` and `arrays()` of a checkpoint (None: inactive)."""
    self.deactivate()
    if not state or state.get("end") is None:
      return
    self.start, self.end = int(state["start"]), int(state["end"])
    missing = [s for s in state["steps"] if str(s) not in arrays]
    if missing:
      raise ValueError(f"anticipatory routing: the checkpoint lists indices for steps {missing} but holds none")
    self.stored = {int(s): jax.numpy.asarray(arrays[str(s)]) for s in state["steps"]}
