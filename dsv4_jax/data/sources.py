"""Document sources: random-access sequences of documents (str), one per file / line / row / record.

Every source implements Grain's RandomAccessDataSource protocol (`len`, `source[i] -> str`) plus
`key(i) -> str`, a stable name for document i (relative path, "file:line", "file:row",
"file:record") used to split documents deterministically into train / validation.

  TextFileSource(paths, file_glob)   files and directories (recursive); one file = one document
  JsonlSource(paths, text_field)     one JSON object per non-blank line
  ParquetSource(paths, text_field)   one row per document (pyarrow, row groups read on demand)
  ArrayRecordSource(paths)           one UTF-8 record per document (Grain's ArrayRecordDataSource)

Text is decoded as UTF-8; undecodable bytes become U+FFFD (the standard library itself holds a
few deliberately non-UTF-8 files). Errors name the file (and line / row) and the expected value.
"""

from __future__ import annotations

import bisect
import fnmatch
import functools
import json
import os
import threading
from typing import Sequence

import grain
import numpy as np

from dsv4_jax.data.errors import DataError


def _check_exists(path: str) -> None:
  if not os.path.exists(path):
    raise FileNotFoundError(f"data path {path!r} does not exist (DataConfig.paths / validation_paths)")


def _looks_binary(path: str) -> bool:
  with open(path, "rb") as f:
    return b"\0" in f.read(8192)


def list_text_files(paths: Sequence[str], file_glob: str = "*",
                    exclude_dirs: Sequence[str] = ()) -> list[tuple[str, str]]:
  """[(absolute path, key)] for every non-empty text file named by `paths`, sorted by key.

  A file path is taken as given (key = its base name); a directory is walked recursively (key =
  path relative to that directory), keeping files whose name matches `file_glob` and skipping
  hidden entries, directories named in `exclude_dirs`, empty files and binary files.
  """
  found: list[tuple[str, str]] = []
  for root in paths:
    _check_exists(root)
    if os.path.isfile(root):
      found.append((os.path.abspath(root), os.path.basename(root)))
      continue
    for dirpath, dirnames, filenames in os.walk(root):
      dirnames[:] = sorted(d for d in dirnames if not d.startswith(".") and d not in exclude_dirs)
      for name in sorted(filenames):
        full = os.path.join(dirpath, name)
        if (name.startswith(".") or not fnmatch.fnmatch(name, file_glob) or not os.path.isfile(full)
            or os.path.getsize(full) == 0 or _looks_binary(full)):
          continue
        found.append((os.path.abspath(full), os.path.relpath(full, root).replace(os.sep, "/")))
  found.sort(key=lambda item: item[1])
  return found


def list_files(path: str, file_glob: str) -> list[tuple[str, str]]:
  """Like `list_text_files` for one directory, but without the binary-file filter (Parquet and
  ArrayRecord files are binary)."""
  found = []
  for dirpath, dirnames, filenames in os.walk(path):
    dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    for name in sorted(filenames):
      if not name.startswith(".") and fnmatch.fnmatch(name, file_glob):
        full = os.path.join(dirpath, name)
        found.append((os.path.abspath(full), os.path.relpath(full, path)))
  return sorted(found, key=lambda item: item[1])


class TextFileSource:
  """One document per text file."""

  def __init__(self, paths: Sequence[str], file_glob: str = "*", exclude_dirs: Sequence[str] = ()):
    self._files = list_text_files(paths, file_glob, exclude_dirs)

  def __len__(self) -> int:
    return len(self._files)

  def __getitem__(self, index: int) -> str:
    with open(self._files[index][0], "rb") as f:
      return f.read().decode("utf-8", errors="replace")

  def key(self, index: int) -> str:
    return self._files[index][1]

  def __repr__(self) -> str:
    return f"TextFileSource({len(self)} files)"


class JsonlSource:
  """One document per non-blank line of JSONL files; the text is the string field `text_field`.

  Lines are indexed (byte offsets) up front and parsed lazily, so a malformed line is reported
  when it is read, naming the file and its 1-based line number.
  """

  def __init__(self, paths: Sequence[str], text_field: str = "text"):
    self._text_field = text_field
    self._paths: list[str] = []
    self._offsets: list[np.ndarray] = []   # per file: byte offset of each non-blank line
    self._line_numbers: list[np.ndarray] = []
    for path in paths:
      _check_exists(path)
      files = [p for p, _ in list_text_files([path], "*.jsonl")] if os.path.isdir(path) else [path]
      for file in files:
        offsets, line_numbers, position = [], [], 0
        with open(file, "rb") as f:
          for line_number, line in enumerate(f, 1):
            if line.strip():
              offsets.append(position)
              line_numbers.append(line_number)
            position += len(line)
        self._paths.append(file)
        self._offsets.append(np.asarray(offsets, np.int64))
        self._line_numbers.append(np.asarray(line_numbers, np.int64))
    self._starts = np.cumsum([0] + [len(o) for o in self._offsets]).tolist()

  def __len__(self) -> int:
    return self._starts[-1]

  def _locate(self, index: int) -> tuple[int, int]:
    if not 0 <= index < len(self):
      raise IndexError(f"JsonlSource: index {index} out of range [0, {len(self)})")
    file_index = bisect.bisect_right(self._starts, index) - 1
    return file_index, index - self._starts[file_index]

  def __getitem__(self, index: int) -> str:
    file_index, local = self._locate(index)
    path = self._paths[file_index]
    line_number = int(self._line_numbers[file_index][local])
    with open(path, "rb") as f:
      f.seek(int(self._offsets[file_index][local]))
      line = f.readline()
    try:
      record = json.loads(line)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
      reason = f"{e.msg} at column {e.colno}" if isinstance(e, json.JSONDecodeError) else str(e)
      raise DataError(f"{path}:{line_number}: invalid JSON ({reason}); expected one JSON object "
                      f"per line with a string field {self._text_field!r}") from None
    if not isinstance(record, dict) or self._text_field not in record:
      keys = sorted(record) if isinstance(record, dict) else type(record).__name__
      raise DataError(f"{path}:{line_number}: no field {self._text_field!r} (got {keys}); "
                      f"set DataConfig.text_field to the field holding the text")
    text = record[self._text_field]
    if not isinstance(text, str):
      raise DataError(f"{path}:{line_number}: field {self._text_field!r} must be a string, "
                      f"got {type(text).__name__}")
    return text

  def key(self, index: int) -> str:
    file_index, local = self._locate(index)
    return f"{os.path.basename(self._paths[file_index])}:{int(self._line_numbers[file_index][local])}"

  def __repr__(self) -> str:
    return f"JsonlSource({len(self._paths)} files, {len(self)} lines)"


