"""Corpora: the document source of a DataConfig split, the embedded stdlib corpus, byte entropy.

Split rule: document d goes to validation iff u(d) < validation_fraction, where
  u(d) = first 8 bytes of SHA-256(key(d)) / 2**64 ∈ [0, 1)
and key(d) is the document's stable name (relative path, "file:line", ...). The split is therefore
deterministic, disjoint, independent of file order, and stable when documents are added.

Embedded corpus ("stdlib"): every *.py file under `sysconfig.get_paths()["stdlib"]`, skipping
site-packages / dist-packages / __pycache__ (installed third-party code is not the stdlib).

Unigram byte entropy H = −Σ_b p(b) log2 p(b) over the byte histogram of a text: the bits per byte
of the best model that ignores context, the baseline validation bits-per-byte is compared against.
"""

from __future__ import annotations

import functools
import hashlib
import math
import sysconfig
from typing import Iterable

import numpy as np

from dsv4_jax.config import DataConfig
from dsv4_jax.data.errors import DataError
from dsv4_jax.data.sources import (ArrayRecordSource, JsonlSource, ParquetSource, Subset,
                                   TextFileSource)

SPLITS = ("train", "validation")
STDLIB_EXCLUDE_DIRS = ("site-packages", "dist-packages", "__pycache__")


def stdlib_root() -> str:
  return sysconfig.get_paths()["stdlib"]


def validation_score(key: str) -> float:
  """u(key) ∈ [0, 1): the deterministic hash the train / validation split thresholds."""
  return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") / 2.0**64


@functools.lru_cache(maxsize=1)
def _stdlib_source() -> TextFileSource:
  # Listing ~2k files takes ~0.5 s; the listing is immutable, and a run builds several iterators.
  return TextFileSource([stdlib_root()], "*.py", exclude_dirs=STDLIB_EXCLUDE_DIRS)


def _open_source(config: DataConfig, paths: tuple[str, ...]):
  if config.source == "stdlib":
    return _stdlib_source()
  if config.source == "text":
    return TextFileSource(paths, config.file_glob)
  if config.source == "jsonl":
    return JsonlSource(paths, config.text_field)
  if config.source == "parquet":
    return ParquetSource(paths, config.text_field)
  return ArrayRecordSource(paths)


def split_source(config: DataConfig, split: str) -> Subset:
  """The documents of `split` ("train" | "validation") as a random-access source.

  Raises ValueError when the split holds no document (naming source, paths and split).
  """
  if split not in SPLITS:
    raise ValueError(f"split: expected one of {SPLITS}, got {split!r}")
  explicit_validation = config.source != "stdlib" and bool(config.validation_paths)
  if explicit_validation:
    source = _open_source(config, config.paths if split == "train" else config.validation_paths)
    indices = range(len(source))
  else:
    source = _open_source(config, config.paths)
    in_validation = [validation_score(source.key(i)) < config.validation_fraction
                     for i in range(len(source))]
    indices = [i for i, v in enumerate(in_validation) if v == (split == "validation")]
  documents = Subset(source, list(indices))
  if len(documents) == 0:
    where = stdlib_root() if config.source == "stdlib" else (
        list(config.validation_paths) if explicit_validation and split == "validation"
        else list(config.paths))
    hint = ""
    if len(source) and not explicit_validation:
      hint = (f"; the corpus has {len(source)} documents but none hashed into {split!r} at "
              f"validation_fraction={config.validation_fraction} (set DataConfig.validation_paths)")
    raise DataError(f"empty corpus: no documents for split {split!r} from source "
                    f"{config.source!r} at {where}; expected at least one non-empty document{hint}")
  return documents


def byte_histogram(texts: Iterable[str | bytes]) -> np.ndarray:
  counts = np.zeros(256, np.int64)
  for text in texts:
    data = text.encode("utf-8") if isinstance(text, str) else text
    counts += np.bincount(np.frombuffer(data, np.uint8), minlength=256)
  return counts


def unigram_byte_entropy(texts: Iterable[str | bytes]) -> float:
  """−Σ p log2 p of the pooled byte histogram of `texts`, in bits per byte."""
  counts = byte_histogram(texts)
  total = counts.sum()
  if total == 0:
    raise ValueError("unigram_byte_entropy: the texts hold no bytes")
  p = counts[counts > 0] / total
  return float(-(p * np.log2(p)).sum())


def corpus_unigram_byte_entropy(config: DataConfig, split: str = "validation") -> float:
  """Unigram byte entropy (bits per byte) of every document of `split`."""
  documents = split_source(config, split)
  return unigram_byte_entropy(documents[i] for i in range(len(documents)))


def bits_per_byte(loss_nats_sum: float, num_bytes: float) -> float:
  """Σ next-token cross-entropy (nats) over a text / its UTF-8 byte count, in bits per byte."""
  if num_bytes <= 0:
    raise ValueError(f"bits_per_byte: num_bytes must be positive, got {num_bytes}")
  return float(loss_nats_sum) / math.log(2.0) / float(num_bytes)
