"""Load and save DeepSeek-V4 checkpoints in the released hub layout.

A checkpoint directory holds `config.json`, one or more `*.safetensors` shards and (for several
shards) `model.safetensors.index.json` mapping each tensor name to its shard. Tensor names are the
released ones (`layers.3.attn.compressor.wkv.weight`, `layers.0.ffn.experts.17.w1.weight`, …).
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
from safetensors import safe_open
from safetensors.numpy import save_file

from dsv4_jax.config import ModelConfig
from dsv4_jax.convert.names import from_released, path_to_name, to_released
from dsv4_jax.layers.model import Transformer

INDEX_FILE = "model.safetensors.index.json"
# The MTP block shares the main embedding and head; some exports repeat them under mtp.N.
_SHARED_ALIASES = re.compile(r"^mtp\.\d+\.(embed\.weight|head\.weight|emb\..*)$")


class CheckpointError(ValueError):
  """A checkpoint is missing tensors, has unexpected ones, or has tensors of the wrong shape."""


def _model_variables(model_or_state) -> dict[str, nnx.Variable]:
  state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
  return {path_to_name(path): var for path, var in nnx.to_flat_state(state)}


def expected_tensors(cfg: ModelConfig) -> dict[str, tuple[tuple[int, ...], str]]:
  """Released tensor name -> (shape, dtype name) for a model of `cfg` (no allocation)."""
  abstract = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
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
  for name, var in _model_variables(model).items():
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


def _weight_map(path: str) -> dict[str, str]:
  index = os.path.join(path, INDEX_FILE)
  if os.path.exists(index):
    with open(index) as f:
      return json.load(f)["weight_map"]
  files = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))
  if not files:
    raise CheckpointError(f"{path}: no *.safetensors files and no {INDEX_FILE}")
  weight_map = {}
  for file in files:
    with safe_open(os.path.join(path, file), framework="numpy") as f:
      weight_map.update({name: file for name in f.keys()})
  return weight_map


def _check_names(expected: dict, found: Iterable[str], path: str) -> None:
  found = set(found)
  quantised = sorted(n for n in found if n.endswith(".scale"))
  if quantised:
    raise CheckpointError(
        f"{path}: FP8/FP4 quantised tensors are not supported by this loader yet "
        f"(tensors with block scales: {quantised[:8]}{' …' if len(quantised) > 8 else ''})")
  missing = sorted(set(expected) - found)
  unexpected = sorted(n for n in found - set(expected) if not _SHARED_ALIASES.match(n))
  problems = [f"missing tensor {n}: expected shape {expected[n][0]}" for n in missing]
  problems += [f"unexpected tensor {n}" for n in unexpected]
  if problems:
    raise CheckpointError(f"{path}: checkpoint does not match the config:\n  " + "\n  ".join(problems))


def load_model(path: str | os.PathLike, *, dtype: str = "float32", qat: bool = False,
               **config_overrides) -> Transformer:
  """Loads a checkpoint directory in the released layout into a `Transformer`.

  dtype: the parameter and compute dtype ("float32" or "bfloat16"). qat: simulate the released
  model's FP8 KV / FP4 indexer quantisation. Other keyword arguments override config fields.
  Raises CheckpointError naming every missing, unexpected or mis-shaped tensor.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise CheckpointError(f"{path}: not a checkpoint directory")
  if not os.path.exists(os.path.join(path, "config.json")):
    raise CheckpointError(f"{path}: missing config.json")
  cfg = ModelConfig.from_hf_config(path, dtype=dtype, param_dtype=dtype, qat=qat, **config_overrides)
  expected = expected_tensors(cfg)
  weight_map = _weight_map(path)
  _check_names(expected, weight_map, path)

  loaded: dict[str, np.ndarray] = {}
  by_file: dict[str, list[str]] = {}
  for name, file in weight_map.items():
    if name in expected:
      by_file.setdefault(file, []).append(name)
  bad_shapes = []
  for file, names in sorted(by_file.items()):
    with safe_open(os.path.join(path, file), framework="numpy") as f:
      for name in names:
        tensor = f.get_tensor(name)
        if tuple(tensor.shape) != expected[name][0]:
          bad_shapes.append(f"{name}: expected {expected[name][0]}, got {tuple(tensor.shape)}")
          continue
        if tensor.dtype in (np.dtype("int8"), np.dtype("uint8")) or "float8" in str(tensor.dtype):
          raise CheckpointError(f"{path}: {name} is stored as {tensor.dtype} (FP8/FP4 quantised); "
                                "quantised checkpoints are not supported by this loader yet")
        loaded[name] = tensor
  if bad_shapes:
    raise CheckpointError(f"{path}: tensors of the wrong shape:\n  " + "\n  ".join(bad_shapes))

  graphdef, state = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  flat = []
  for p, var in nnx.to_flat_state(state):
    name = path_to_name(p)
    target = var.value.dtype
    released = to_released(name, cfg.n_routed_experts)
    if len(released) > 1:
      value = np.stack([loaded[r] for r in released])
    else:
      value = loaded[released[0]]
    flat.append((p, var.replace(jnp.asarray(value.astype(np.float32) if value.dtype.kind == "V" else value,
                                            dtype=target))))
  return nnx.merge(graphdef, nnx.from_flat_state(flat))