class ParquetSource:
  """One document per row of the string column `text_field` of Parquet files.

  Grain's ParquetIterDataset reads sequentially; a random-access source keeps the global,
  index-based shuffle and the exact index-based iterator state of the rest of the pipeline.
  """

  def __init__(self, paths: Sequence[str], text_field: str = "text"):
    import pyarrow.parquet as pq  # imported lazily: only needed for this source.

    self._text_field = text_field
    self._row_groups: list[tuple[str, int]] = []   # (file, row group)
    starts = [0]
    for path in paths:
      _check_exists(path)
      files = [p for p, _ in list_files(path, "*.parquet")] if os.path.isdir(path) else [path]
      for file in files:
        try:
          parquet = pq.ParquetFile(file)
        except Exception as e:
          raise DataError(f"{file}: not a readable Parquet file ({e})") from None
        names = parquet.schema_arrow.names
        if text_field not in names:
          raise DataError(f"{file}: no column {text_field!r} (columns: {names}); set "
                          f"DataConfig.text_field to the column holding the text")
        for group in range(parquet.num_row_groups):
          self._row_groups.append((file, group))
          starts.append(starts[-1] + parquet.metadata.row_group(group).num_rows)
    self._starts = starts
    self._lock = threading.Lock()
    self._read_group = functools.lru_cache(maxsize=4)(self._read_group_uncached)

  def _read_group_uncached(self, group_index: int) -> list:
    import pyarrow.parquet as pq

    file, group = self._row_groups[group_index]
    return pq.ParquetFile(file).read_row_group(group, columns=[self._text_field]).column(0).to_pylist()

  def __len__(self) -> int:
    return self._starts[-1]

  def _locate(self, index: int) -> tuple[int, int]:
    if not 0 <= index < len(self):
      raise IndexError(f"ParquetSource: index {index} out of range [0, {len(self)})")
    group_index = bisect.bisect_right(self._starts, index) - 1
    return group_index, index - self._starts[group_index]

  def __getitem__(self, index: int) -> str:
    group_index, local = self._locate(index)
    with self._lock:
      rows = self._read_group(group_index)
    text = rows[local]
    if not isinstance(text, str):
      file, group = self._row_groups[group_index]
      raise DataError(f"{file}: row {self._file_row(group_index, local)} column "
                      f"{self._text_field!r} must be a string, got {type(text).__name__}")
    return text

  def _file_row(self, group_index: int, local: int) -> int:
    file = self._row_groups[group_index][0]
    first = next(i for i, (f, _) in enumerate(self._row_groups) if f == file)
    return self._starts[group_index] - self._starts[first] + local

  def key(self, index: int) -> str:
    group_index, local = self._locate(index)
    file = self._row_groups[group_index][0]
    return f"{os.path.basename(file)}:{self._file_row(group_index, local)}"

  def __repr__(self) -> str:
    return f"ParquetSource({len(self._row_groups)} row groups, {len(self)} rows)"


class ArrayRecordSource:
  """One document per ArrayRecord record (UTF-8 bytes), read through Grain's ArrayRecordDataSource."""

  def __init__(self, paths: Sequence[str]):
    files: list[str] = []
    for path in paths:
      _check_exists(path)
      files += ([p for p, _ in list_files(path, "*.array_record*")] if os.path.isdir(path)
                else [path])
    self._files = files
    try:
      self._source = grain.sources.ArrayRecordDataSource(files) if files else []
    except Exception as e:
      raise DataError(f"ArrayRecord files {files}: cannot be opened ({e})") from None

  def __len__(self) -> int:
    return len(self._source)

  def __getitem__(self, index: int) -> str:
    record = self._source[index]
    return record.decode("utf-8", errors="replace") if isinstance(record, bytes) else str(record)

  def key(self, index: int) -> str:
    # Record indices are global over the (ordered) file list, so the key is stable for fixed paths.
    return f"record:{index}"

  def __repr__(self) -> str:
    return f"ArrayRecordSource({len(self._files)} files, {len(self)} records)"


class Subset:
  """Documents `indices` of `source`, in that order (a train or validation split)."""

  def __init__(self, source, indices: Sequence[int]):
    self._source = source
    self._indices = np.asarray(indices, dtype=np.int64)

  def __len__(self) -> int:
    return len(self._indices)

  def __getitem__(self, index: int) -> str:
    return self._source[int(self._indices[index])]

  def key(self, index: int) -> str:
    return self._source.key(int(self._indices[index]))

  def __repr__(self) -> str:
    return f"Subset({self._source!r}, {len(self)} documents)"
