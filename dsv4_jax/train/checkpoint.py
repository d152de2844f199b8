"""Training checkpoints with Orbax: params, optimizer state, step, router biases, data iterator
state and curriculum position, saved asynchronously every N steps, keeping the last K.

Layout under `<run_dir>/checkpoints/<step>/`: `state` (the TrainState pytree), `data` (the Grain
iterator state, JSON), `meta` (curriculum position, config fingerprint, the loss-spike controller's
state, JSON) and, only while anticipatory routing is active, `routing` (its stored routing indices,
arrays named by step).

A run directory holds one run: `prepare_run_directory` refuses to start a fresh run over an old one
(RunDirectoryError) unless told to overwrite it (`clear_run`), and `TrainCheckpointer.restore_latest` falls back
from a corrupt or partial checkpoint to the newest one that restores, saying so.
"""

from __future__ import annotations

import os
import shutil
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp


class CheckpointRestoreError(RuntimeError):
  """A checkpoint exists but cannot be restored into the current training state."""


class CheckpointMismatchError(CheckpointRestoreError):
  """A checkpoint is readable but does not fit the current model/optimizer (a config change, not damage)."""


class RunDirectoryError(CheckpointRestoreError):
  """The run directory does not hold what was asked for: a fresh run over an existing run, `--resume`
  with no checkpoint, or checkpoints written with a different config."""


CHECKPOINTS = "checkpoints"
ROUTING = "routing"   # the optional item of stored anticipatory-routing indices
UNUSABLE = "unusable_checkpoints"   # corrupt checkpoints set aside by restore_latest
# What a run writes into its directory (curves.png: `dsv4 plot` of its metrics); --overwrite removes these.
RUN_FILES = (CHECKPOINTS, UNUSABLE, "metrics.jsonl", "tb", "config.json", "curves.png")


