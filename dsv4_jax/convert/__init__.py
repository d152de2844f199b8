"""Released-checkpoint loading and saving."""

from dsv4_jax.convert.checkpoint import CheckpointError, expected_tensors, load_model, save_checkpoint

__all__ = ["CheckpointError", "expected_tensors", "load_model", "save_checkpoint"]
