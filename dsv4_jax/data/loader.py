"""The loader: `make_dataset(...)` -> a checkpointable iterator of packed batches.

Pipeline (Grain; only the aligned packer is ours):
  split source (random access) → shard [shard_index::shard_count] → shuffle(seed), reseeded per
  epoch → repeat → map(tokenize: [BOS] + text + [EOS]) → to_iter_dataset(ReadOptions: threads,
  read-ahead) → AlignedPackIterDataset(seq_len, align) → batch(B; a short last batch is filled
  with padding rows) → ThreadPrefetchIterDataset(prefetch_batches) → DataIterator.

Batches: dict of numpy arrays [B, S]: input_ids int32, targets int32, loss_mask float32,
segment_ids int32 (0 = padding), positions int32, target_bytes int32 (see packing.py).

State: `get_state()` is a JSON-able dict {"data": config fingerprint + split + shard,
"pipeline": packer state}. Grain's batch and prefetch stages pass their parent's state through,
so the pipeline state is the packer's document cursor, which does not depend on seq_len or batch
size: an iterator built for the next curriculum stage continues the token stream exactly where
the saved one stopped. `set_state` refuses a state from a different corpus / seed / split /
shard. The iterator is a `grain.DatasetIterator`, so Orbax saves it with
`grain.checkpoint.CheckpointSave` / `CheckpointRestore` (or via its own save/load).
"""

from __future__ import annotations

import atexit
import functools
import weakref
from typing import Any

import grain
import numpy as np

from dsv4_jax.data.config import DataConfig
from dsv4_jax.data.corpus import split_source
from dsv4_jax.data.packing import ROW_FEATURES, AlignedPackIterDataset, empty_row
from dsv4_jax.data.tokenizer import Tokenizer, load_tokenizer

STATE_FORMAT = 1

# Grain 0.2.18's thread-prefetch iterator closes itself again in __del__, and that close reads
# module globals that are already None during interpreter teardown (a noisy AttributeError for
# iterators held in module globals). Close live iterators at exit, while the interpreter is
# intact, and make later closes of their pipeline no-ops.
_LIVE_ITERATORS: weakref.WeakSet = weakref.WeakSet()


@atexit.register
def _close_live_iterators() -> None:
  for iterator in list(_LIVE_ITERATORS):
    iterator.close()
    nodes = [iterator]
    while nodes:
      node = nodes.pop()
      node.close = lambda: None
      nodes.extend(getattr(node, "_parents", ()))


def tokenize_document(text: str, tokenizer: Tokenizer) -> dict[str, np.ndarray]:
  """[BOS] + tokens + [EOS] and the bytes each token covers (0 for BOS / EOS)."""
  ids, byte_counts = tokenizer.encode_with_byte_counts(text)
  tokens = np.concatenate([[tokenizer.bos_id], ids, [tokenizer.eos_id]]).astype(np.int32)
  token_bytes = np.concatenate([[0], byte_counts, [0]]).astype(np.int32)
  return {"tokens": tokens, "token_bytes": token_bytes}


