"""Load and save DeepSeek-V4 checkpoints in the released hub layout.

A checkpoint directory holds `config.json`, one or more `*.safetensors` shards and (for several
shards) `model.safetensors.index.json` mapping each tensor name to its shard. Tensor names are the
released ones (`layers.3.attn.compressor.wkv.weight`, `layers.0.ffn.experts.17.w1.weight`, …).
Quantised weights carry block scales beside them (`layers.3.attn.wq_a.weight` F8_E4M3 with
`layers.3.attn.wq_a.scale`; see `dsv4_jax.convert.quant`); `tid2eid` may be int64 or int32.
A model with `scan_layers` (stacked layer groups, layers/layer_groups.py) is saved under the same
per-layer names, and loaded from them, each stacked parameter read layer by layer.
"""

from __future__ import annotations

import json
import os
import re
from typing import Iterable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from safetensors.numpy import save_file

from dsv4_jax.config import ModelConfig
from dsv4_jax.convert.errors import CheckpointError
from dsv4_jax.convert.names import path_to_name, to_released
from dsv4_jax.convert.quant import (WEIGHT_FP4_BLOCK, WEIGHT_FP8_TILE, StoredTensor, fp4_scale_shape,
                                    fp8_scale_shape)
from dsv4_jax.convert.safetensors_reader import SafetensorsFile
from dsv4_jax.layers.layer_groups import plan_layer_groups, unrolled_paths, unstack_layers
from dsv4_jax.layers.model import Transformer
from dsv4_jax.parallel.mesh import logical_to_spec

INDEX_FILE = "model.safetensors.index.json"
# The MTP block shares the main embedding and head; some exports repeat them under mtp.N.
_SHARED_ALIASES = re.compile(r"^mtp\.\d+\.(embed\.weight|head\.weight|emb\..*)$")


def _model_variables(model_or_state) -> dict[str, nnx.Variable]:
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
  return {path_to_name(path): var for path, var in nnx.to_flat_state(state)}


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
  """Released tensor name -> (shape, dtype name) for a model of `cfg` (no allocation; the same names
  whether or not cfg scans its layers)."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg.replace(scan_layers=False), rngs=nnx.Rngs(0)))
  out = {}
  for name, var in _model_variables(abstract).items():
    shape, dtype = tuple(var.value.shape), str(var.value.dtype)
    names = to_released(name, cfg.n_routed_experts)
    per_tensor = shape[1:] if len(names) > 1 else shape
    for released in names:
      out[released] = (per_tensor, dtype)
  return out


def save_checkpoint(model: Transformer, path: str | os.PathLike, *, dtype: str | None = None,
                    max_shard_bytes: int = 2 << 30) -> None:
  """Writes `model` to `path` in the released layout (config.json, shards, index).

  dtype: "float32" / "bfloat16" for floating tensors (default: as stored); integer tensors keep theirs.
  """
  import ml_dtypes

  path = os.fspath(path)
  os.makedirs(path, exist_ok=True)
  cfg = model.cfg
  tensors: dict[str, np.ndarray] = {}
  for name, var in _model_variables(unstack_layers(nnx.state(model), cfg)).items():
    value = np.asarray(jax.device_get(var[...]))
    if dtype is not None and np.issubdtype(value.dtype, np.floating):
      value = value.astype(ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype))
    if name.endswith(".tid2eid"):
      value = value.astype(np.int64)  # as released
    names = to_released(name, cfg.n_routed_experts)
    if len(names) > 1:
      for e, released in enumerate(names):
        tensors[released] = np.ascontiguousarray(value[e])
    else:
      tensors[names[0]] = value

  shards: list[dict[str, np.ndarray]] = [{}]
  size = 0
  for name in sorted(tensors):
    if size and size + tensors[name].nbytes > max_shard_bytes:
      shards.append({})
      size = 0
    shards[-1][name] = tensors[name]
    size += tensors[name].nbytes
  weight_map = {}
  for i, shard in enumerate(shards):
    file = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
    save_file(shard, os.path.join(path, file), metadata={"format": "pt"})
    weight_map.update({name: file for name in shard})
  with open(os.path.join(path, INDEX_FILE), "w") as f:
    json.dump({"metadata": {"total_size": sum(t.nbytes for t in tensors.values())},
               "weight_map": weight_map}, f, indent=2, sort_keys=True)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(cfg.to_hf_config(), f, indent=2)


def _some(names: list[str], limit: int = 3) -> str:
  shown = ", ".join(names[:limit])
  return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _read_index(index: str) -> dict[str, str]:
  """The index's weight_map (tensor name -> shard file name), checked for shape."""
  try:
    with open(index) as f:
      data = json.load(f)
  except ValueError as e:
    raise CheckpointError(f"{index}: not valid JSON ({e})") from None
  weight_map = data.get("weight_map") if isinstance(data, dict) else None
  if not isinstance(weight_map, dict):
    raise CheckpointError(f"{index}: expected an object with a \"weight_map\" object (tensor name -> shard file)")
  bad = sorted(name for name, file in weight_map.items() if not isinstance(file, str) or not file)
  if bad:
    raise CheckpointError(f"{index}: weight_map entries {_some(bad)} do not name a shard file")
  return weight_map


