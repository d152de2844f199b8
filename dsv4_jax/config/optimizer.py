"""Optimizer settings: one frozen dataclass with the fields of the DeepSeek-V4 report's training section
(Muon + AdamW + LR schedule).

Defaults are DeepSeek-V4's: Muon (momentum 0.95, hybrid Newton-Schulz 8×(3.4445, −4.7750, 2.0315) then
2×(2, −1.5, 0.5), update RMS 0.18), AdamW (β 0.9/0.95, eps 1e-20), decoupled weight decay 0.1 for both,
gradient clipping at global norm 1.0; LR: linear warm-up, constant peak, cosine decay to 10% over a tail.
"""

from __future__ import annotations

import dataclasses

from dsv4_jax.config.errors import ConfigError


@dataclasses.dataclass(frozen=True)
class OptimizerConfig:
  # Learning-rate schedule (shared by Muon and AdamW: Muon's RMS matching makes one LR fit both).
  learning_rate: float = 2.7e-4
  warmup_steps: int = 2000
  total_steps: int = 100_000
  # Length of the cosine tail in steps; None means `decay_fraction * total_steps`.
  decay_steps: int | None = None
  decay_fraction: float = 0.2
  final_lr_fraction: float = 0.1
  # Muon.
  muon_momentum: float = 0.95
  muon_update_rms: float = 0.18
  ns_fast_steps: int = 8
  ns_fast_coeffs: tuple[float, float, float] = (3.4445, -4.7750, 2.0315)
  ns_final_steps: int = 2
  ns_final_coeffs: tuple[float, float, float] = (2.0, -1.5, 0.5)
  # AdamW.
  adam_b1: float = 0.9
  adam_b2: float = 0.95
  adam_eps: float = 1e-20
  # Decoupled (learning-rate scaled) weight decay, for Muon and AdamW parameters alike.
  weight_decay: float = 0.1
  # Global-norm gradient clipping; None or 0 disables it.
  grad_clip_norm: float | None = 1.0

  def __post_init__(self):
    # YAML gives lists; keep the dataclass hashable and comparable.
    for name in ("ns_fast_coeffs", "ns_final_coeffs"):
      object.__setattr__(self, name, tuple(float(c) for c in getattr(self, name)))
    self.validate()

  def validate(self) -> None:
    def need(cond, msg):
      if not cond:
        raise ConfigError(f"optimizer: {msg}")

    need(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")
    need(self.total_steps > 0, f"total_steps must be > 0, got {self.total_steps}")
    need(0 <= self.warmup_steps <= self.total_steps,
         f"warmup_steps must be in [0, total_steps={self.total_steps}], got {self.warmup_steps}")
    need(0 <= self.decay_fraction <= 1, f"decay_fraction must be in [0, 1], got {self.decay_fraction}")
    need(self.decay_steps is None or 0 <= self.decay_steps <= self.total_steps - self.warmup_steps,
         f"decay_steps must be in [0, total_steps - warmup_steps = {self.total_steps - self.warmup_steps}], "
         f"got {self.decay_steps}")
    need(self.decay_start_step >= self.warmup_steps,
         f"the decay tail ({self.tail_steps} steps) overlaps the warm-up ({self.warmup_steps} steps) "
         f"within total_steps={self.total_steps}")
    need(0 <= self.final_lr_fraction <= 1, f"final_lr_fraction must be in [0, 1], got {self.final_lr_fraction}")
    need(0 <= self.muon_momentum < 1, f"muon_momentum must be in [0, 1), got {self.muon_momentum}")
    need(self.muon_update_rms > 0, f"muon_update_rms must be > 0, got {self.muon_update_rms}")
    need(self.ns_fast_steps >= 0 and self.ns_final_steps >= 0 and self.ns_fast_steps + self.ns_final_steps > 0,
         f"Newton-Schulz needs at least one step, got {self.ns_fast_steps} + {self.ns_final_steps}")
    for name in ("ns_fast_coeffs", "ns_final_coeffs"):
      need(len(getattr(self, name)) == 3, f"{name} must be 3 numbers (a, b, c), got {getattr(self, name)}")
    need(0 <= self.adam_b1 < 1 and 0 <= self.adam_b2 < 1,
         f"adam_b1/adam_b2 must be in [0, 1), got {self.adam_b1}/{self.adam_b2}")
    need(self.adam_eps >= 0, f"adam_eps must be >= 0, got {self.adam_eps}")
    need(self.weight_decay >= 0, f"weight_decay must be >= 0, got {self.weight_decay}")
    need(self.grad_clip_norm is None or self.grad_clip_norm >= 0,
         f"grad_clip_norm must be >= 0 or None, got {self.grad_clip_norm}")

  @property
  def tail_steps(self) -> int:
    """Number of steps of the cosine decay tail."""
    if self.decay_steps is not None:
      return int(self.decay_steps)
    return int(round(self.decay_fraction * self.total_steps))

  @property
  def decay_start_step(self) -> int:
    """First step of the cosine tail (the MTP loss weight drops from 0.3 to 0.1 here)."""
    return self.total_steps - self.tail_steps

  @property
  def ns_coefficients(self) -> tuple[tuple[float, float, float], ...]:
    """Per-step Newton-Schulz coefficients (a, b, c): the fast steps, then the final ones."""
    return (self.ns_fast_coeffs,) * self.ns_fast_steps + (self.ns_final_coeffs,) * self.ns_final_steps

  def replace(self, **changes) -> "OptimizerConfig":
    return dataclasses.replace(self, **changes)
