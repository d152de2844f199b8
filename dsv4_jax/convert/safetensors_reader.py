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
import math
import os
import struct

import ml_dtypes
import numpy as np

from dsv4_jax.convert.errors import CheckpointError

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


class SafetensorsError(CheckpointError):
  """A safetensors file is malformed (bad header, unknown dtype, inconsistent or truncated data).

  A CheckpointError, so `except CheckpointError` covers every problem `load_model` finds in the files.
  """


def _is_count(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool) and value >= 0


class SafetensorsFile:
  """The tensors of one `.safetensors` file: `keys()`, `dtype(name)`, `shape(name)`, `get(name)`.

  The whole header is validated when the file is opened (JSON mapping, every entry's dtype, shape and
  data_offsets, byte counts, no overlaps, nothing past the end of the file), so a truncated or garbled
  file fails here with a SafetensorsError naming the file and tensor, not later inside numpy.
  """

  def __init__(self, path: str | os.PathLike):
    self.path = os.fspath(path)
    try:
      size = os.path.getsize(self.path)
      with open(self.path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
          raise SafetensorsError(f"{self.path}: {size} bytes, too short to be a safetensors file "
                                 "(it starts with an 8-byte header length)")
        (header_len,) = struct.unpack("<Q", raw)
        if header_len > size - 8:
          raise SafetensorsError(f"{self.path}: header length {header_len} exceeds the {size - 8} bytes after "
                                 "the length field (truncated, or not a safetensors file)")
        text = f.read(header_len)
    except OSError as e:
      raise SafetensorsError(f"{self.path}: cannot read ({e.strerror or e})") from None
    try:
      header = json.loads(text)
    except ValueError as e:  # JSONDecodeError and UnicodeDecodeError
      raise SafetensorsError(f"{self.path}: the {header_len}-byte header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
      raise SafetensorsError(f"{self.path}: the header is a JSON {type(header).__name__}, expected an object "
                             "mapping tensor names to {dtype, shape, data_offsets}")
    header.pop("__metadata__", None)
    self._data_start = 8 + header_len
    self._data_size = size - self._data_start
    self._entries = {name: self._parse_entry(name, entry) for name, entry in header.items()}
    self._check_layout(size)
    self._data: np.ndarray | None = None

  def _parse_entry(self, name: str, entry) -> tuple[str, tuple[int, ...], int, int]:
    """-> (dtype string, header shape, begin, end) after checking the entry on its own."""
    where = f"{self.path}: tensor {name}"
    if not isinstance(entry, dict):
      raise SafetensorsError(f"{where}: header entry is a {type(entry).__name__}, expected an object with "
                             "dtype, shape and data_offsets")
    missing = [key for key in ("dtype", "shape", "data_offsets") if key not in entry]
    if missing:
      raise SafetensorsError(f"{where}: header entry lacks {', '.join(missing)} (has {sorted(entry)})")
    kind, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(kind, str) or kind not in DTYPES:
      raise SafetensorsError(f"{where}: unknown dtype {kind!r}; supported: {', '.join(sorted(DTYPES))}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
      raise SafetensorsError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
      raise SafetensorsError(f"{where}: data_offsets {offsets!r} is not a pair [begin, end] of "
                             "non-negative integers")
    begin, end = offsets
    if begin > end:
      raise SafetensorsError(f"{where}: data_offsets [{begin}, {end}] end before they begin")
    if kind == "F4" and (not shape or shape[-1] % 2):
      raise SafetensorsError(f"{where}: F4 shape {shape} must have an even last dim (two values per byte)")
    count = math.prod(shape)
    nbytes = count // 2 if kind == "F4" else count * DTYPES[kind].itemsize
    if end - begin != nbytes:
      rule = "prod(shape) / 2 packed bytes" if kind == "F4" else f"prod(shape) × {DTYPES[kind].itemsize} bytes"
      raise SafetensorsError(f"{where} ({kind} {shape}) needs {nbytes} bytes ({rule}), "
                             f"data_offsets [{begin}, {end}] hold {end - begin}")
    return kind, tuple(shape), begin, end

  def _check_layout(self, size: int) -> None:
    """No two tensors share bytes and every tensor lies inside the file's data section."""
    spans = sorted((begin, end, name) for name, (_, _, begin, end) in self._entries.items() if end > begin)
    for (prev_begin, prev_end, prev), (begin, end, name) in zip(spans, spans[1:]):
      if begin < prev_end:
        raise SafetensorsError(f"{self.path}: tensors {prev} (data bytes {prev_begin}..{prev_end}) and {name} "
                               f"(data bytes {begin}..{end}) overlap")
    beyond = [(begin, end, name) for begin, end, name in spans if end > self._data_size]
    if beyond:
      begin, end, name = beyond[0]
      need = self._data_start + spans[-1][1]
      raise SafetensorsError(
          f"{self.path}: truncated: tensor {name} needs data bytes {begin}..{end} but the file has only "
          f"{self._data_size} after its header ({len(beyond)} tensor(s) cut off; file is {size} bytes, "
          f"expected at least {need})")

  def _entry(self, name: str) -> tuple[str, tuple[int, ...], int, int]:
    try:
      return self._entries[name]
    except KeyError:
      raise SafetensorsError(f"{self.path}: no tensor {name} (the file holds {len(self._entries)})") from None

  def keys(self) -> list[str]:
    return list(self._entries)

  def __contains__(self, name: str) -> bool:
    return name in self._entries

  def dtype(self, name: str) -> str:
    """The safetensors dtype string ("F32", "F8_E4M3", "F4", ...)."""
    return self._entry(name)[0]

  def shape(self, name: str) -> tuple[int, ...]:
    """The shape recorded in the header (for F4: logical elements, twice the packed last dim)."""
    return self._entry(name)[1]

  def get(self, name: str) -> np.ndarray:
    """A read-only memory-mapped view of `name` (packed uint8 [..., n/2] for F4)."""
    kind, shape, begin, end = self._entry(name)
    if kind == "F4":
      shape = shape[:-1] + (shape[-1] // 2,)
    dtype = DTYPES[kind]
    if end == begin:
      return np.zeros(shape, dtype)
    if self._data is None:
      self._data = np.memmap(self.path, dtype=np.uint8, mode="r", offset=self._data_start)
    return self._data[begin:end].view(dtype).reshape(shape)
