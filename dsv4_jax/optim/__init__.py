"""Optimizers: Muon (Optax transformations), the Muon/AdamW/frozen parameter partition, LR schedule."""

from dsv4_jax.optim.builder import build_optimizer
from dsv4_jax.optim.config import OptimizerConfig
from dsv4_jax.optim.muon import (HYBRID_NS_COEFFS, WEIGHT_DIMENSION_NUMBERS, newton_schulz, orthogonalize,
                                 orthogonalize_updates, scale_by_muon)
from dsv4_jax.optim.partition import (ADAMW, FROZEN, GROUPS, MUON, RULES, match_rule, param_group_rows,
                                      param_group_table, param_groups)
from dsv4_jax.optim.schedule import learning_rate_schedule

__all__ = [
    "ADAMW", "FROZEN", "GROUPS", "HYBRID_NS_COEFFS", "MUON", "RULES", "WEIGHT_DIMENSION_NUMBERS",
    "OptimizerConfig", "build_optimizer", "learning_rate_schedule", "match_rule", "newton_schulz",
    "orthogonalize", "orthogonalize_updates", "param_group_rows", "param_group_table", "param_groups",
    "scale_by_muon",
]
