"""The decoding cache: per layer exactly what the next token's attention needs, with static shapes.

Per layer (B rows, W window, D head dim, r ratio, M = max_len, c = D or Di, coff = 2 if r = 4 else 1):
  window        [B, W, D]       ring buffer of the shared key/value rows: slot p mod W holds position p
  compressor    (CSA / HCA layers)
    entries     [B, M // r, D]  compressed rows; entry i pools tokens i·r .. i·r + r − 1
    block_kv    [B, r, coff·c]  fp32 projections of the current, incomplete block (slot = t mod r)
    block_score [B, r, coff·c]  fp32 gate scores of those tokens (ape already added)
    prev_kv     [B, r, c]       (r = 4 only) the previous block's first-c-channel kv ...
    prev_score  [B, r, c]       ... and scores (−inf before the first block completes): the overlap half
  indexer       (CSA layers) the same compressor state for the lightning indexer's keys, c = Di
lengths [B] int32: tokens seen per row, i.e. the position of the next token.

Key/value rows and compressed entries are stored as `storage` says:
  "float32" / "bfloat16"  one array in that dtype;
  "mixed"  the released model's layout: non-RoPE dims FP8 e4m3 with one power-of-two scale (e8m0) per
           64 values (one per row when the non-RoPE width is not a multiple of 64), RoPE dims BF16. Lossless for a `qat` model, whose rows already lie on that grid.
The indexer's keys are stored like the entries but with no dims kept in BF16 (fp8 + scales under "mixed").
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from dsv4_jax.config import ModelConfig

STORAGES = ("float32", "bfloat16", "mixed")
FP8_BLOCK = 64
_FP8_MAX = 448.0


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class CompressorCache:
  entries: Any  # stored rows [B, M // r, c] (see `encode_rows`)
  block_kv: jax.Array
  block_score: jax.Array
  prev_kv: jax.Array | None = None
  prev_score: jax.Array | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LayerCache:
  window: Any  # stored rows [B, W, D]
  compressor: CompressorCache | None = None
  indexer: CompressorCache | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Cache:
  layers: tuple[LayerCache, ...]
  lengths: jax.Array  # [B] int32


# --- storage ---------------------------------------------------------------------------------------

def _check_storage(storage: str) -> None:
  if storage not in STORAGES:
    raise ValueError(f"cache storage: expected one of {STORAGES}, got {storage!r}")


def encode_rows(x: jax.Array, storage: str, rope_dim: int) -> dict[str, jax.Array]:
  """Rows x [..., D] -> the stored pytree (see module docstring); `rope_dim` last dims kept in BF16."""
  _check_storage(storage)
  if storage != "mixed":
    return {"rows": x.astype(storage)}
  dim = x.shape[-1]
  nope = x[..., :dim - rope_dim].astype(jnp.float32)
  block = FP8_BLOCK if nope.shape[-1] % FP8_BLOCK == 0 else nope.shape[-1]  # tiny test models: one block
  blocks = nope.reshape(nope.shape[:-1] + (-1, block))
  amax = jnp.maximum(jnp.max(jnp.abs(blocks), axis=-1, keepdims=True), 1e-4)
  mantissa, exponent = jnp.frexp(amax / _FP8_MAX)
  scale = jnp.ldexp(jnp.ones_like(amax), jnp.where(mantissa == 0.5, exponent - 1, exponent))  # 2^ceil(log2)
  values = jnp.clip(blocks / scale, -_FP8_MAX, _FP8_MAX).astype(jnp.float8_e4m3fn)
  out = {"nope": values.reshape(nope.shape), "scale": scale[..., 0].astype(jnp.float8_e8m0fnu)}
  if rope_dim:
    out["rope"] = x[..., dim - rope_dim:].astype(jnp.bfloat16)
  return out


def decode_rows(stored: dict[str, jax.Array], dtype) -> jax.Array:
  """The stored pytree -> rows [..., D] in `dtype`."""
  if "rows" in stored:
    return stored["rows"].astype(dtype)
  values = stored["nope"].astype(jnp.float32)
  scale = stored["scale"].astype(jnp.float32)
  nope = (values.reshape(scale.shape + (-1,)) * scale[..., None]).reshape(values.shape)
  parts = [nope] + ([stored["rope"].astype(jnp.float32)] if "rope" in stored else [])
  return jnp.concatenate(parts, axis=-1).astype(dtype)


def rows_shape(stored: dict[str, jax.Array]) -> tuple[int, ...]:
  """The [..., D] shape of the rows a stored pytree holds."""
  if "rows" in stored:
    return stored["rows"].shape
  return stored["nope"].shape[:-1] + (sum(stored[k].shape[-1] for k in ("nope", "rope") if k in stored),)


def stored_storage(stored: dict[str, jax.Array]) -> str:
  """The storage name of a stored pytree."""
  return "mixed" if "nope" in stored else str(stored["rows"].dtype)


def write_rows(stored: dict, index: jax.Array, rows: jax.Array, storage: str, rope_dim: int,
               when: jax.Array | None = None) -> dict:
  """stored [B, N, ...] with rows [B, D] written at per-row `index` [B] (only where `when` [B], if given)."""
  n = jax.tree.leaves(stored)[0].shape[1]
  if n == 0:
    return stored
  b = rows.shape[0]
  batch = jnp.arange(b)
  new = encode_rows(rows, storage, rope_dim)

  def put(buf, value):
    if when is not None:
      keep = buf[batch, jnp.clip(index, 0, n - 1)]
      value = jnp.where(when.reshape((b,) + (1,) * (value.ndim - 1)), value, keep)
    return buf.at[batch, index].set(value, mode="drop")  # beyond max_len: dropped, never clamped

  return jax.tree.map(put, stored, new)


# --- construction ----------------------------------------------------------------------------------

def resolve_storage(cfg: ModelConfig, storage: str | None) -> str:
  """None -> the model's compute dtype."""
  storage = cfg.dtype if storage is None else {"bf16": "bfloat16", "fp32": "float32"}.get(storage, storage)
  _check_storage(storage)
  return storage


