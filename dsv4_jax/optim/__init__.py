"""Optimizers: Muon (Optax transformations), the Muon/AdamW parameter partition (by metadata), LR schedule."""

from dsv4_jax.optim.builder import build_optimizer
from dsv4_jax.config import OptimizerConfig
from dsv4_jax.optim.muon import (HYBRID_NS_COEFFS, WEIGHT_DIMENSION_NUMBERS, newton_schulz, orthogonalize,
                                 orthogonalize_updates, scale_by_muon)
from dsv4_jax.optim.partition import (ADAMW, GROUPS, MUON, param_group, param_group_rows, param_group_table,
                                      param_groups)
from dsv4_jax.optim.schedule import learning_rate_schedule

__all__ = [
    "ADAMW", "GROUPS", "HYBRID_NS_COEFFS", "MUON", "WEIGHT_DIMENSION_NUMBERS", "OptimizerConfig",
    "build_optimizer", "learning_rate_schedule", "newton_schulz", "orthogonalize", "orthogonalize_updates",
    "param_group", "param_group_rows", "param_group_table", "param_groups", "scale_by_muon",
]
