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


def _key_name(entry) -> str:
  for attr in ("key", "idx", "name"):
    if hasattr(entry, attr):
      return str(getattr(entry, attr))
  return str(entry)


def flatten_named(tree) -> dict[str, Any]:
  """A pytree -> {"params.layers.0.attn.wq_a.weight.value": leaf, ...} (stable, readable names)."""
  return {".".join(_key_name(k) for k in path): leaf
          for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}


def unflatten_named(named: dict[str, Any], target):
  """Inverse of flatten_named, into the structure of `target`."""
  paths, treedef = jax.tree_util.tree_flatten_with_path(target)
  return jax.tree_util.tree_unflatten(treedef, [named[".".join(_key_name(k) for k in p)] for p, _ in paths])


class TrainCheckpointer:

  def __init__(self, directory: str, *, keep: int, save_every: int):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, save_interval_steps=1,
                                           enable_async_checkpointing=True, create=True)
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
                "meta": ocp.JsonCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
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
        state=ocp.args.StandardSave(flatten_named(state)), data=ocp.args.JsonSave(data_state),
        meta=ocp.args.JsonSave(meta)), force=True)

  def restore(self, step: int, target) -> tuple[Any, dict, dict]:
    """Restores (state, data_state, meta) at `step` into the structure/shardings of `target`.

    Raises CheckpointRestoreError naming missing items and mismatched shapes.
    """
    path = os.path.join(self.directory, str(step))
    missing = [item for item in ("state", "data", "meta") if not os.path.exists(os.path.join(path, item))]
    if missing:
      raise CheckpointRestoreError(f"checkpoint {path}: missing item(s) {missing}")
    target_named = flatten_named(target)
    self._check_shapes(self.manager.item_metadata(step)["state"], target_named, path)
    abstract = {k: ocp.utils.to_shape_dtype_struct(v) for k, v in target_named.items()}
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    except Exception as e:  # Orbax reports structure mismatches in many forms: name the checkpoint.
      raise CheckpointRestoreError(f"checkpoint {path}: cannot restore into the current model/optimizer "
                                   f"({type(e).__name__}: {e})") from e
    return unflatten_named(restored["state"], target), restored["data"], restored["meta"]

  @staticmethod
  def _check_shapes(stored: dict, target: dict, path: str) -> None:
    problems = []
    for name, leaf in target.items():
      if name not in stored:
        problems.append(f"missing {name}")
        continue
      shape = tuple(getattr(stored[name], "shape", ()) or ())
      if shape != tuple(np.shape(leaf)):
        problems.append(f"{name}: checkpoint has shape {shape}, the model expects {tuple(np.shape(leaf))}")
    if problems:
      raise CheckpointRestoreError(f"checkpoint {path} does not match the current model/optimizer:\n  "
                                   + "\n  ".join(problems[:20]))

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
