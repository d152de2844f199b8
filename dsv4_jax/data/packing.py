"""Aligned packing: a Grain IterDataset turning tokenized documents into fixed-length rows [S].

Input elements: {"tokens": int32[L], "token_bytes": int32[L]}, one document = [BOS, t_1.., EOS].
A document contributes L−1 (input, target) pairs: input_ids = tokens[:-1], targets = tokens[1:],
so a target is always the next token *of the same document*.

Output rows (S = seq_len, A = align, S % A == 0):
  input_ids [S] int32    document inputs, pad_id elsewhere
  targets [S] int32      next token of the same document, pad_id elsewhere
  loss_mask [S] float32  1 on document tokens, 0 on padding
  segment_ids [S] int32  1, 2, ... per document piece in the row, 0 on padding
  positions [S] int32    0, 1, ... restarting at every document piece, 0 on padding
  target_bytes [S] int32 UTF-8 bytes covered by each target token (0 for EOS and padding)

Layout: pieces are laid left to right; every piece starts at a multiple of A (the model-core
packing contract: each compression block of 128 tokens belongs to one document), and the gap up
to the next multiple of A is masked padding, counted as waste. A document longer than what is
left of the row is split: the row is filled to its end and the rest continues at offset 0 of the
next row. The continuation restarts positions at 0 and gets a new segment: each row is
self-contained (no attention across rows exists anyway), and a piece's first compression block
then sees padding in its overlap half exactly as at a document start, which is what the model
does at the start of any sequence. Its first target is still the document's true next token.

Why not Grain's ConcatThenSplitIterDataset: it has no start alignment, and its state replays a
number of *rows* since a checkpoint, which depends on seq_len. Here the state is a document
cursor — the parent state before the current document plus the number of its tokens already
emitted — independent of seq_len, so an iterator with another seq_len or batch size (a new
curriculum stage) restored from it continues at exactly the next unconsumed token.
"""

from __future__ import annotations

from typing import Any

import grain
import numpy as np

ROW_FEATURES = ("input_ids", "targets", "loss_mask", "segment_ids", "positions", "target_bytes")


def empty_row(seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """A row of padding only (no loss, segment 0)."""
  return {
      "input_ids": np.full(seq_len, pad_id, np.int32),
      "targets": np.full(seq_len, pad_id, np.int32),
      "loss_mask": np.zeros(seq_len, np.float32),
      "segment_ids": np.zeros(seq_len, np.int32),
      "positions": np.zeros(seq_len, np.int32),
      "target_bytes": np.zeros(seq_len, np.int32),
  }


class _AlignedPackIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, seq_len: int, align: int, pad_id: int):
    super().__init__(parent)
    self._seq_len = seq_len
    self._align = align
    self._pad_id = pad_id
    self._arange = np.arange(seq_len, dtype=np.int32)
    self._document: dict[str, np.ndarray] | None = None
    self._document_parent_state = parent.get_state()   # parent state before the current document
    self._offset = 0                                     # pairs of the current document emitted
    self._counters = {"rows": 0, "documents": 0, "tokens": 0, "padding": 0}

  def _fetch_document(self) -> bool:
    self._document_parent_state = self._parent.get_state()
    try:
      self._document = next(self._parent)
    except StopIteration:
      self._document = None
      return False
    self._offset = 0
    return True

  def __next__(self) -> dict[str, np.ndarray]:
    seq_len, align = self._seq_len, self._align
    row = empty_row(seq_len, self._pad_id)
    start, segment, real = 0, 0, 0
    while start < seq_len:
      if self._document is None and not self._fetch_document():
        break
      tokens = self._document["tokens"]
      token_bytes = self._document["token_bytes"]
      pairs = len(tokens) - 1
      n = min(pairs - self._offset, seq_len - start)
      if n > 0:
        segment += 1
        rows, docs = slice(start, start + n), slice(self._offset, self._offset + n)
        targets = slice(self._offset + 1, self._offset + n + 1)
        row["input_ids"][rows] = tokens[docs]
        row["targets"][rows] = tokens[targets]
        row["target_bytes"][rows] = token_bytes[targets]
        row["loss_mask"][rows] = 1.0
        row["segment_ids"][rows] = segment
        row["positions"][rows] = self._arange[:n]
        start += n
        real += n
        self._offset += n
      if self._offset >= pairs:
        self._document = None
        self._counters["documents"] += 1
        start = -(-start // align) * align
    if segment == 0:
      raise StopIteration
    self._counters["rows"] += 1
    self._counters["tokens"] += real
    self._counters["padding"] += seq_len - real
    return row

  def get_state(self) -> dict[str, Any]:
    in_document = self._document is not None
    return {
        "parent": self._document_parent_state if in_document else self._parent.get_state(),
        "in_document": in_document,
        "document_offset": self._offset if in_document else 0,
        **self._counters,
    }

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state["parent"])
    self._document = None
    self._offset = 0
    if state["in_document"]:
      if not self._fetch_document():
        raise ValueError(f"packing state {state}: the parent has no document at the saved cursor")
      self._offset = int(state["document_offset"])
      if not 0 <= self._offset < len(self._document["tokens"]) - 1:
        raise ValueError(f"packing state: document_offset {self._offset} outside the document's "
                         f"[0, {len(self._document['tokens']) - 1}) token pairs")
    self._counters = {key: int(state[key]) for key in self._counters}


class AlignedPackIterDataset(grain.IterDataset):
  """Packs {"tokens", "token_bytes"} documents into aligned rows; see the module docstring."""

  def __init__(self, parent: grain.IterDataset, *, seq_len: int, align: int = 128, pad_id: int = 0):
    if seq_len < 1 or align < 1 or seq_len % align:
      raise ValueError(f"AlignedPackIterDataset: seq_len must be a positive multiple of align "
                       f"{align}, got seq_len={seq_len}")
    super().__init__(parent)
    self._seq_len = seq_len
    self._align = align
    self._pad_id = pad_id

  def __iter__(self) -> _AlignedPackIterator:
    return _AlignedPackIterator(self._parent.__iter__(), self._seq_len, self._align, self._pad_id)

  def __str__(self) -> str:
    return f"AlignedPackIterDataset(seq_len={self._seq_len}, align={self._align})"
