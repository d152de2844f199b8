"""ConfigError and `from_mapping`, the one place where a config section's unknown keys are rejected."""

from __future__ import annotations

import dataclasses
from typing import Any, Mapping, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
  """A configuration value is missing, unknown or inconsistent."""


def from_mapping(cls: type[T], values: Mapping[str, Any] | None, section: str, **fixed: Any) -> T:
  """Builds the frozen dataclass `cls` from `values` (a YAML / JSON mapping; None means empty).

  `section` names the mapping in error messages ("model", "train", "curriculum[1]", ...). `fixed` are
  fields the caller supplies itself: they are not accepted from `values`. A key that is not a field of
  `cls` is a ConfigError naming the section, the unknown keys and the known ones.
  """
  if values is None:
    values = {}
  if not isinstance(values, Mapping):
    raise ConfigError(f"{section}: expected a mapping of config keys, got {type(values).__name__}")
  reserved = sorted(str(k) for k in set(values) & set(fixed))
  if reserved:
    raise ConfigError(f"{section}: keys {reserved} may not be set here (they come from another section or are derived)")
  known = sorted(f.name for f in dataclasses.fields(cls) if f.init and f.name not in fixed)
  unknown = sorted(str(k) for k in set(values) - set(known))
  if unknown:
    raise ConfigError(f"unknown {section} keys {unknown}; known keys: {known}")
  return cls(**values, **fixed)
