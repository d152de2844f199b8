"""Which optimizer updates which parameter: the parameter's own `optimizer` metadata (DeepSeek-V4
report, training).

Every trainable parameter is an `nnx.Param` whose layer declared `optimizer=MUON` (matrices
[..., out, in]; leading axes such as the expert axis are independent matrices) or `optimizer=ADAMW`
(embedding, head, norm weights, biases, gates, sinks); see `dsv4_jax.layers.linear.param`. Any other
leaf (a plain array, a Param without that metadata, a non-Param variable) is an error naming its
path: nothing is partitioned by its name, and nothing unknown is skipped silently.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from flax import nnx

from dsv4_jax.layers.linear import ADAMW, MUON, OPTIMIZERS

GROUPS = OPTIMIZERS  # (MUON, ADAMW)

Path = tuple  # of str | int


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def key_path_names(key_path) -> Path:
  """('layers', 3, 'attn', 'wq_a', 'weight') from a jax key path (drops nnx.Variable's `.value`)."""
  names = []
  for key in key_path:
    if isinstance(key, jax.tree_util.DictKey):
      names.append(key.key)
    elif isinstance(key, jax.tree_util.SequenceKey):
      names.append(key.idx)
    elif isinstance(key, jax.tree_util.GetAttrKey):
      if key.name != "value":
        names.append(key.name)
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      names.append(key.key)
    else:
      names.append(str(key))
  return tuple(names)


def path_str(path: Path) -> str:
  return ".".join(str(p) for p in path)


def _shape(leaf) -> tuple[int, ...]:
  return tuple(np.shape(leaf.get_value() if _is_variable(leaf) else leaf))


def param_group(path: Path, leaf) -> str:
  """The group ('muon' | 'adamw') of one leaf: its `optimizer` metadata. ValueError naming `path`
  if the leaf is not an nnx.Param carrying one of those values."""
  if not isinstance(leaf, nnx.Param):
    raise ValueError(f"{path_str(path)}: expected an nnx.Param with metadata optimizer in {GROUPS}, "
                     f"got {type(leaf).__name__} of shape {_shape(leaf)}")
  group = leaf.get_metadata("optimizer", None)
  if group not in GROUPS:
    raise ValueError(f"{path_str(path)}: expected an nnx.Param with metadata optimizer in {GROUPS}, "
                     f"got optimizer={group!r} (declare it where the parameter is created, "
                     "dsv4_jax.layers.linear.param)")
  return group


def param_groups(params) -> Any:
  """A tree like `params` (same structure: each Param keeps its node) holding 'muon' | 'adamw'.

  Works on parameters, gradients and updates alike (they keep the Param wrappers and metadata), so
  it can be passed as the label function of `optax.partition`.
  """
  def label(key_path, leaf):
    group = param_group(key_path_names(key_path), leaf)  # raises unless `leaf` is an annotated Param
    return leaf.replace(group)

  return jax.tree_util.tree_map_with_path(label, params, is_leaf=_is_variable)


def param_group_rows(params) -> list[tuple[str, tuple[int, ...], str]]:
  """(path, shape, group) for every parameter of `params`, in tree order."""
  rows = []
  for kp, leaf in jax.tree_util.tree_flatten_with_path(params, is_leaf=_is_variable)[0]:
    path = key_path_names(kp)
    rows.append((path_str(path), _shape(leaf), param_group(path, leaf)))
  return rows


def param_group_table(params) -> str:
  """A printable table: one line per parameter (path, shape, group), then per-group totals."""
  rows = param_group_rows(params)
  width = max([len(r[0]) for r in rows] + [9])
  lines = [f"{'parameter':<{width}}  {'shape':<16}  group"]
  for name, shape, group in rows:
    lines.append(f"{name:<{width}}  {str(shape):<16}  {group}")
  for group in GROUPS:
    members = [r for r in rows if r[2] == group]
    count = sum(int(np.prod(r[1])) for r in members)
    lines.append(f"{group}: {len(members)} tensors, {count:,} values")
  return "\n".join(lines)
