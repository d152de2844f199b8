"""Training checkpoints with Orbax: params, optimizer state, step, router biases, data iterator
state and curriculum position, saved asynchronously every N steps, keeping the last K.

Layout under `<run_dir>/checkpoints/<step>/`: `state` (the TrainState pytree), `data` (the Grain
iterator state, JSON) and `meta` (curriculum position, config fingerprint, JSON).
"""

from __future__ import annotations

import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointRestoreError(RuntimeError):
  """A checkpoint exists but cannot be restored into the current training state."""


class TrainCheckpointer:

  def __init__(self, directory: str, *, keep: int, save_every: int):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1,
                                           enable_async_checkpointing=True, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)
    self.save_every = save_every

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def save(self, step: int, state, data_state: dict, meta: dict, *, force: bool = False) -> bool:
    """Starts an asynchronous save at `step` (every `save_every` steps, or when forced)."""
    if not force and (self.save_every <= 0 or step % self.save_every):
      return False
    if step in self.manager.all_steps():
      return False
    return self.manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, target) -> tuple[Any, dict, dict]:
    """Restores (state, data_state, meta) at `step` into the structure/shardings of `target`.

    Raises CheckpointRestoreError naming missing items and mismatched shapes.
    """
    path = os.path.join(self.directory, str(step))
    missing = [item for item in ("state", "data", "meta") if not os.path.exists(os.path.join(path, item))]
    if missing:
      raise CheckpointRestoreError(f"checkpoint {path}: missing item(s) {missing}")
    stored = self.manager.item_metadata(step)["state"]
    self._check_shapes(stored, target, path)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax reports structure mismatches in many forms: name the checkpoint.
      raise CheckpointRestoreError(f"checkpoint {path}: cannot restore into the current model/optimizer "
                                   f"({type(e).__name__}: {e})") from e
    return restored["state"], restored["data"], restored["meta"]

  @staticmethod
  def _check_shapes(stored, target, path: str) -> None:
    stored_flat = {jax.tree_util.keystr(k): v for k, v in jax.tree_util.tree_flatten_with_path(stored)[0]}
    problems = []
    for key, leaf in jax.tree_util.tree_flatten_with_path(target)[0]:
      name = jax.tree_util.keystr(key)
      if name not in stored_flat:
        problems.append(f"missing {name}")
        continue
      shape = tuple(getattr(stored_flat[name], "shape", ()) or ())
      if shape != tuple(np.shape(leaf)):
        problems.append(f"{name}: checkpoint has shape {shape}, the model expects {tuple(np.shape(leaf))}")
    if problems:
      raise CheckpointRestoreError(f"checkpoint {path} does not match the current model/optimizer:\n  "
                                   + "\n  ".join(problems[:20]))

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
