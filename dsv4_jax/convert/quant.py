"""Dequantisation of DeepSeek's released block-scaled FP8 / FP4 weights (host side, numpy).

FP8 (dense weights):  W [out, in] float8_e4m3fn, scale [⌈out/128⌉, ⌈in/128⌉] (ue8m0 or fp32)
    W_real[i, j] = W[i, j] · scale[i // 128, j // 128]
FP4 (routed experts): W [out, in/2] int8 (or safetensors F4), two e2m1 codes per byte, element 2j in
    the LOW nibble and 2j+1 in the HIGH nibble; scale [out, in/32] ue8m0
    W_real[i, j] = e2m1(code[i, j]) · scale[i, j // 32]
A ue8m0 byte b encodes 2^(b − 127) (b = 255 is NaN). `StoredTensor.read(index)` produces any
rectangular slice of the real values while reading only the bytes (and scales) under that slice.
"""

from __future__ import annotations

import dataclasses

import ml_dtypes
import numpy as np

# The released WEIGHT formats (not the KV cache's activation blocks): an FP8 weight has one scale per
# 128×128 tile, an FP4 weight one scale per 1×32 block of its input dim.
WEIGHT_FP8_TILE = 128
WEIGHT_FP4_BLOCK = 32
# e2m1 code -> value: bit 3 is the sign, bits 0-2 index the magnitudes (DeepSeek's FP4_TABLE).
E2M1_VALUES = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                        -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)
FORMATS = ("plain", "fp8", "fp4")


def scale_to_float32(scale: np.ndarray) -> np.ndarray:
  """Block scales as fp32: ue8m0 bytes b -> 2^(b − 127) (NaN for 255); float scales are cast."""
  if scale.dtype == np.dtype(ml_dtypes.float8_e8m0fnu):
    exponent = np.asarray(scale).view(np.uint8).astype(np.int32) - 127
    value = np.ldexp(np.float32(1.0), np.minimum(exponent, 127))
    return np.where(exponent == 128, np.float32(np.nan), value).astype(np.float32)
  return np.asarray(scale, np.float32)


def unpack_fp4(packed: np.ndarray) -> np.ndarray:
  """uint8/int8 [..., n/2] two e2m1 codes per byte (low nibble first) -> fp32 values [..., n]."""
  byte = np.asarray(packed).view(np.uint8)
  pairs = np.stack([E2M1_VALUES[byte & 0x0F], E2M1_VALUES[byte >> 4]], axis=-1)
  return pairs.reshape(byte.shape[:-1] + (2 * byte.shape[-1],))


def fp8_scale_shape(shape: tuple[int, int]) -> tuple[int, int]:
  return (-(-shape[0] // WEIGHT_FP8_TILE), -(-shape[1] // WEIGHT_FP8_TILE))


def fp4_scale_shape(shape: tuple[int, int]) -> tuple[int, int]:
  return (shape[0], shape[1] // WEIGHT_FP4_BLOCK)


def _index_range(index: slice, size: int) -> range:
  return range(size)[index]


@dataclasses.dataclass(frozen=True)
class StoredTensor:
  """One released tensor as stored: `data` (memory-mapped), its format and (quantised) its scale.

  shape: the logical shape of the real values. For fp4, `data` is the packed [out, in/2] bytes.
  """
  name: str
  data: np.ndarray
  fmt: str
  shape: tuple[int, ...]
  scale: np.ndarray | None = None

  def read(self, index: tuple[slice, ...] | None = None) -> np.ndarray:
    """The real values at `index` (unit-step slices, one per dim; default: everything).

    Floating results are fp32; integer tensors keep their stored dtype.
    """
    index = tuple(index or ()) + (slice(None),) * (len(self.shape) - len(index or ()))
    if self.fmt == "plain":
      value = np.asarray(self.data[index])
      return value.astype(np.float32) if _is_float(value.dtype) else value
    rows = _index_range(index[0], self.shape[0])
    cols = _index_range(index[1], self.shape[1])
    if not len(rows) or not len(cols):
      return np.zeros((len(rows), len(cols)), np.float32)
    row_ids, col_ids = np.asarray(rows), np.asarray(cols)
    if self.fmt == "fp8":
      values = np.asarray(self.data[index[0], index[1]]).astype(np.float32)
      tile = WEIGHT_FP8_TILE
      block_scale = scale_to_float32(self.scale[row_ids[0] // tile: row_ids[-1] // tile + 1])
      scale = block_scale[np.ix_(row_ids // tile - row_ids[0] // tile, col_ids // tile)]
      return values * scale
    # fp4: read whole bytes covering the columns, then drop a leading high / trailing low nibble.
    first, last = col_ids[0], col_ids[-1] + 1
    values = unpack_fp4(self.data[index[0], first // 2: (last + 1) // 2])
    values = values[:, first % 2: first % 2 + len(cols)]
    scale = scale_to_float32(self.scale[index[0]])[:, col_ids // WEIGHT_FP4_BLOCK]
    return values * scale


def _is_float(dtype: np.dtype) -> bool:
  return np.issubdtype(dtype, np.floating) or dtype.kind == "V" or "float" in str(dtype)
