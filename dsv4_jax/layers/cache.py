"""The decoding cache: per layer exactly what the next token's attention needs, with static shapes.

Each module owns its part and updates it in its own `__call__` (Attention: the window ring;
Compressor: its entries and partial block; Indexer: its compressor's). Per layer (B rows, W window,
D head dim, r ratio, M = max_len, c = D or Di, coff = 2 if r = 4 else 1):
  window        [B, W, D]       ring buffer of the shared key/value rows: slot p mod W holds position p
  compressor    (CSA / HCA layers)
    entries     [B, M // r, c]  compressed rows; entry i pools tokens i·r .. i·r + r − 1
    block_kv    [B, r, coff·c]  fp32 projections of the current, incomplete block (slot = t mod r)
    block_score [B, r, coff·c]  fp32 gate scores of those tokens (ape already added)
    prev_kv     [B, r, c]       (r = 4 only) the previous block's first-c-channel kv ...
    prev_score  [B, r, c]       ... and scores (−inf before the first block completes): the overlap half
  indexer       (CSA layers) the same compressor state for the lightning indexer's keys, c = Di
lengths [B] int32: tokens seen per row, i.e. the position of the next token.
Rows and entries are stored as ops/kv_storage.py describes ("float32", "bfloat16" or "mixed"); the
indexer's keys keep no dims in BF16.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from dsv4_jax.config import ModelConfig
from dsv4_jax.ops.kv_storage import check_storage, encode_rows


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class CompressorCache:
  entries: Any  # stored rows [B, M // r, c]
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


def resolve_storage(cfg: ModelConfig, storage: str | None) -> str:
  """None -> the model's compute dtype; "bf16" / "fp32" are accepted as short names."""
  storage = cfg.dtype if storage is None else {"bf16": "bfloat16", "fp32": "float32"}.get(storage, storage)
  check_storage(storage)
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
