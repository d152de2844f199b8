"""The training optimizer: one Optax chain over all parameters (DeepSeek-V4 report, training).

  g ← g · min(1, c / ‖g‖₂)                   (global-norm clipping over all parameters)
  muon  leaves: u = −lr(t) · (Muon(g) + wd · W)           Muon = momentum, Newton-Schulz, RMS 0.18
  adamw leaves: u = −lr(t) · (Adam(g; β1, β2, eps) + wd · W)
The group of each parameter is its `optimizer` metadata (`dsv4_jax.optim.partition.param_groups`).
Only nnx.Params reach the optimizer; non-Param state (router bias, hash tables) is never in the tree.
"""

from __future__ import annotations

import optax

from dsv4_jax.config import OptimizerConfig
from dsv4_jax.optim.muon import scale_by_muon
from dsv4_jax.optim.partition import ADAMW, MUON, param_groups
from dsv4_jax.optim.schedule import learning_rate_schedule


def build_optimizer(config, params) -> optax.GradientTransformation:
  """The Optax chain for `params` (an nnx.State of nnx.Param, each with `optimizer` metadata).

  `config` is an OptimizerConfig, or any config holding one as `.optimizer` (e.g. the TrainConfig).

  `params` is only inspected here (every leaf must be a Param naming its optimizer, else ValueError);
  `tx.init(params)` / `tx.update(grads, state, params)` take trees of the same structure. `params` is
  required by `update` (weight decay reads the weights).
  """
  config = getattr(config, "optimizer", config)
  if not isinstance(config, OptimizerConfig):
    raise TypeError(f"build_optimizer: expected an OptimizerConfig (or a config with .optimizer), "
                    f"got {type(config).__name__}")
  param_groups(params)  # fail now, naming the parameter, if any does not name its optimizer
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
  return optax.chain(clip, optax.partition({MUON: muon, ADAMW: adamw}, param_groups))
