"""The configs shipped with the package: the top-level configs/*.yaml and the mesh presets
configs/meshes/*.yaml, installed as the data-only package `dsv4_jax.configs` (setup.py `package_dir`),
so a bare `--config tiny|flash|pro` or `--mesh fsdp` works from a wheel as well as from a checkout."""

from __future__ import annotations

import os
from importlib import resources

from dsv4_jax.config.errors import ConfigError

SHIPPED = ("tiny", "small", "flash", "pro")
MESH_PRESETS = ("data", "fsdp", "fsdp_expert8", "fsdp_context4", "tpu_v5p_pod", "h200_cluster")


def shipped_config(name: str) -> str:
  """The path of the shipped config `name` (one of SHIPPED)."""
  if name not in SHIPPED:
    raise ValueError(f"{name!r} is not a shipped config ({', '.join(SHIPPED)})")
  return str(resources.files("dsv4_jax.configs").joinpath(f"{name}.yaml"))


def resolve_config(name_or_path: str | os.PathLike) -> str:
  """`--config` value -> a path: an existing path wins, then a shipped name; anything else unchanged
  (so opening it reports the missing file)."""
  path = os.fspath(name_or_path)
  if os.path.exists(path) or path not in SHIPPED:
    return path
  return shipped_config(path)


def resolve_mesh(name_or_path: str | os.PathLike) -> str:
  """`--mesh` value -> a path: an existing path wins, then a preset name (MESH_PRESETS); ConfigError if
  it is neither."""
  path = os.fspath(name_or_path)
  if os.path.exists(path):
    return path
  if path not in MESH_PRESETS:
    raise ConfigError(f"--mesh {path}: no such file, and not a shipped mesh preset ({', '.join(MESH_PRESETS)})")
  return str(resources.files("dsv4_jax.configs").joinpath("meshes", f"{path}.yaml"))
