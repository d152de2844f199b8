"""Which optimizer updates which parameter: explicit rules on the parameter path (SPEC §6).

Groups:
  muon    every projection matrix [out, in] (attention, compressor, indexer, router gate, shared
          experts, MTP projections, mHC dynamic projections `fn`) and every routed-expert stack
          [E, out, in] (the expert axis is a batch axis: each expert is its own matrix);
  adamw   embedding, output head, every RMSNorm weight, mHC static biases (`base`) and gates (`scale`),
          attention sinks, compressor position biases (`ape`), and any other 1-D parameter;
  frozen  the aux-loss-free router bias (`gate.bias`) and hash-routing table (`gate.tid2eid`):
          no gradient update at all (the balancing rule in the training loop moves the bias).
Rules are tried in order; the first match decides. A parameter of rank ≥ 2 that no rule names is
an error, so a new parameter cannot silently fall into the wrong optimizer.

Paths are tuples of released-name components, e.g. ('layers', 3, 'attn', 'wq_a', 'weight'); they are
read from any pytree (nnx.State of Variables, or a plain nested dict of arrays).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import numpy as np

MUON = "muon"
ADAMW = "adamw"
FROZEN = "frozen"
GROUPS = (MUON, ADAMW, FROZEN)

Path = tuple  # of str | int


class Rule(NamedTuple):
  name: str
  group: str
  matches: Callable[[Path, tuple[int, ...], Any], bool]


def _last(path: Path, k: int = 1) -> tuple:
  return tuple(path[-k:]) if len(path) >= k else ()


def _parent(path: Path) -> str:
  return str(path[-2]) if len(path) >= 2 else ""


RULES: tuple[Rule, ...] = (
    Rule("router bias (aux-loss-free balancing)", FROZEN, lambda p, s, d: _last(p, 2) == ("gate", "bias")),
    Rule("hash-routing table", FROZEN, lambda p, s, d: _last(p, 2) == ("gate", "tid2eid")),
    Rule("integer table", FROZEN, lambda p, s, d: not np.issubdtype(d, np.inexact)),
    Rule("embedding", ADAMW, lambda p, s, d: _last(p, 2) == ("embed", "weight")),
    Rule("output head", ADAMW, lambda p, s, d: _last(p, 2) == ("head", "weight")),
    Rule("RMSNorm weight", ADAMW, lambda p, s, d: _last(p) == ("weight",) and _parent(p).endswith("norm")),
    Rule("mHC static bias", ADAMW, lambda p, s, d: _parent(p).startswith("hc_") and _last(p) == ("base",)),
    Rule("mHC gate", ADAMW, lambda p, s, d: _parent(p).startswith("hc_") and _last(p) == ("scale",)),
    Rule("mHC dynamic projection", MUON,
         lambda p, s, d: _parent(p).startswith("hc_") and _last(p) == ("fn",) and len(s) == 2),
    Rule("attention sink", ADAMW, lambda p, s, d: _last(p) == ("attn_sink",)),
    Rule("compressor position bias", ADAMW, lambda p, s, d: _last(p) == ("ape",)),
    Rule("routed-expert stack [E, out, in]", MUON, lambda p, s, d: _parent(p) == "experts" and len(s) == 3),
    Rule("projection matrix [out, in]", MUON, lambda p, s, d: _last(p) == ("weight",) and len(s) == 2),
    Rule("other vector / scalar", ADAMW, lambda p, s, d: len(s) <= 1),
)


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


def _shape_dtype(leaf) -> tuple[tuple[int, ...], Any]:
  shape = tuple(getattr(leaf, "shape", ()))
  dtype = getattr(leaf, "dtype", np.float32)
  # float0 cotangents of integer leaves count as integer tables.
  if dtype == jax.dtypes.float0:
    dtype = np.int32
  return shape, dtype


def match_rule(path: Path, shape: tuple[int, ...], dtype=np.float32) -> Rule:
  """The first rule matching a parameter; raises ValueError naming the parameter if none does."""
  for rule in RULES:
    if rule.matches(path, shape, dtype):
      return rule
  raise ValueError(f"{path_str(path)}: no optimizer rule for a parameter of shape {shape}; "
                   "add one to dsv4_jax/optim/partition.py RULES")


def param_groups(params) -> Any:
  """A pytree like `params` whose leaves are 'muon' | 'adamw' | 'frozen'.

  Works on parameters and on gradients alike (only paths, shapes and dtypes are read), so it can be
  passed as the label function of `optax.partition`.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  labels = [match_rule(key_path_names(kp), *_shape_dtype(leaf)).group for kp, leaf in flat]
  return jax.tree_util.tree_unflatten(treedef, labels)


def param_group_rows(params) -> list[tuple[str, tuple[int, ...], str, str]]:
  """(path, shape, group, rule name) for every leaf of `params`, in tree order."""
  rows = []
  for kp, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    path = key_path_names(kp)
    shape, dtype = _shape_dtype(leaf)
    rule = match_rule(path, shape, dtype)
    rows.append((path_str(path), shape, rule.group, rule.name))
  return rows


def param_group_table(params) -> str:
  """A printable table: one line per parameter (path, shape, group, rule), then per-group totals."""
  rows = param_group_rows(params)
  width = max([len(r[0]) for r in rows] + [9])
  lines = [f"{'parameter':<{width}}  {'shape':<16}  {'group':<6}  rule"]
  for name, shape, group, rule in rows:
    lines.append(f"{name:<{width}}  {str(shape):<16}  {group:<6}  {rule}")
  for group in GROUPS:
    members = [r for r in rows if r[2] == group]
    count = sum(int(np.prod(r[1])) for r in members)
    lines.append(f"{group}: {len(members)} tensors, {count:,} values")
  return "\n".join(lines)
