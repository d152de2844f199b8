"""Compiling the rest of a run's programs in a background thread while it trains.

Every program a run needs is known from the curriculum up front: one train step per (stage, step
kind) and one evaluation per stage. Compiling them in order on one background thread means that a
stage change finds its step already compiled, instead of stopping for it (on CPU each takes
30–50 s; on the tiny config that is a fifth of the run). Programs are lowered from shapes only
(jax.ShapeDtypeStruct), so the thread never touches the live, donated train state.

The thread is a daemon: a run that stops early (Ctrl-C, max_steps, an error) does not wait for
compilations it no longer needs. Python kills a daemon thread that returns from XLA while the
interpreter finalizes, which aborts the process; `compiling()` tells the `dsv4` entry point to exit
without finalizing then.
"""

from __future__ import annotations

import queue
import threading
from concurrent.futures import Future
from typing import Any, Callable, Hashable

import jax

_compiling = threading.Event()   # set while a CompileAhead thread runs a job


def shapes_of(tree) -> Any:
  """The jax.ShapeDtypeStruct (shape, dtype, sharding, weak type) of every array leaf of `tree`."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding, weak_type=a.weak_type),
                      tree)


class CompileAhead:
  """`submit(key, lower)` queues `lower().compile()`; `get(key)` waits for the compiled program.

  lower: a no-argument callable returning a `jax.stages.Lowered`, e.g.
    `lambda: step.lower(state_shapes, batch_shapes, kind)`.
  Jobs run one at a time in submission order, so submit them in the order the run needs them.
  A job's exception is raised by `get`. `mesh`: the mesh the programs are traced on (`jax.set_mesh`).
  """

  def __init__(self, mesh: jax.sharding.Mesh):
    self.mesh = mesh
    self._futures: dict[Hashable, Future] = {}
    self._jobs: queue.Queue = queue.Queue()
    threading.Thread(target=self._work, name="compile-ahead", daemon=True).start()

  def _work(self) -> None:
    while True:
      future, lower = self._jobs.get()
      if not future.set_running_or_notify_cancel():
        continue
      _compiling.set()
      try:
        with jax.set_mesh(self.mesh):
          lowered = lower()
        future.set_result(lowered.compile())
      except BaseException as error:   # delivered to the caller of get()
        future.set_exception(error)
      finally:
        _compiling.clear()

  def submit(self, key: Hashable, lower: Callable[[], jax.stages.Lowered]) -> None:
    if key not in self._futures:
      self._futures[key] = Future()
      self._jobs.put((self._futures[key], lower))

  def get(self, key: Hashable) -> jax.stages.Compiled:
    if key not in self._futures:
      raise KeyError(f"CompileAhead: nothing was submitted for {key!r}")
    return self._futures[key].result()


def compiling() -> bool:
  """Whether a CompileAhead thread is compiling now (one thread per run, so one job at a time)."""
  return _compiling.is_set()
