"""Learning-rate schedule: linear warm-up, constant peak, cosine decay to a final fraction over a tail.

For step t (0-based: the number of updates applied before this one), peak η, warm-up W, decay start
D = total_steps − tail, tail length T and final fraction f:
  t < W:        η · (t + 1) / W                              (the first step already moves)
  W ≤ t < D:    η
  t ≥ D:        η · (f + (1 − f) · ½ (1 + cos(π · min(1, (t − D) / T))))
                (η at t = D, f·η from t = total_steps on)
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import optax

from dsv4_jax.config import OptimizerConfig


def learning_rate_schedule(config: OptimizerConfig) -> optax.Schedule:
  """The step → learning-rate function of `config` (jit-compatible; also usable for logging)."""
  peak = float(config.learning_rate)
  warmup = int(config.warmup_steps)
  decay_start = int(config.decay_start_step)
  tail = int(config.tail_steps)
  final = float(config.final_lr_fraction)

  def schedule(step):
    t = jnp.asarray(step, jnp.float32)
    warm = peak * jnp.minimum(1.0, (t + 1.0) / max(warmup, 1))
    progress = jnp.clip((t - decay_start) / max(tail, 1), 0.0, 1.0)
    cosine = peak * (final + (1.0 - final) * 0.5 * (1.0 + jnp.cos(math.pi * progress)))
    return jnp.where(t < warmup, warm, jnp.where(t < decay_start, peak, cosine))

  return schedule
