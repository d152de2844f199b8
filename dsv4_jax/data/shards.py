"""One process's data shards, read in lockstep as one iterator.

The training documents are split into D disjoint shards (`DataConfig.shards`); shard i packs its own
rows, batch_size / D of every batch. A process holding shards [a, b) reads them side by side: its part of
batch t is the concatenation of batch t of each of its shards, [(b − a) · batch_size / D, seq_len]. The
state is per shard, so the data position of a run is the same whatever the number of processes that read
it: `merge` joins the processes' states for a checkpoint, `select` takes a process's own back out.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np


class LocalShards:
  """open_shard(index) -> a checkpointable iterator (get_state / set_state) of shard `index`'s batches."""

  def __init__(self, open_shard: Callable[[int], Any], indices: range, count: int):
    self.count = count
    self._iterators = {index: open_shard(index) for index in indices}

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    parts = [next(iterator) for iterator in self._iterators.values()]
    return {key: np.concatenate([part[key] for part in parts]) for key in parts[0]}

  def get_state(self) -> dict:
    return {"shards": self.count, "states": {str(i): it.get_state() for i, it in self._iterators.items()}}

  def set_state(self, state: dict) -> None:
    for index, iterator in self._iterators.items():
      iterator.set_state(state["states"][str(index)])

  def close(self) -> None:
    for iterator in self._iterators.values():
      if hasattr(iterator, "close"):
        iterator.close()


def merge(states: list[dict]) -> dict:
  """The processes' `get_state()`s -> one state holding every shard."""
  return {"shards": states[0]["shards"], "states": {k: v for state in states for k, v in state["states"].items()}}


def select(state: dict, indices: range) -> dict:
  """A merged state -> the part of the shards `indices`."""
  return {"shards": state["shards"], "states": {str(i): state["states"][str(i)] for i in indices}}
