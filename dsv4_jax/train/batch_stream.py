"""The run's batches, one per global step across the curriculum stages: read ahead, rewound, resumed exactly.

`BatchStream.next()` returns the batch of the current step; `peek(k)` the batch of step + k, read
ahead (anticipatory routing needs the batch of step + Δt Δt steps early); `position()` is the data
iterator state from which the batch of the current step is read again, whatever was read ahead:
the state a checkpoint saves and a rollback rewinds to (`reset`).

Each batch read is remembered with the iterator state it was read from (the state `get_state()`
gave right after the previous batch, exactly what the loop saved before look-ahead existed), so a
checkpoint taken while batches are queued still resumes at the first unconsumed one. A step of a
new stage is read by a new iterator of that stage's shape, continuing from the state after the
previous stage's last batch (`set_state`), read ahead or not, as the loop always did at a boundary.
"""

from __future__ import annotations

import collections
import copy
from typing import Any, Callable

from dsv4_jax.train import curriculum


class BatchStream:
  """open_iterator(plan) -> a fresh data iterator (get_state / set_state) for the stage `plan`."""

  def __init__(self, open_iterator: Callable[[curriculum.StagePlan], Any], plans: list[curriculum.StagePlan],
               step: int, data_state: dict | None):
    self._open = open_iterator
    self._plans = plans
    self._iterator = None
    self.reset(step, data_state)

  @property
  def step(self) -> int:
    """The global step whose batch `next()` returns."""
    return self._step

  def reset(self, step: int, data_state: dict | None) -> None:
    """Continue with the batch of global `step` read from `data_state` (None: the start of the data)."""
    self._close()
    self._step = step
    self._state = copy.deepcopy(data_state)
    self._queue: collections.deque = collections.deque()   # (state it was read from, batch), steps step, ...

  def position(self) -> dict | None:
    """The iterator state the current step's batch is read from (None before anything was read)."""
    return copy.deepcopy(self._queue[0][0] if self._queue else self._state)

  def peek(self, ahead: int = 0) -> dict:
    """The batch of step + ahead (reading ahead as needed)."""
    while len(self._queue) <= ahead:
      self._read()
    return self._queue[ahead][1]

  def next(self) -> dict:
    """The batch of the current step; the stream moves to the next step."""
    batch = self.peek(0)
    self._queue.popleft()
    self._step += 1
    return batch

  def close(self) -> None:
    self._close()

  def _read(self) -> None:
    step = self._step + len(self._queue)
    plan = curriculum.stage_at(self._plans, step)
    if plan is None:
      raise IndexError(f"batch stream: step {step} is past the end of the curriculum")
    if self._iterator is None or self._plan_index != plan.index:
      self._close()
      self._iterator, self._plan_index = self._open(plan), plan.index
      if self._state is not None:
        self._iterator.set_state(self._state)
      else:
        self._state = copy.deepcopy(self._iterator.get_state())
    before = self._state
    batch = next(self._iterator)
    self._state = copy.deepcopy(self._iterator.get_state())
    self._queue.append((before, batch))

  def _close(self) -> None:
    if self._iterator is not None and hasattr(self._iterator, "close"):
      self._iterator.close()
    self._iterator, self._plan_index = None, None
