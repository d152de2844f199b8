"""How the decoding cache stores key/value rows and compressed entries: encode, decode, write, gather.

A stored batch of rows x [..., D] is a dict of arrays, by `storage`:
  "float32" / "bfloat16"  {"rows": x in that dtype};
  "mixed"  the released model's layout: {"nope": x[..., :D−R] as FP8 e4m3, "scale": one power-of-two
           e8m0 scale per KV_FP8_BLOCK values (per row when D−R is not a multiple of it: tiny test
           models), "rope": the last R dims as BF16 (absent when R = 0)}. Lossless for rows that a
           `qat` model already put on that grid (ops/quantization.py, the same block quantiser).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from dsv4_jax.ops.quantization import FP8_FLOOR, FP8_MAX, KV_FP8_BLOCK, quantise_blocks

STORAGES = ("float32", "bfloat16", "mixed")


def check_storage(storage: str) -> None:
  if storage not in STORAGES:
    raise ValueError(f"cache storage: expected one of {STORAGES}, got {storage!r}")


def encode_rows(x: jax.Array, storage: str, rope_dim: int) -> dict[str, jax.Array]:
  """Rows x [..., D] -> the stored dict; the last `rope_dim` dims are kept in BF16 under "mixed"."""
  check_storage(storage)
  if storage != "mixed":
    return {"rows": x.astype(storage)}
  nope = x[..., :x.shape[-1] - rope_dim]
  block = KV_FP8_BLOCK if nope.shape[-1] % KV_FP8_BLOCK == 0 else nope.shape[-1]
  values, scale = quantise_blocks(nope, block, FP8_MAX, FP8_FLOOR, jnp.float8_e4m3fn)
  out = {"nope": values.reshape(nope.shape), "scale": scale[..., 0].astype(jnp.float8_e8m0fnu)}
  if rope_dim:
    out["rope"] = x[..., x.shape[-1] - rope_dim:].astype(jnp.bfloat16)
  return out


def decode_rows(stored: dict[str, jax.Array], dtype) -> jax.Array:
  """The stored dict -> rows [..., D] in `dtype`."""
  if "rows" in stored:
    return stored["rows"].astype(dtype)
  values = stored["nope"].astype(jnp.float32)
  scale = stored["scale"].astype(jnp.float32)
  nope = (values.reshape(scale.shape + (-1,)) * scale[..., None]).reshape(values.shape)
  parts = [nope] + ([stored["rope"].astype(jnp.float32)] if "rope" in stored else [])
  return jnp.concatenate(parts, axis=-1).astype(dtype)


def stored_storage(stored: dict[str, jax.Array]) -> str:
  """The storage name of a stored dict."""
  return "mixed" if "nope" in stored else str(stored["rows"].dtype)


def stored_rope_dim(stored: dict[str, jax.Array]) -> int:
  """How many trailing dims a stored dict keeps in BF16 ("mixed" only; 0 otherwise)."""
  return stored["rope"].shape[-1] if "rope" in stored else 0


def reencode(stored: dict[str, jax.Array], x: jax.Array) -> dict[str, jax.Array]:
  """Rows x [B, N, D] encoded exactly like `stored` (same storage and BF16 dims)."""
  return encode_rows(x, stored_storage(stored), stored_rope_dim(stored))


def write_rows(stored: dict, index: jax.Array, rows: jax.Array, when: jax.Array | None = None) -> dict:
  """stored [B, N, ...] with rows [B, D] written at per-row `index` [B] (only where `when` [B], if given).

  Indices ≥ N are dropped (never clamped onto the last row).
  """
  n = jax.tree.leaves(stored)[0].shape[1]
  if n == 0:
    return stored
  b = rows.shape[0]
  batch = jnp.arange(b)
  new = reencode(stored, rows)

  def put(buf, value):
    if when is not None:
      keep = buf[batch, jnp.clip(index, 0, n - 1)]
      value = jnp.where(when.reshape((b,) + (1,) * (value.ndim - 1)), value, keep)
    return buf.at[batch, index].set(value, mode="drop")

  return jax.tree.map(put, stored, new)


def gather_rows(stored: dict[str, jax.Array], idx: jax.Array, dtype) -> jax.Array:
  """stored rows [B, N, ...], idx [B, K] (−1 allowed: reads row 0) -> decoded rows [B, K, D] in `dtype`.

  Only the K gathered rows are decoded, not all N.
  """
  safe = jnp.clip(idx, 0)

  def take(buf):
    return jnp.take_along_axis(buf, safe.reshape(safe.shape + (1,) * (buf.ndim - 2)), axis=1)

  return decode_rows(jax.tree.map(take, stored), dtype)
