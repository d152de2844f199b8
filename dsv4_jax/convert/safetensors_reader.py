"""Memory-mapped reading of `.safetensors` files, including the FP8 / FP4 / ue8m0 dtypes.

File layout: u64 little-endian header length n, an n-byte JSON header
  {name: {"dtype": "F8_E4M3", "shape": [out, in], "data_offsets": [begin, end]}, "__metadata__": {...}},
then the raw little-endian bytes, offsets relative to the end of the header.
The `safetensors` numpy backend cannot return F8_E4M3 / F8_E8M0 / F4 tensors, so this reader maps the
file itself and views each tensor's bytes with the ml_dtypes type; nothing is read until sliced.
`F4` (torch float4_e2m1fn_x2) stores two e2m1 codes per byte with a logical shape [..., n]; it is
returned as its packed bytes, uint8 [..., n/2].
"""

from __future__ import annotations

import json
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype("<f8"), "F32": np.dtype("<f4"), "F16": np.dtype("<f2"),
    "BF16": np.dtype(ml_dtypes.bfloat16),
    "I64": np.dtype("<i8"), "I32": np.dtype("<i4"), "I16": np.dtype("<i2"), "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"), "U32": np.dtype("<u4"), "U16": np.dtype("<u2"), "U8": np.dtype("u1"),
    "BOOL": np.dtype(bool),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "F8_E8M0": np.dtype(ml_dtypes.float8_e8m0fnu),
    "F4": np.dtype("u1"),  # packed pairs, see module docstring
}


class SafetensorsError(ValueError):
  """A safetensors file is malformed or uses a dtype this reader does not know."""


class SafetensorsFile:
  """The tensors of one `.safetensors` file: `keys()`, `dtype(name)`, `shape(name)`, `get(name)`."""

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    with open(self.path, "rb") as f:
      raw = f.read(8)
      if len(raw) != 8:
        raise SafetensorsError(f"{self.path}: too short to be a safetensors file")
      (header_len,) = struct.unpack("<Q", raw)
      try:
        header = json.loads(f.read(header_len))
      except ValueError as e:
        raise SafetensorsError(f"{self.path}: unreadable header ({e})") from None
    header.pop("__metadata__", None)
    self._header = header
    self._data_start = 8 + header_len
    self._data: np.ndarray | None = None

  def keys(self) -> list[str]:
    return list(self._header)

  def __contains__(self, name: str) -> bool:
    return name in self._header

  def dtype(self, name: str) -> str:
    """The safetensors dtype string ("F32", "F8_E4M3", "F4", ...)."""
    return self._header[name]["dtype"]

  def shape(self, name: str) -> tuple[int, ...]:
    """The shape recorded in the header (for F4: logical elements, twice the packed last dim)."""
    return tuple(self._header[name]["shape"])

  def get(self, name: str) -> np.ndarray:
    """A read-only memory-mapped view of `name` (packed uint8 [..., n/2] for F4)."""
    entry = self._header[name]
    kind = entry["dtype"]
    if kind not in DTYPES:
      raise SafetensorsError(f"{self.path}: tensor {name} has dtype {kind}; supported: {sorted(DTYPES)}")
    shape = tuple(entry["shape"])
    if kind == "F4":
      if not shape or shape[-1] % 2:
        raise SafetensorsError(f"{self.path}: F4 tensor {name} has shape {shape}; its last dim must be even")
      shape = shape[:-1] + (shape[-1] // 2,)
    dtype = DTYPES[kind]
    begin, end = entry["data_offsets"]
    if end - begin != int(np.prod(shape)) * dtype.itemsize:
      raise SafetensorsError(f"{self.path}: tensor {name} ({kind} {list(entry['shape'])}) needs "
                             f"{int(np.prod(shape)) * dtype.itemsize} bytes, header gives {end - begin}")
    if end == begin:
      return np.zeros(shape, dtype)
    if self._data is None:
      self._data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._data_start)
    return self._data[begin:end].view(dtype).reshape(shape)
