"""Row shuffling: packed rows returned in a seeded random order within consecutive windows.

Documents are shuffled before packing, but a long file still fills many consecutive rows, so
without this a batch holds pieces of one or two files (highly correlated gradients). Rows are
self-contained (packing.py), so reordering them changes nothing but the order.

Window k holds the next `window_rows` rows of the parent and is returned in the order
`default_rng((seed, k)).permutation`. State: {"window_start": the parent's state before window k,
"window_index": k, "consumed": rows of window k already returned}. When a window is used up the
state moves to the next window's start at once, so a saved state never points into a finished
window. Restoring re-reads window k from its start and skips `consumed` rows (exact);
`restart_window(state)` sets consumed = 0, which is what a new curriculum stage does with a state
saved at another seq_len: its rows are re-cut at the new length from the window's first token, so
no token is skipped (at most window_rows − 1 rows of the old stage are seen again).

Like Grain's WindowShuffleIterDataset, except for the eager move to the next window and the
seq_len-independent restart, which the curriculum needs.
"""

from __future__ import annotations

import copy
from typing import Any

import grain
import numpy as np


def restart_window(state: dict[str, Any]) -> dict[str, Any]:
  """The state of the current window's first row (see the module docstring)."""
  return {**state, "consumed": 0}


class _RowShuffleIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, window_rows: int, seed: int):
    super().__init__(parent)
    self._window_rows = window_rows
    self._seed = seed
    self._window_start = parent.get_state()
    self._window_index = 0
    self._consumed = 0
    self._pending: list = []    # rows of the current window not yet returned, next one last

  def _fill_window(self) -> None:
    rows = []
    for _ in range(self._window_rows):
      try:
        rows.append(next(self._parent))
      except StopIteration:
        break
    order = np.random.default_rng((self._seed, self._window_index)).permutation(len(rows))
    self._pending = [rows[i] for i in order[::-1]]

  def __next__(self):
    if not self._pending:
      self._fill_window()
      if not self._pending:
        raise StopIteration
    row = self._pending.pop()
    self._consumed += 1
    if not self._pending:
      self._window_start = self._parent.get_state()
      self._window_index += 1
      self._consumed = 0
    return row

  def get_state(self) -> dict[str, Any]:
    return {"window_start": copy.deepcopy(self._window_start), "window_index": self._window_index,
            "consumed": self._consumed}

  def set_state(self, state: dict[str, Any]) -> None:
    self._window_start = copy.deepcopy(state["window_start"])
    self._window_index = int(state["window_index"])
    self._consumed = int(state["consumed"])
    self._parent.set_state(self._window_start)
    self._pending = []
    if self._consumed:
      self._fill_window()
      if self._consumed >= len(self._pending):
        raise ValueError(f"row shuffle state: {self._consumed} rows consumed, but window "
                         f"{self._window_index} holds only {len(self._pending)}")
      del self._pending[len(self._pending) - self._consumed:]


class RowShuffleIterDataset(grain.IterDataset):
  """Rows of `parent` shuffled within consecutive windows of `window_rows` rows; see the module docstring."""

  def __init__(self, parent: grain.IterDataset, *, window_rows: int, seed: int):
    if window_rows < 1:
      raise ValueError(f"RowShuffleIterDataset: window_rows must be positive, got {window_rows}")
    super().__init__(parent)
    self._window_rows = window_rows
    self._seed = seed

  def __iter__(self) -> grain.DatasetIterator:
    return _RowShuffleIterator(self._parent.__iter__(), self._window_rows, self._seed)
