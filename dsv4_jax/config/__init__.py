"""Configuration: frozen dataclasses for the model, data, optimizer and training run.

A leaf of the package: it imports nothing else of dsv4_jax, so every other unit may import it.
"""

from dsv4_jax.config.data import SOURCE_KINDS, DataConfig
from dsv4_jax.config.errors import ConfigError, from_mapping
from dsv4_jax.config.mesh import MeshConfig
from dsv4_jax.config.model import ModelConfig
from dsv4_jax.config.optimizer import OptimizerConfig
from dsv4_jax.config.stability import StabilityConfig
from dsv4_jax.config.train import ATTENTION_MODES, CurriculumStage, TrainConfig

__all__ = [
    "ATTENTION_MODES", "SOURCE_KINDS", "ConfigError", "CurriculumStage", "DataConfig", "MeshConfig", "ModelConfig",
    "OptimizerConfig", "StabilityConfig", "TrainConfig", "from_mapping",
]
