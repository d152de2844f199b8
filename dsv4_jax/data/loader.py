"""The loader: `make_dataset(...)` -> a checkpointable iterator of packed batches.

Pipeline (Grain; only the aligned packer is ours):
  split source (random access) → shard [shard_index::shard_count] → shuffle(seed), reseeded per
  epoch → repeat → map(tokenize: [BOS] + text + [EOS]) → to_iter_dataset(ReadOptions: threads,
  read-ahead) → AlignedPackIterDataset(seq_len, align) → RowShuffleIterDataset (training only:
  rows shuffled within windows of row_shuffle_tokens) → batch(B; a short last batch is filled
  with padding rows) → ThreadPrefetchIterDataset(prefetch_batches) → DataIterator.

Batches: dict of numpy arrays [B, S]: input_ids int32, targets int32, loss_mask float32,
segment_ids int32 (0 = padding), positions int32, target_bytes int32 (see packing.py).

State: `get_state()` is a JSON-able dict {"data": config fingerprint + split + shard, "seq_len",
"pipeline": row-shuffle window state, or the packer state without row shuffling}. Grain's batch
and prefetch stages pass their parent's state through. The packer's state is a document cursor,
independent of seq_len and batch size: an iterator built for the next curriculum stage continues
the token stream from there: exactly where the saved one stopped without row shuffling, from the
first token of the current shuffle window with it (row_shuffle.py). `set_state` refuses a state
from a different corpus / seed / split / shard. The iterator is a `grain.DatasetIterator`, so
Orbax saves it with `grain.checkpoint.CheckpointSave` / `CheckpointRestore` (or its own save/load).
"""

from __future__ import annotations

import atexit
import dataclasses
import functools
import weakref
from typing import Any

import grain
import numpy as np

from dsv4_jax.config import DataConfig
from dsv4_jax.data.corpus import split_source
from dsv4_jax.data.packing import ROW_FEATURES, AlignedPackIterDataset, empty_row
from dsv4_jax.data.row_shuffle import RowShuffleIterDataset, restart_window
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
               tokenizer: Tokenizer, seq_len: int, batch_size: int, row_shuffled: bool):
    super().__init__(parent)
    self._fingerprint = fingerprint
    self._row_shuffled = row_shuffled
    self.tokenizer = tokenizer
    self.seq_len = seq_len
    self.batch_size = batch_size
    _LIVE_ITERATORS.add(self)

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._parent)

  def get_state(self) -> dict[str, Any]:
    return {"format": STATE_FORMAT, "data": self._fingerprint, "seq_len": self.seq_len,
            "pipeline": self._parent.get_state()}

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
    pipeline = state["pipeline"]
    if self._row_shuffled and state.get("seq_len") != self.seq_len:
      pipeline = restart_window(pipeline)   # a new curriculum stage: re-cut the window's rows
    self._parent.set_state(pipeline)

  def packing_stats(self) -> dict[str, float]:
    """Counts over every row packed so far (before the current shuffle window with row shuffling;
    restored with the state): rows, documents finished, tokens (with loss), padding (masked
    positions: alignment gaps and row tails), waste fraction."""
    pipeline = self._parent.get_state()
    pipeline = pipeline["window_start"] if self._row_shuffled else pipeline
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
  row_shuffled = split == "train" and data_config.shuffle and data_config.row_shuffle_tokens > 0
  if row_shuffled:
    rows = RowShuffleIterDataset(rows, window_rows=max(1, data_config.row_shuffle_tokens // seq_len),
                                 seed=seed)
  batches = rows.batch(batch_size, batch_fn=functools.partial(
      _stack_rows, batch_size=batch_size, seq_len=seq_len, pad_id=tokenizer.pad_id))
  if data_config.prefetch_batches:
    batches = grain.experimental.ThreadPrefetchIterDataset(
        batches, prefetch_buffer_size=data_config.prefetch_batches)
  fingerprint = {**data_config.fingerprint(), "seed": seed, "split": split,
                 "shard_index": shard_index, "shard_count": shard_count, "num_epochs": num_epochs,
                 "tokenizer_vocab_size": tokenizer.vocab_size}
  return DataIterator(batches.__iter__(), fingerprint=fingerprint, tokenizer=tokenizer,
                      seq_len=seq_len, batch_size=batch_size, row_shuffled=row_shuffled)


def validation_sample(data_config: DataConfig, seq_len: int, batch_size: int, num_rows: int,
                      tokenizer: Tokenizer | None = None) -> list[dict[str, np.ndarray]]:
  """A fixed, uniformly random sample of `num_rows` packed validation rows, as batches [batch_size, seq_len].

  One pass over the whole validation split (reservoir sampling, seeded by data_config.seed, so
  every call with the same arguments returns the same rows): an unbiased estimate of the split's
  loss, where the first rows of the split would only cover its first few documents. Rows keep
  their packed order; the last batch is filled with padding rows. Fewer rows than asked for when
  the split is smaller.
  """
  if num_rows < 1:
    raise ValueError(f"validation_sample: num_rows must be positive, got {num_rows}")
  rows = make_dataset(dataclasses.replace(data_config, prefetch_batches=0), seq_len, 1, tokenizer,
                      split="validation", num_epochs=1)
  rng = np.random.default_rng(data_config.seed)
  reservoir: list[tuple[int, dict[str, np.ndarray]]] = []
  for index, batch in enumerate(rows):
    row = {key: value[0] for key, value in batch.items()}
    if index < num_rows:
      reservoir.append((index, row))
    else:
      slot = rng.integers(0, index + 1)
      if slot < num_rows:
        reservoir[slot] = (index, row)
  chosen = [row for _, row in sorted(reservoir, key=lambda item: item[0])]
  return [_stack_rows(chosen[i:i + batch_size], batch_size=batch_size, seq_len=seq_len,
                      pad_id=rows.tokenizer.pad_id) for i in range(0, len(chosen), batch_size)]
