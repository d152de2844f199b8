"""The `stability:` section of a training config: loss-spike detection, rollback and anticipatory routing.

Read by dsv4_jax/train/spike.py (detector, recovery) and dsv4_jax/train/anticipatory.py (routing
with the parameters of `routing_delay` steps earlier); docs/training_stability.md explains it for users.
"""

from __future__ import annotations

import dataclasses

from dsv4_jax.config.errors import ConfigError

SPIKE_ACTIONS = ("replay", "skip")
FAULT_KINDS = ("batch", "update")


@dataclasses.dataclass(frozen=True)
class StabilityConfig:
  """Loss-spike detection and recovery (on by default; costs nothing until a spike).

  Detector: over the last `window` steps of the current curriculum stage (at least `min_history` of
  them), the median m and the scaled median absolute deviation σ = 1.4826·MAD of the training loss;
  a step's loss is a spike when it exceeds m + max(loss_deviations·σ, loss_min_rise·m), or is not
  finite. The same test on log(gradient norm) with grad_norm_deviations (0 turns it off) and the
  floor log(1 + grad_norm_min_rise).
  Recovery: the train state rolls back to an in-memory snapshot at least `rollback_steps` steps before
  the spike (snapshots are taken every rollback_steps steps, the last two kept on the host); the
  batches from there on are trained again (`on_spike: replay`) or dropped (`skip`: training continues
  with the batch after the spike). A spike while still recovering from the previous one (in its
  replayed steps or its anticipation period) skips. More than `max_rollbacks_in_a_row` rollbacks
  before a recovery completes stop the run.
  Anticipatory routing: for `routing_steps` steps after a rollback, the MoE routing indices of each
  step's batch are those the parameters of `routing_delay` steps earlier chose (computed then, from a
  look-ahead of the data); the gate weights come from the current parameters.
  Fault injection, for testing the above only: `fault_step` set to a step injects one spike there,
  the first time the step is trained: `fault_kind: batch` replaces the batch's targets by random tokens
  (the spike is that step's loss); `update` multiplies that step's parameter update by `fault_scale`
  (the spike is the next step's loss).
  """
  enabled: bool = True
  window: int = 64
  min_history: int = 32
  loss_deviations: float = 8.0
  loss_min_rise: float = 0.1
  grad_norm_deviations: float = 10.0
  grad_norm_min_rise: float = 9.0
  rollback_steps: int = 5
  on_spike: str = "replay"
  max_rollbacks_in_a_row: int = 3
  routing_delay: int = 2
  routing_steps: int = 50
  fault_step: int | None = None
  fault_kind: str = "batch"
  fault_scale: float = 30.0

  def __post_init__(self):
    def need(ok: bool, key: str, expected: str):
      if not ok:
        raise ConfigError(f"stability.{key}: expected {expected}, got {getattr(self, key)!r}")

    need(self.window >= 3, "window", "an integer >= 3")
    need(1 <= self.min_history <= self.window, "min_history", f"an integer in 1..window ({self.window})")
    need(self.loss_deviations > 0, "loss_deviations", "a positive number")
    need(self.loss_min_rise >= 0, "loss_min_rise", "a number >= 0")
    need(self.grad_norm_deviations >= 0, "grad_norm_deviations", "a number >= 0 (0 turns the check off)")
    need(self.grad_norm_min_rise >= 0, "grad_norm_min_rise", "a number >= 0")
    need(self.rollback_steps >= 1, "rollback_steps", "an integer >= 1")
    need(self.on_spike in SPIKE_ACTIONS, "on_spike", f"one of {SPIKE_ACTIONS}")
    need(self.max_rollbacks_in_a_row >= 1, "max_rollbacks_in_a_row", "an integer >= 1")
    need(self.routing_delay >= 0, "routing_delay", "an integer >= 0")
    need(self.routing_steps >= 0, "routing_steps", "an integer >= 0 (0: roll back without anticipation)")
    need(self.fault_step is None or self.fault_step >= 0, "fault_step", "null or a step >= 0")
    need(self.fault_kind in FAULT_KINDS, "fault_kind", f"one of {FAULT_KINDS}")
    need(self.fault_scale > 0, "fault_scale", "a positive number")
