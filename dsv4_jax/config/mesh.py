"""The `mesh:` section of a training config: how a run lays its devices out.

Five axes, in the order of the device mesh (`dsv4_jax.parallel.mesh.MESH_AXES`):
  data     data parallel: batch rows split, parameters replicated
  fsdp     data parallel with parameters and optimizer state split (gathered per layer when used)
  expert   expert parallel: routed experts split, token copies sent to them (all-to-all)
  tensor   tensor parallel: heads and MLP widths split
  context  sequence parallel: each sequence split into contiguous chunks
One axis may be −1: it takes the devices the others leave (the default: pure data parallelism over
every device). The mesh is not part of what a checkpoint must match: a run resumes on another mesh.
"""

from __future__ import annotations

import dataclasses
import math
import os

import yaml

from dsv4_jax.config.errors import ConfigError, from_mapping

AXES = ("data", "fsdp", "expert", "tensor", "context")


@dataclasses.dataclass(frozen=True)
class MeshConfig:
  """Axis sizes of the device mesh; −1 (at most one axis): the rest of the devices."""
  data: int = -1
  fsdp: int = 1
  expert: int = 1
  tensor: int = 1
  context: int = 1

  def __post_init__(self):
    bad = {axis: size for axis, size in self.items() if size != -1 and size < 1}
    if bad:
      raise ConfigError(f"mesh: axis sizes must be positive, or -1 for the rest of the devices; got {bad}")
    rest = [axis for axis, size in self.items() if size == -1]
    if len(rest) > 1:
      raise ConfigError(f"mesh: at most one axis may be -1 (the rest of the devices), got {rest}")

  @classmethod
  def from_yaml(cls, path: str | os.PathLike) -> "MeshConfig":
    """A mesh preset: a YAML file whose `mesh:` section holds axis sizes (configs/meshes/*.yaml)."""
    with open(path) as f:
      raw = yaml.safe_load(f)
    if not isinstance(raw, dict) or not isinstance(raw.get("mesh"), dict):
      raise ConfigError(f"{path}: expected a mesh preset, a mapping with a `mesh:` section of axis sizes "
                        f"({', '.join(AXES)})")
    return from_mapping(cls, raw["mesh"], f"{path}: mesh")

  def items(self) -> list[tuple[str, int]]:
    return [(axis, getattr(self, axis)) for axis in AXES]

  def axis_sizes(self, devices: int, routed_experts: int | None = None) -> dict[str, int]:
    """The axis sizes on `devices` devices, −1 resolved; ConfigError if they do not fit exactly, or (given
    the model's `routed_experts`) if the expert axis does not divide them."""
    fixed = math.prod(size for _, size in self.items() if size != -1)
    sizes = dict(self.items())
    rest = [axis for axis, size in self.items() if size == -1]
    if rest:
      if devices % fixed:
        raise ConfigError(f"mesh: the fixed axes {self._fixed()} use {fixed} devices, which does not divide "
                          f"the {devices} devices available (the -1 axis {rest[0]!r} takes the rest)")
      sizes[rest[0]] = devices // fixed
    elif fixed != devices:
      raise ConfigError(f"mesh: axis sizes {sizes} multiply to {fixed}, but {devices} devices are available; "
                        f"set one axis to -1 to take the rest")
    if routed_experts is not None and routed_experts % sizes["expert"]:
      raise ConfigError(f"mesh.expert: {sizes['expert']} devices must divide model.n_routed_experts "
                        f"({routed_experts}): each holds the same number of experts")
    return sizes

  def _fixed(self) -> dict[str, int]:
    return {axis: size for axis, size in self.items() if size != -1}