def checkpoint_steps(directory: str) -> list[int]:
  """Steps of the finalized checkpoints under `directory` (Orbax's step directories), ascending."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def existing_run(run_dir: str) -> list[str]:
  """What in `run_dir` belongs to a run ([] when it holds none): non-empty checkpoints/ and metrics.jsonl.

  An empty metrics.jsonl / checkpoints/ (a run that failed before its first step) is not a run.
  """
  found = []
  ckpt_dir = os.path.join(run_dir, CHECKPOINTS)
  if os.path.isdir(ckpt_dir) and os.listdir(ckpt_dir):
    steps = checkpoint_steps(ckpt_dir)
    found.append(f"checkpoints at steps {steps}" if steps else f"{ckpt_dir} (no complete checkpoint)")
  metrics = os.path.join(run_dir, "metrics.jsonl")
  if os.path.isfile(metrics) and os.path.getsize(metrics) > 0:
    with open(metrics, "rb") as f:
      found.append(f"metrics.jsonl with {sum(1 for line in f if line.strip())} records")
  return found


def prepare_run_directory(run_dir: str, *, resume: bool | str, overwrite: bool, log=print) -> bool:
  """Checks `run_dir` against what was asked, changing nothing; -> whether to restore a checkpoint.

  resume False: a fresh run; a directory that already holds a run is refused (RunDirectoryError)
    unless `overwrite` (the caller then deletes that run with `clear_run`).
  resume True: there must be a checkpoint. resume "auto": restore if there is one, else start a
    fresh run (refused like resume=False if the directory holds a run without a checkpoint).
  """
  if overwrite and resume:
    raise RunDirectoryError("--overwrite starts a new run and --resume continues the old one: use one of them")
  ckpt_dir = os.path.join(run_dir, CHECKPOINTS)
  if resume and checkpoint_steps(ckpt_dir):
    return True
  found = existing_run(run_dir)
  if resume is True:
    raise RunDirectoryError(
        f"--resume: no checkpoint in {ckpt_dir}" + (f" (the directory holds {', '.join(found)})" if found else "")
        + "; run without --resume to start a new run, or with --resume=auto to resume when there is a "
          "checkpoint and start a new run otherwise")
  if found and not overwrite:
    raise RunDirectoryError(
        f"run directory {run_dir} already holds a run ({', '.join(found)}); nothing was changed. "
        f"Continue it with --resume, start over with --overwrite (deletes its checkpoints, metrics.jsonl, "
        f"tb/ and config.json), or use another directory (--set train.run_dir=...)")
  if resume:
    log(f"--resume=auto: no checkpoint in {ckpt_dir}; starting a new run")
  return False


def clear_run(run_dir: str, log=print) -> None:
  """Deletes what a run wrote into `run_dir` (RUN_FILES; other files stay), saying what."""
  removed = []
  for name in RUN_FILES:
    path = os.path.join(run_dir, name)
    if os.path.isdir(path) and not os.path.islink(path):
      shutil.rmtree(path)
    elif os.path.lexists(path):
      os.remove(path)
    else:
      continue
    removed.append(name)
  if removed:
    log(f"--overwrite: removed the previous run's {', '.join(removed)} from {run_dir}")


def _describe(error: BaseException, limit: int = 400) -> str:
  """The root cause of an Orbax / TensorStore error in one line (they nest a generic wrapper around
  the useful message, e.g. 'OUT_OF_RANGE: Error reading ... Requested byte range ... not valid')."""
  seen = []
  while error is not None and error not in seen:
    seen.append(error)
    error = error.__cause__ or error.__context__
  root = seen[-1]
  text = (str(root).strip().splitlines() or [""])[0].split(" [tensorstore_spec=")[0]
  text = f"{type(root).__name__}: {text}" if text else type(root).__name__
  return text if len(text) <= limit else text[:limit] + "..."


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
                "meta": ocp.JsonCheckpointHandler(), ROUTING: ocp.StandardCheckpointHandler()}
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=handlers)
    self.save_every = save_every

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def step_path(self, step: int) -> str:
    return os.path.join(self.directory, str(step))

  def due(self, step: int, force: bool = False) -> bool:
    """Whether `save(step, force=force)` would write a checkpoint (every `save_every` steps, or when forced,
    unless there is one at `step`)."""
    if not force and (self.save_every <= 0 or step % self.save_every):
      return False
    return step not in self.manager.all_steps()

  def save(self, step: int, state, data_state: dict, meta: dict, *, force: bool = False,
           arrays: dict[str, Any] | None = None) -> bool:
    """Starts an asynchronous save at `step` when one is due (`due`).

    arrays: named arrays saved as the optional `routing` item (omitted when empty)."""
    if not self.due(step, force):
      return False
    items = dict(state=ocp.args.StandardSave(flatten_named(state)), data=ocp.args.JsonSave(data_state),
                 meta=ocp.args.JsonSave(meta))
    if arrays:
      items[ROUTING] = ocp.args.StandardSave(dict(arrays))
    return self.manager.save(step, args=ocp.args.Composite(**items), force=True)

  def delete_after(self, step: int, log=print) -> list[int]:
    """Deletes the checkpoints of steps after `step` (a rollback abandoned them); -> their steps."""
    self.manager.wait_until_finished()
    later = [s for s in self.manager.all_steps() if s > step]
    for s in later:
      self.manager.delete(s)
    if later:
      log(f"[checkpoint] deleted the checkpoint(s) of step(s) {sorted(later)}, after the rollback to step {step}")
    return later

  def restore(self, step: int, target, *, with_arrays: bool = False) -> tuple[Any, dict, dict]:
    """Restores (state, data_state, meta) at `step` into the structure/shardings of `target`
    (with_arrays: (state, data_state, meta, the `routing` arrays or {})).

    Raises CheckpointMismatchError naming mismatched shapes / missing arrays, CheckpointRestoreError
    naming the checkpoint and what failed (missing items, unreadable or truncated files).
    """
    path = self.step_path(step)
    missing = [item for item in ("state", "data", "meta") if not os.path.exists(os.path.join(path, item))]
    if missing:
      raise CheckpointRestoreError(f"checkpoint {path}: missing item(s) {missing}")
    target_named = flatten_named(target)
    try:
      stored = self.manager.item_metadata(step)["state"]
    except Exception as e:
      raise CheckpointRestoreError(f"checkpoint {path}: cannot read the metadata of its state "
                                   f"({_describe(e)})") from e
    if not stored:
      raise CheckpointRestoreError(f"checkpoint {path}: the metadata of its state is missing (state/_METADATA)")
    self._check_shapes(stored, target_named, path)
    abstract = {k: ocp.utils.to_shape_dtype_struct(v) for k, v in target_named.items()}
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract), data=ocp.args.JsonRestore(), meta=ocp.args.JsonRestore()))
    except Exception as e:  # shapes match: a damaged file (truncated, missing) or a dtype/structure change
      raise CheckpointRestoreError(f"checkpoint {path}: restoring failed ({_describe(e)})") from e
    if not isinstance(restored["data"], dict) or not isinstance(restored["meta"], dict):
      raise CheckpointRestoreError(f"checkpoint {path}: its data or meta item is not a JSON object")
    state = unflatten_named(restored["state"], target)
    if not with_arrays:
      return state, restored["data"], restored["meta"]
    return state, restored["data"], restored["meta"], self._restore_arrays(step, path)

  def _restore_arrays(self, step: int, path: str) -> dict[str, Any]:
    if not os.path.exists(os.path.join(path, ROUTING)):
      return {}
    try:
      stored = self.manager.item_metadata(step)[ROUTING]
      abstract = {k: ocp.utils.to_shape_dtype_struct(v) for k, v in stored.items()}
      return dict(self.manager.restore(step, args=ocp.args.Composite(
          **{ROUTING: ocp.args.StandardRestore(abstract)}))[ROUTING])
    except Exception as e:
      raise CheckpointRestoreError(f"checkpoint {path}: restoring its {ROUTING} item failed ({_describe(e)})") from e

  def restore_latest(self, target, *, check: Callable[[dict], None] | None = None, set_aside: bool = True,
                     log=print, with_arrays: bool = False) -> tuple[int, Any, dict, dict] | None:
    """(step, state, data_state, meta) of the newest checkpoint that restores; None if there is none
    (with_arrays: the `routing` arrays, or {}, follow meta).

    A checkpoint that cannot be read (truncated or missing files) is reported by name and the next
    older one is tried; once one restores (and `check(meta)` accepts it), the unusable newer ones are
    moved to `<run_dir>/unusable_checkpoints/` so that the resumed run can save those steps again
    (`set_aside=False` only reads the directory: they are reported and skipped).
    CheckpointMismatchError (the model/optimizer changed) is raised at once; if no checkpoint
    restores, CheckpointRestoreError names each one tried and why.
    """
    failed = []
    for step in sorted(self.manager.all_steps(), reverse=True):
      try:
        restored = self.restore(step, target, with_arrays=with_arrays)
      except CheckpointMismatchError:
        raise
      except CheckpointRestoreError as e:
        failed.append((step, str(e)))
        log(f"[checkpoint] step {step} is unusable: {e}")
        continue
      meta = restored[2]
      if check is not None:
        check(meta)
      if failed:
        verb = "resuming from" if set_aside else "using"
        log(f"[checkpoint] {verb} step {step}, the newest checkpoint that restores "
            f"(not from step(s) {[s for s, _ in failed]})")
        if set_aside:
          self._set_aside([s for s, _ in failed], log)
      return (step, *restored)
    if failed:
      raise CheckpointRestoreError(f"no checkpoint in {self.directory} can be restored (newest first):\n  "
                                   + ";\n  ".join(f"step {s}: {message}" for s, message in failed))
    return None

  def _set_aside(self, steps: list[int], log) -> None:
    aside = os.path.join(os.path.dirname(self.directory), UNUSABLE)
    os.makedirs(aside, exist_ok=True)
    for step in steps:
      target, n = os.path.join(aside, str(step)), 1
      while os.path.exists(target):
        target, n = os.path.join(aside, f"{step}.{n}"), n + 1
      os.rename(self.step_path(step), target)
      log(f"[checkpoint] moved the unusable checkpoint {self.step_path(step)} to {target}")
    self.manager.reload()

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
      raise CheckpointMismatchError(f"checkpoint {path} does not match the current model/optimizer:\n  "
                                   + "\n  ".join(problems[:20]))

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()