def _open_shards(path: str) -> tuple[dict[str, str], dict[str, SafetensorsFile]]:
  """(tensor name -> shard file, shard file -> opened shard), every shard's header validated.

  With an index, every shard it names must exist and hold every tensor it assigns to it; without one,
  the directory's `*.safetensors` files are the shards and no tensor may appear in two of them.
  """
  index = os.path.join(path, INDEX_FILE)
  files: dict[str, SafetensorsFile] = {}
  if not os.path.exists(index):
    names = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
    if not names:
      raise CheckpointError(f"{path}: no *.safetensors files and no {INDEX_FILE}")
    weight_map: dict[str, str] = {}
    for file in names:
      files[file] = SafetensorsFile(os.path.join(path, file))
      for name in files[file].keys():
        if name in weight_map:
          raise CheckpointError(f"{path}: tensor {name} is in both {weight_map[name]} and {file} "
                                f"(add a {INDEX_FILE} saying which to use)")
        weight_map[name] = file
    return weight_map, files

  weight_map = _read_index(index)
  by_file: dict[str, list[str]] = {}
  for name, file in sorted(weight_map.items()):
    by_file.setdefault(file, []).append(name)
  problems = []
  for file, names in sorted(by_file.items()):
    if not os.path.isfile(os.path.join(path, file)):
      problems.append(f"shard {file} does not exist (the index assigns it {len(names)} tensor(s): {_some(names)})")
      continue
    files[file] = SafetensorsFile(os.path.join(path, file))
    absent = [name for name in names if name not in files[file]]
    if absent:
      problems.append(f"shard {file} does not contain tensor(s) {_some(absent)} "
                      f"({len(absent)} of the {len(names)} the index assigns to it)")
  if problems:
    raise CheckpointError(f"{index}: the index does not match the shards:\n  " + "\n  ".join(problems))
  return weight_map, files


def _scale_names(weight: str) -> tuple[str, ...]:
  """Where a weight's block scales may be stored: `<name>.scale` (released) or `<name>.weight_scale_inv`."""
  if not weight.endswith(".weight"):
    return ()
  return (weight[: -len("weight")] + "scale", weight + "_scale_inv")


def _check_names(expected: dict, found: Iterable[str], path: str) -> None:
  found = set(found)
  scales = {s for name in expected for s in _scale_names(name)}
  missing = sorted(set(expected) - found)
  unexpected = sorted(n for n in found - set(expected) - scales if not _SHARED_ALIASES.match(n))
  problems = [f"missing tensor {n}: expected shape {expected[n][0]}" for n in missing]
  problems += [f"unexpected tensor {n}" for n in unexpected]
  if problems:
    raise CheckpointError(f"{path}: checkpoint does not match the config:\n  " + "\n  ".join(problems))


