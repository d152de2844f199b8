"""ConfigError, `from_mapping` (the one place where a config section's unknown keys and mistyped values
are rejected) and the typed parsing of `--set key=value` texts (`parse_text`)."""

from __future__ import annotations

import dataclasses
import functools
import types
import typing
from typing import Any, Iterable, Mapping, TypeVar

T = TypeVar("T")


class ConfigError(ValueError):
  """A configuration value is missing, unknown or inconsistent."""


def check_keys(cls: type, keys: Iterable[Any], section: str, fixed: Iterable[str] = (), context: str = "") -> None:
  """Raises a ConfigError for keys that are not init fields of the dataclass `cls` (naming the section,
  the unknown keys and the known ones) or that are in `fixed` (fields supplied elsewhere). `context`
  prefixes the message (e.g. "--set optimizer.lr=1")."""
  keys, fixed = set(keys), set(fixed)
  prefix = f"{context}: " if context else ""
  reserved = sorted(str(k) for k in keys & fixed)
  if reserved:
    raise ConfigError(f"{prefix}{section}: keys {reserved} may not be set here "
                      "(they come from another section or are derived)")
  known = sorted(f.name for f in dataclasses.fields(cls) if f.init and f.name not in fixed)
  unknown = sorted(str(k) for k in keys - set(known))
  if unknown:
    raise ConfigError(f"{prefix}unknown {section} keys {unknown}; known keys: {known}")


def from_mapping(cls: type[T], values: Mapping[str, Any] | None, section: str, **fixed: Any) -> T:
  """Builds the frozen dataclass `cls` from `values` (a YAML / JSON mapping; None means empty).

  `section` names the mapping in error messages ("model", "train", "curriculum[1]", ...). `fixed` are
  fields the caller supplies itself: they are not accepted from `values`. A key that is not a field of
  `cls` is a ConfigError naming the section, the unknown keys and the known ones; a value of the wrong
  type for its field's annotation is a ConfigError naming the key, the value and the expected type
  (`check_value`).
  """
  if values is None:
    values = {}
  if not isinstance(values, Mapping):
    raise ConfigError(f"{section}: expected a mapping of config keys, got {type(values).__name__}")
  check_keys(cls, values, section, fixed)
  hints = field_types(cls)
  typed = {k: check_value(v, hints[k], f"{section}.{k}") for k, v in values.items()}
  return cls(**typed, **fixed)


# --- typed values ---------------------------------------------------------------------------------
# A field's annotation decides what a config value may be: int, float, bool, str, `X | None`, and
# tuples of those (`tuple[int, ...]` or fixed length `tuple[float, float, float]`). Other annotations
# (nested dataclasses, Any) are not checked here.

_NULL = {"null", "none", "~", ""}
_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


class _Mismatch(Exception):
  """A value does not fit the annotation (turned into a ConfigError naming the whole value)."""


@functools.lru_cache(maxsize=None)
def field_types(cls: type) -> dict[str, Any]:
  """Field name -> resolved annotation of the dataclass `cls` (the modules use postponed annotations)."""
  hints = typing.get_type_hints(cls)
  return {f.name: hints.get(f.name, Any) for f in dataclasses.fields(cls)}


def _split_optional(tp) -> tuple[Any, bool]:
  """(X, True) for `X | None` / Optional[X]; (tp, False) otherwise."""
  if typing.get_origin(tp) in (typing.Union, types.UnionType):
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if len(args) == 1 and len(args) < len(typing.get_args(tp)):
      return args[0], True
  return tp, False


def _tuple_items(tp) -> tuple[Any, int | None] | None:
  """(item type, fixed length or None) of a homogeneous tuple annotation; None if `tp` is not one."""
  if typing.get_origin(tp) is not tuple:
    return None
  args = typing.get_args(tp)
  if len(args) == 2 and args[1] is Ellipsis:
    return args[0], None
  if args and all(a == args[0] for a in args):
    return args[0], len(args)
  return None


def describe(tp) -> str:
  """The expected type in words: "an integer", "a float or null", "a list of 3 floats", ..."""
  inner, optional = _split_optional(tp)
  if optional:
    return f"{describe(inner)} or null"
  items = _tuple_items(tp)
  if items is not None:
    item, length = items
    plural = {int: "integers", float: "floats", str: "strings", bool: "booleans"}.get(item, "values")
    return f"a list of {length} {plural}" if length is not None else f"a list of {plural}"
  return {int: "an integer", float: "a float", bool: "a boolean (true/false)", str: "a string"}.get(
      tp, getattr(tp, "__name__", str(tp)))