def _compressor_cache(batch: int, max_len: int, ratio: int, dim: int, storage: str, rope_dim: int):
  coff = 2 if ratio == 4 else 1
  f32 = jnp.float32
  entries = encode_rows(jnp.zeros((batch, max_len // ratio, dim), f32), storage, rope_dim)
  state = dict(block_kv=jnp.zeros((batch, ratio, coff * dim), f32),
               block_score=jnp.zeros((batch, ratio, coff * dim), f32))
  if ratio == 4:
    state.update(prev_kv=jnp.zeros((batch, ratio, dim), f32),
                 prev_score=jnp.full((batch, ratio, dim), -jnp.inf, f32))
  return CompressorCache(entries=entries, **state)


def init_cache(cfg: ModelConfig, batch: int, max_len: int, storage: str | None = None) -> Cache:
  """An empty cache for `batch` rows of up to `max_len` tokens (main layers only; MTP is not decoded).

  Use under `jax.eval_shape` to size a cache without allocating it.
  """
  storage = resolve_storage(cfg, storage)
  if max_len < 1 or batch < 1:
    raise ValueError(f"init_cache: batch and max_len must be positive, got batch {batch}, max_len {max_len}")
  rope_dim, d = cfg.qk_rope_head_dim, cfg.head_dim
  layers = []
  for layer in range(cfg.num_hidden_layers):
    r = cfg.compress_ratios[layer]
    window = encode_rows(jnp.zeros((batch, cfg.sliding_window, d), jnp.float32), storage, rope_dim)
    comp = _compressor_cache(batch, max_len, r, d, storage, rope_dim) if r else None
    index = _compressor_cache(batch, max_len, r, cfg.index_head_dim, storage, 0) if r == 4 else None
    layers.append(LayerCache(window=window, compressor=comp, indexer=index))
  return Cache(layers=tuple(layers), lengths=jnp.zeros((batch,), jnp.int32))


def cache_bytes(cache: Any) -> int:
  """Total bytes of a cache (or of its `jax.eval_shape` abstract version)."""
  return sum(int(x.size) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache))
