"""Meshes, logical axis rules and sharding helpers."""

from dsv4_jax.parallel.mesh import (LOGICAL_RULES, MESH_AXES, constrain, logical_to_spec, make_mesh,
                                    shard_model, state_shardings)

__all__ = ["LOGICAL_RULES", "MESH_AXES", "constrain", "logical_to_spec", "make_mesh", "shard_model",
           "state_shardings"]