def _is_checked(tp) -> bool:
  inner, _ = _split_optional(tp)
  return inner in (int, float, bool, str) or _tuple_items(inner) is not None


def _scalar_from_text(text: str, tp):
  s = text.strip()
  if tp is str:
    return text
  if tp is bool:
    if s.lower() in _TRUE:
      return True
    if s.lower() in _FALSE:
      return False
    raise _Mismatch
  if tp is int:
    try:
      return int(s)
    except ValueError:
      pass
    try:  # 1e6, 2.0: integral floats are fine
      f = float(s)
    except ValueError:
      raise _Mismatch from None
    if f.is_integer():
      return int(f)
    raise _Mismatch
  if tp is float:
    try:
      return float(s)
    except ValueError:
      raise _Mismatch from None
  return text


def _scalar(value, tp):
  """A YAML / JSON scalar checked against int, float, bool or str (strings are parsed as `--set` texts,
  so YAML 1.1's `1e-3`, a string, is a float where a float is expected)."""
  if isinstance(value, str):
    return _scalar_from_text(value, tp)
  if tp is bool:
    if isinstance(value, bool):
      return value
    if isinstance(value, int) and value in (0, 1):
      return bool(value)
    raise _Mismatch
  if isinstance(value, bool):  # bool is an int subclass: True is not a number here
    raise _Mismatch
  if tp is int:
    if isinstance(value, int):
      return value
    if isinstance(value, float) and value.is_integer():
      return int(value)
    raise _Mismatch
  if tp is float:
    if isinstance(value, (int, float)):
      return float(value)
    raise _Mismatch
  if tp is str:
    raise _Mismatch
  return value


def _convert(value, tp, from_text: bool):
  inner, optional = _split_optional(tp)
  if value is None or (from_text and isinstance(value, str) and value.strip().lower() in _NULL and inner is not str):
    if optional:
      return None
    raise _Mismatch
  if from_text and optional and inner is str and value.strip().lower() in _NULL - {""}:
    return None
  items = _tuple_items(inner)
  if items is not None:
    item, length = items
    if isinstance(value, str):
      if from_text:
        import yaml
        s = value.strip()
        if s.startswith("["):
          try:
            value = yaml.safe_load(s)
          except yaml.YAMLError:
            raise _Mismatch from None
        else:
          value = [p.strip() for p in s.split(",")] if s else []
      else:  # one string in a YAML file: a one-element list
        value = [value]
    if not isinstance(value, (list, tuple)):
      raise _Mismatch
    if length is not None and len(value) != length:
      raise _Mismatch
    return tuple(_scalar(v, item) for v in value)
  if inner in (int, float, bool, str):
    return _scalar_from_text(value, inner) if from_text and isinstance(value, str) else _scalar(value, inner)
  return value


def check_value(value, tp, label: str):
  """`value` (from a YAML / JSON file, or given in Python) converted to the annotation `tp`: ints for
  int, floats for float (an int is fine), tuples for tuple fields; a ConfigError
  "<label>: expected a float, got 'abc'" if it does not fit."""
  if not _is_checked(tp):
    return value
  try:
    return _convert(value, tp, from_text=False)
  except _Mismatch:
    raise ConfigError(f"{label}: expected {describe(tp)}, got {value!r}") from None


def parse_text(text: str, tp, label: str):
  """A `--set` value (text) parsed against the annotation `tp`: int (`12`, `1e3`), float (`1e-3`, `2`),
  bool (true/false/yes/no/on/off/1/0), str (as is), `X | None` (`null` / `none`), tuples (`[0,4,128]`
  or `0,4,128`). A ConfigError "<label>: expected a float, got 'abc'" if it does not parse."""
  if not _is_checked(tp):
    import yaml
    try:
      return yaml.safe_load(text)
    except yaml.YAMLError:
      return text
  try:
    return _convert(text, tp, from_text=True)
  except _Mismatch:
    raise ConfigError(f"{label}: expected {describe(tp)}, got {text!r}") from None
