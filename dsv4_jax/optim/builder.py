"""The training optimizer: one Optax chain over all parameters (SPEC §6).

  g ← g · min(1, c / ‖g‖₂)                   (global-norm clipping over the trainable leaves only)
  muon  leaves: u = −lr(t) · (Muon(g) + wd · W)           Muon = momentum, Newton-Schulz, RMS 0.18
  adamw leaves: u = −lr(t) · (Adam(g; β1, β2, eps) + wd · W)
  frozen leaves: u = 0                                    (router bias, tid2eid)
The group of each leaf comes from `dsv4_jax.optim.partition.param_groups` (path rules).
"""

from __future__ import annotations

import jax
import optax

from dsv4_jax.optim.config import OptimizerConfig
from dsv4_jax.optim.muon import scale_by_muon
from dsv4_jax.optim.partition import ADAMW, FROZEN, MUON, param_groups
from dsv4_jax.optim.schedule import learning_rate_schedule


def _trainable_mask(tree):
  return jax.tree.map(lambda group: group != FROZEN, param_groups(tree))


def build_optimizer(config, params) -> optax.GradientTransformation:
  """The Optax chain for `params` (an nnx.State of nnx.Param, or any pytree with released-name paths).

  `config` is an OptimizerConfig, or any config holding one as `.optimizer` (e.g. the TrainConfig).

  `params` is only inspected here (every parameter must match a partition rule, else ValueError);
  `tx.init(params)` / `tx.update(grads, state, params)` take trees of the same structure. `params` is
  required by `update` (weight decay reads the weights).
  """
  config = getattr(config, "optimizer", config)
  if not isinstance(config, OptimizerConfig):
    raise TypeError(f"build_optimizer: expected an OptimizerConfig (or a config with .optimizer), "
                    f"got {type(config).__name__}")
  param_groups(params)  # fail now, naming the parameter, if any has no rule
  schedule = learning_rate_schedule(config)
  muon = optax.chain(
      scale_by_muon(config.muon_momentum, config.ns_coefficients, config.muon_update_rms),
      optax.add_decayed_weights(config.weight_decay),
      optax.scale_by_learning_rate(schedule),
  )
  adamw = optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2, eps=config.adam_eps,
                      weight_decay=config.weight_decay)
  clip = (optax.clip_by_global_norm(config.grad_clip_norm) if config.grad_clip_norm
          else optax.identity())
  return optax.chain(
      # Frozen leaves (possibly integer) take no part in the clipping norm.
      optax.masked(clip, _trainable_mask),
      optax.partition({MUON: muon, ADAMW: adamw, FROZEN: optax.set_to_zero()}, param_groups),
  )