def _stored_tensor(name: str, shape: tuple[int, ...], target_is_float: bool, file: SafetensorsFile,
                   scale_file: SafetensorsFile | None, scale_name: str | None, problems: list[str]):
  """Classifies one released tensor as plain / fp8 / fp4 and checks its (and its scale's) shape."""
  kind, stored = file.dtype(name), file.shape(name)
  quantised = len(shape) == 2 and target_is_float
  if quantised and kind == "F8_E4M3":
    fmt, stored_expected, scale_expected = "fp8", shape, fp8_scale_shape(shape)
    what = f"FP8 e4m3 with {WEIGHT_FP8_TILE}×{WEIGHT_FP8_TILE} block scales"
  elif quantised and kind in ("I8", "U8", "F4"):
    fmt, scale_expected = "fp4", fp4_scale_shape(shape)
    stored_expected = shape if kind == "F4" else (shape[0], shape[1] // 2)
    what = f"FP4 e2m1 packed two per byte with 1×{WEIGHT_FP4_BLOCK} block scales"
    if shape[1] % WEIGHT_FP4_BLOCK:
      problems.append(f"{name}: FP4 weights need an input dim divisible by {WEIGHT_FP4_BLOCK}, got {shape}")
      return None
  else:
    fmt, stored_expected, scale_expected, what = "plain", shape, None, ""
  if stored != stored_expected:
    detail = f" ({what} of logical shape {shape})" if fmt == "fp4" and kind != "F4" else ""
    problems.append(f"{name}: expected {stored_expected}{detail}, got {stored}")
    return None
  if fmt == "plain":
    if scale_name is not None:
      problems.append(f"{scale_name}: block scales given for {name}, which is stored as {kind}; "
                      "only F8_E4M3 and packed FP4 (I8/U8/F4) weights take scales")
      return None
    return StoredTensor(name, file.get(name), fmt, shape)
  if scale_name is None:
    problems.append(f"{name} is stored as {kind} ({what}) but its scale tensor {_scale_names(name)[0]} "
                    f"is missing: expected shape {scale_expected}")
    return None
  if scale_file.shape(scale_name) != scale_expected:
    problems.append(f"{scale_name}: expected shape {scale_expected} ({what} for {name} of shape {shape}), "
                    f"got {scale_file.shape(scale_name)}")
    return None
  return StoredTensor(name, file.get(name), fmt, shape, scale_file.get(scale_name))


def _plan(expected: dict, weight_map: dict[str, str], files: dict[str, SafetensorsFile],
          path: str) -> dict[str, StoredTensor]:
  """Describes how to read each expected tensor from the opened (memory-mapped) shards."""
  plan, problems = {}, []
  for name, (shape, dtype) in expected.items():
    scale_name = next((s for s in _scale_names(name) if s in weight_map), None)
    scale_file = files[weight_map[scale_name]] if scale_name else None
    target_is_float = np.issubdtype(np.dtype(dtype), np.floating) or dtype == "bfloat16"
    stored = _stored_tensor(name, shape, target_is_float, files[weight_map[name]], scale_file,
                            scale_name, problems)
    if stored is not None:
      plan[name] = stored
  if problems:
    raise CheckpointError(f"{path}: tensors of the wrong shape or format:\n  " + "\n  ".join(problems))
  return plan


def _reader(plan: dict[str, StoredTensor], released: list[str], stacked: bool, target: np.dtype):
  """index -> one layer's parameter values at `index`, reading only that slice (only those experts)."""

  def read(index: tuple[slice, ...]) -> np.ndarray:
    if stacked:
      experts = range(len(released))[index[0]]
      value = np.stack([plan[released[e]].read(index[1:]) for e in experts])
    else:
      value = plan[released[0]].read(index)
    return value.astype(target)

  return read


def _layers_reader(readers: list):
  """Per-layer readers -> the reader of those layers stacked on a leading axis (a scanned layer group)."""

  def read(index: tuple[slice, ...]) -> np.ndarray:
    return np.stack([readers[k](index[1:]) for k in range(len(readers))[index[0]]])

  return read


def load_model(path: str | os.PathLike, *, dtype: str = "float32", qat: bool = False,
               mesh: jax.sharding.Mesh | None = None, **config_overrides) -> Transformer:
  """Loads a checkpoint directory in the released layout into a `Transformer`.

  Tensors may be fp32 / bf16, FP8 e4m3 with 128×128 block scales, or FP4 e2m1 (experts) packed two
  per byte with 1×32 block scales (scales ue8m0 or fp32); they are dequantised to `dtype`
  ("float32" or "bfloat16", also the compute dtype). qat: simulate the released model's FP8 KV /
  FP4 indexer quantisation. mesh: place every parameter straight onto its sharding from the logical
  axis rules; each device's slice is read from the memory-mapped shards on its own, so the host never
  holds the whole model. Other keyword arguments override config fields (e.g. scan_layers=True: the
  stacked layer groups are filled from the per-layer tensors).

  Raises ConfigError for a config.json that is unreadable, not JSON, or lacks an architecture key
  (naming the file and the keys), and CheckpointError for everything else, naming the file and, where
  there is one, the tensor: a malformed or truncated shard (SafetensorsError, a subclass), an index
  naming a shard that does not exist or a tensor its shard lacks, and every missing, unexpected or
  mis-shaped tensor or scale.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: not a checkpoint directory")
  if not os.path.exists(os.path.join(path, "config.json")):
    raise CheckpointError(f"{path}: missing config.json")
  cfg = ModelConfig.from_hf_config(path, dtype=dtype, param_dtype=dtype, qat=qat, **config_overrides)
  expected = expected_tensors(cfg)
  weight_map, files = _open_shards(path)
  _check_names(expected, weight_map, path)
  plan = _plan(expected, weight_map, files, path)

  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  groups = plan_layer_groups(cfg)
  flat = []
  for p, var in nnx.to_flat_state(state):
    shape, target = tuple(var.value.shape), np.dtype(var.value.dtype)
    layer_paths, stacked = unrolled_paths(p, groups)
    readers = []
    for layer_path in layer_paths:
      released = to_released(path_to_name(layer_path), cfg.n_routed_experts)
      readers.append(_reader(plan, released, len(released) > 1, target))
    read = _layers_reader(readers) if stacked else readers[0]
    if mesh is None:
      value = jnp.asarray(read(tuple(slice(None) for _ in shape)))
    else:
      axes = var.get_metadata().get("logical_axes") or (None,) * len(shape)
      sharding = NamedSharding(mesh, logical_to_spec(axes, shape, mesh))
      value = jax.make_array_from_callback(shape, sharding, read, dtype=target)
    flat.append((p, var.replace(value)))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))
