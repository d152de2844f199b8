"""CheckpointError: the one exception a caller of `load_model` catches for a malformed checkpoint."""


class CheckpointError(ValueError):
  """A checkpoint's files are malformed, inconsistent with each other, or do not match the config.

  Problems in config.json itself are `dsv4_jax.config.ConfigError`s; everything else (index, shards,
  tensors) is a CheckpointError naming the file and, where there is one, the tensor.
  """
