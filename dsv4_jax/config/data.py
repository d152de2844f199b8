"""Data configuration: a small frozen dataclass naming the corpus, tokenizer and loader knobs.

Embedded in the training config. Sequence length and batch size are deliberately *not* here: they
change between curriculum stages and are passed to `make_dataset` per stage, while everything that
decides which tokens come in which order (source, split, tokenizer, seed, alignment) lives here and
is fingerprinted into the iterator state, so a restored state is only accepted by a matching config.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Any

from dsv4_jax.config.errors import ConfigError

SOURCE_KINDS = ("stdlib", "text", "jsonl", "parquet", "array_record")


@dataclasses.dataclass(frozen=True)
class DataConfig:
  """Where documents come from and how they are turned into packed rows.

  source: "stdlib" (the embedded default corpus: the Python standard library's *.py files),
    "text" (text files and/or directories walked recursively; one file = one document),
    "jsonl" (one JSON object per line, the document in `text_field`), "parquet" (column
    `text_field`), "array_record" (each record is one UTF-8 document).
  paths: files or directories for the training split (ignored for "stdlib"); relative paths are stored
    absolute (resolved against the working directory when the config is built), as is `tokenizer`.
  validation_paths: files for the validation split; when empty, documents are split
    deterministically by a hash of their key (relative path, or "file:line"/"file:row").
  validation_fraction: share of documents hashed into validation when `validation_paths` is empty.
  text_field: JSON key / Parquet column holding the document text.
  file_glob: file-name pattern (fnmatch) for files found inside directories; binary files (a NUL
    byte in the first 8 KiB) and hidden files are skipped.
  tokenizer: "byte" (ByteTokenizer) or a path to a Hugging Face tokenizer.json.
  align: every document starts at a multiple of this many tokens inside a row (the model's
    largest compression ratio), with masked padding in between.
  shuffle, seed: global document-order shuffle (Grain's index shuffle, reseeded each epoch; it
    needs no shuffle buffer).
  row_shuffle_tokens: training rows are also shuffled within windows of about this many tokens
    (Grain's WindowShuffleIterDataset; window = row_shuffle_tokens // seq_len rows), so that a
    batch mixes many documents instead of consecutive pieces of one long file. 0 = off.
  num_threads, prefetch_buffer_size: Grain ReadOptions for reading and tokenizing documents.
  prefetch_batches: packed batches prepared ahead in a background thread (0 = none).
  shards: the training documents are read as this many disjoint shards (document i in shard
    i mod shards), each packing batch_size / shards rows of every batch; each process reads only its
    own shards. 0 = one per process. The batches depend on it, not on the process count: a run with
    shards 2 reads the same batches from one process as from two.
  """

  source: str = "stdlib"
  paths: tuple[str, ...] = ()
  validation_paths: tuple[str, ...] = ()
  validation_fraction: float = 0.05
  text_field: str = "text"
  file_glob: str = "*"
  tokenizer: str = "byte"
  align: int = 128
  shuffle: bool = True
  seed: int = 0
  row_shuffle_tokens: int = 131072
  num_threads: int = 2
  prefetch_buffer_size: int = 64
  prefetch_batches: int = 2
  shards: int = 0

  def __post_init__(self):
    # YAML gives lists (or one string); store tuples so the config stays hashable. Relative paths are made
    # absolute here, against the directory the config is read in: a run's saved config (and a resume, an
    # export or `dsv4 eval` of it from another directory) then names the same files.
    for name in ("paths", "validation_paths"):
      value = getattr(self, name)
      if isinstance(value, str):
        value = (value,)
      object.__setattr__(self, name, tuple(os.path.abspath(str(v)) for v in value))
    if self.tokenizer != "byte":
      object.__setattr__(self, "tokenizer", os.path.abspath(self.tokenizer))
    if self.source not in SOURCE_KINDS:
      raise ConfigError(f"data.source: expected one of {SOURCE_KINDS}, got {self.source!r}")
    if self.source != "stdlib" and not self.paths:
      raise ConfigError(f"data.paths: source {self.source!r} needs at least one path, got none")
    if not 0.0 <= self.validation_fraction < 1.0:
      raise ConfigError(
          f"data.validation_fraction: expected a value in [0, 1), got {self.validation_fraction}")
    if self.align < 1:
      raise ConfigError(f"data.align: expected a positive integer, got {self.align}")
    if not 0 <= self.seed < 2**32:
      raise ConfigError(f"data.seed: expected an integer in [0, 2**32), got {self.seed}")
    for name in ("num_threads", "prefetch_buffer_size", "prefetch_batches", "row_shuffle_tokens", "shards"):
      if getattr(self, name) < 0:
        raise ConfigError(f"data.{name}: expected >= 0, got {getattr(self, name)}")
    if not self.text_field:
      raise ConfigError("data.text_field: expected a non-empty field name")

  def fingerprint(self) -> dict[str, Any]:
    """The fields that decide the token stream; a saved iterator state records and checks them."""
    return {
        "source": self.source,
        "paths": list(self.paths),
        "validation_paths": list(self.validation_paths),
        "validation_fraction": self.validation_fraction,
        "text_field": self.text_field,
        "file_glob": self.file_glob,
        "tokenizer": self.tokenizer,
        "align": self.align,
        "shuffle": self.shuffle,
        "seed": self.seed,
        "row_shuffle_tokens": self.row_shuffle_tokens,
    }