def _stack_rows(rows, *, batch_size: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  rows = list(rows) + [empty_row(seq_len, pad_id)] * (batch_size - len(rows))
  return {key: np.stack([row[key] for row in rows]) for key in ROW_FEATURES}


class DataIterator(grain.DatasetIterator):
  """Batches of packed rows; `get_state` / `set_state` restore the exact position in the stream."""

  def __init__(self, parent: grain.DatasetIterator, *, fingerprint: dict[str, Any],
               tokenizer: Tokenizer, seq_len: int, batch_size: int):
    super().__init__(parent)
    self._fingerprint = fingerprint
    self.tokenizer = tokenizer
    self.seq_len = seq_len
    self.batch_size = batch_size
    _LIVE_ITERATORS.add(self)

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return {"format": STATE_FORMAT, "data": self._fingerprint, "pipeline": self._parent.get_state()}

  def set_state(self, state: dict[str, Any]) -> None:
    if state.get("format") != STATE_FORMAT:
      raise ValueError(f"data iterator state: expected format {STATE_FORMAT}, got {state.get('format')!r}")
    saved = state["data"]
    differing = sorted(k for k in set(saved) | set(self._fingerprint)
                       if saved.get(k) != self._fingerprint.get(k))
    if differing:
      details = ", ".join(f"{k}: saved {saved.get(k)!r}, now {self._fingerprint.get(k)!r}"
                          for k in differing)
      raise ValueError(f"data iterator state was saved for a different data stream ({details})")
    self._parent.set_state(state["pipeline"])

  def packing_stats(self) -> dict[str, float]:
    """Counts over every row emitted so far (restored with the state): rows, documents finished,
    tokens (with loss), padding (masked positions: alignment gaps and row tails), waste fraction."""
    pipeline = self._parent.get_state()
    stats = {key: int(pipeline[key]) for key in ("rows", "documents", "tokens", "padding")}
    total = stats["tokens"] + stats["padding"]
    stats["waste"] = stats["padding"] / total if total else 0.0
    return stats


def make_dataset(data_config: DataConfig, seq_len: int, batch_size: int,
                 tokenizer: Tokenizer | None = None, split: str = "train", seed: int | None = None,
                 shard_index: int = 0, shard_count: int = 1,
                 num_epochs: int | None = -1) -> DataIterator:
  """A checkpointable iterator of packed batches {input_ids, targets, loss_mask, segment_ids,
  positions, target_bytes}, each [batch_size, seq_len].

  split: "train" (shuffled when data_config.shuffle, repeated forever by default) or
    "validation" (file order, one pass by default, the last batch filled with padding rows).
  seed: overrides data_config.seed. shard_index / shard_count: this process's share of the
    documents (e.g. jax.process_index(), jax.process_count()); shards are disjoint.
  num_epochs: passes over the split; None = forever; the default -1 means forever for train and
    once for validation.
  For multi-host validation, iterate a fixed number of batches: shards hold different documents,
    so their batch counts differ.
  """
  if batch_size < 1:
    raise ValueError(f"make_dataset: batch_size must be positive, got {batch_size}")
  if seq_len < 1 or seq_len % data_config.align:
    raise ValueError(f"make_dataset: seq_len must be a positive multiple of data.align "
                     f"{data_config.align}, got {seq_len}")
  if not 0 <= shard_index < shard_count:
    raise ValueError(f"make_dataset: expected 0 <= shard_index < shard_count, got "
                     f"shard_index={shard_index}, shard_count={shard_count}")
  seed = data_config.seed if seed is None else seed
  if num_epochs == -1:
    num_epochs = None if split == "train" else 1
  tokenizer = tokenizer if tokenizer is not None else load_tokenizer(data_config.tokenizer)

  documents = split_source(data_config, split)
  dataset = grain.MapDataset.source(documents)[shard_index::shard_count]
  if len(dataset) == 0:
    raise ValueError(f"make_dataset: shard {shard_index} of {shard_count} holds no documents of "
                     f"split {split!r} ({len(documents)} documents in all)")
  if split == "train" and data_config.shuffle:
    dataset = dataset.shuffle(seed=seed)
  if num_epochs != 1:
    dataset = dataset.repeat(num_epochs)
  dataset = dataset.map(functools.partial(tokenize_document, tokenizer=tokenizer))
  read_options = grain.ReadOptions(num_threads=data_config.num_threads,
                                   prefetch_buffer_size=data_config.prefetch_buffer_size)
  rows = AlignedPackIterDataset(dataset.to_iter_dataset(read_options), seq_len=seq_len,
                                align=data_config.align, pad_id=tokenizer.pad_id)
  batches = rows.batch(batch_size, batch_fn=functools.partial(
      _stack_rows, batch_size=batch_size, seq_len=seq_len, pad_id=tokenizer.pad_id))
  if data_config.prefetch_batches:
    batches = grain.experimental.ThreadPrefetchIterDataset(
        batches, prefetch_buffer_size=data_config.prefetch_batches)
  fingerprint = {**data_config.fingerprint(), "seed": seed, "split": split,
                 "shard_index": shard_index, "shard_count": shard_count, "num_epochs": num_epochs,
                 "tokenizer_vocab_size": tokenizer.vocab_size}
  return DataIterator(batches.__iter__(), fingerprint=fingerprint, tokenizer=tokenizer,
                      seq_len=seq_len, batch_size=batch_size)
