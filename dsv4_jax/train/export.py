"""A training run -> the model of one of its checkpoints (behind `dsv4 export` and `dsv4 generate
--checkpoint RUN_DIR`).

`load_run_model` reads `<run_dir>/config.json` (the TrainConfig as `dataclasses.asdict` writes it),
builds the initial train state of that config as the restore target and restores the parameters and
the non-Param state (router biases, hash tables) of the newest checkpoint that restores, or of the
given step. The run directory is only read (`restore_latest(set_aside=False)`): an unreadable newer
checkpoint is reported and skipped, never moved aside.

`export_run` writes that model in the released layout. This unit may not import `convert`, so the
writer (`dsv4_jax.convert.save_checkpoint`) is passed in by the caller (cli.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from typing import Any, Callable, Mapping

from dsv4_jax.config import ConfigError, TrainConfig
from dsv4_jax.train.checkpoint import CHECKPOINTS, RunDirectoryError, checkpoint_steps

CONFIG_FILE = "config.json"


def is_run_dir(path: str | os.PathLike) -> bool:
  """Whether `path` is a training run directory: checkpoints/ and a config.json with a `model` section
  (a hub checkpoint's config.json has none)."""
  path = os.fspath(path)
  if not os.path.isdir(os.path.join(path, CHECKPOINTS)):
    return False
  try:
    with open(os.path.join(path, CONFIG_FILE)) as f:
      raw = json.load(f)
  except (OSError, ValueError):
    return False
  return isinstance(raw, dict) and isinstance(raw.get("model"), dict)


def train_config_from_json(raw: Mapping[str, Any], source: str = CONFIG_FILE) -> TrainConfig:
  """The TrainConfig of a run's config.json (the flat `dataclasses.asdict` layout) -> TrainConfig.

  Converted to the YAML layout (model, data, optimizer, curriculum, stability, mesh, train) and built with
  `TrainConfig.from_dict`, which checks every key and value again.
  """
  if not isinstance(raw, Mapping):
    raise ConfigError(f"{source}: expected a JSON object (the run's TrainConfig)")
  sections = ("model", "data", "optimizer", "curriculum")
  missing = [s for s in sections if s not in raw]
  if missing:
    raise ConfigError(f"{source}: not a training run config (missing {missing})")
  optimizer = dict(raw["optimizer"] or {})
  optimizer.pop("total_steps", None)   # derived from the curriculum by from_dict
  nested = sections + ("stability", "mesh")   # stability, mesh: absent from runs written before they existed
  try:
    return TrainConfig.from_dict({
        "model": raw["model"], "data": raw["data"], "optimizer": optimizer, "curriculum": raw["curriculum"],
        "stability": raw.get("stability"), "mesh": raw.get("mesh"),
        "train": {k: v for k, v in raw.items() if k not in nested}})
  except ConfigError as e:
    raise ConfigError(f"{source}: {e}") from None


def read_run_config(run_dir: str | os.PathLike) -> TrainConfig:
  path = os.path.join(os.fspath(run_dir), CONFIG_FILE)
  if not os.path.isfile(path):
    raise FileNotFoundError(f"{path}: no such file (a training run directory holds the config.json "
                            f"that `dsv4 train` writes)")
  with open(path) as f:
    try:
      raw = json.load(f)
    except ValueError as e:
      raise ConfigError(f"{path}: not valid JSON ({e})") from None
  return train_config_from_json(raw, path)


def load_run_model(run_dir: str | os.PathLike, step: int | None = None, *, dtype: str | None = None,
                   log=print):
  """-> (model, step, cfg): the Transformer of checkpoint `step` (default: the newest that restores).

  dtype: "float32" / "bfloat16" to cast the parameters and compute to (default: as trained).
  Raises RunDirectoryError (a CheckpointRestoreError) for a directory without checkpoints or
  without the step asked for, CheckpointRestoreError when no checkpoint restores.
  """
  from flax import nnx

  from dsv4_jax.train.checkpoint import TrainCheckpointer
  from dsv4_jax.train.loop import init_state

  run_dir = os.fspath(run_dir)
  if not os.path.isdir(run_dir):
    raise FileNotFoundError(f"{run_dir}: no such run directory")
  ckpt_dir = os.path.join(run_dir, CHECKPOINTS)
  steps = checkpoint_steps(ckpt_dir)
  if not steps:
    raise RunDirectoryError(f"{run_dir}: no checkpoint (nothing under {ckpt_dir}); is this a training run "
                            f"directory (train.run_dir)?")
  if step is not None and step not in steps:
    raise RunDirectoryError(f"{run_dir}: no checkpoint at step {step} (checkpoints at steps {steps})")
  cfg = read_run_config(run_dir)
  graphdef, target, _ = init_state(cfg)
  ckpt = TrainCheckpointer(ckpt_dir, keep=max(len(steps), 1), save_every=0)
  try:
    if step is not None:
      state, _, _ = ckpt.restore(step, target)
    else:
      found = ckpt.restore_latest(target, set_aside=False, log=log)
      if found is None:
        raise RunDirectoryError(f"{run_dir}: no finalized checkpoint under {ckpt_dir}")
      step, state, _, _ = found
  finally:
    ckpt.close()
  model = nnx.merge(graphdef, state.params, state.extra)
  if dtype is not None and (dtype != cfg.model.dtype or dtype != cfg.model.param_dtype):
    model = _cast(model, dataclasses.replace(cfg.model, dtype=dtype, param_dtype=dtype))
  return model, step, cfg


def _cast(model, model_cfg):
  """`model` rebuilt with `model_cfg` (other dtypes), its values cast to the new variables' dtypes."""
  import jax.numpy as jnp
  from flax import nnx

  from dsv4_jax.layers.model import Transformer

  graphdef, abstract = nnx.split(nnx.eval_shape(lambda: Transformer(model_cfg, rngs=nnx.Rngs(0))))
  values = dict(nnx.to_flat_state(nnx.state(model)))
  flat = [(p, var.replace(jnp.asarray(values[p][...], var.value.dtype))) for p, var in nnx.to_flat_state(abstract)]
  return nnx.merge(graphdef, nnx.from_flat_state(flat))


def check_output_dir(out_dir: str | os.PathLike, *, overwrite: bool) -> None:
  """Refuses (FileExistsError) an output directory that exists and is not empty, unless `overwrite`
  (it is then emptied); refuses a path that is a file."""
  out_dir = os.fspath(out_dir)
  if os.path.exists(out_dir) and not os.path.isdir(out_dir):
    raise NotADirectoryError(f"{out_dir}: exists and is not a directory")
  if os.path.isdir(out_dir) and os.listdir(out_dir):
    if not overwrite:
      raise FileExistsError(f"{out_dir}: exists and is not empty; nothing was written (use --overwrite to "
                            f"replace its contents, or another directory)")
    shutil.rmtree(out_dir)


def copy_tokenizer(cfg: TrainConfig, out_dir: str | os.PathLike) -> str | None:
  """Copies the run's tokenizer.json (data.tokenizer a path) to OUT/tokenizer.json; -> the copy, or
  None for the byte tokenizer (generate falls back to bytes when a checkpoint has no tokenizer.json)."""
  source = cfg.data.tokenizer
  if source == "byte":
    return None
  if os.path.isdir(source):
    source = os.path.join(source, "tokenizer.json")
  if not os.path.isfile(source):
    raise FileNotFoundError(f"{source}: the run's tokenizer (data.tokenizer) not found; nothing to copy")
  target = os.path.join(os.fspath(out_dir), "tokenizer.json")
  shutil.copyfile(source, target)
  return target


def export_run(run_dir: str | os.PathLike, out_dir: str | os.PathLike, step: int | None = None, *,
               save: Callable[[Any, str], None], overwrite: bool = False, log=print) -> int:
  """Writes the model of checkpoint `step` (default: the latest) of `run_dir` to `out_dir` with
  `save(model, out_dir)` (dsv4_jax.convert.save_checkpoint), plus its tokenizer.json; -> the step.

  The output directory is checked before anything is restored, and written only once the model is.
  """
  out_dir = os.fspath(out_dir)
  if not overwrite:
    check_output_dir(out_dir, overwrite=False)   # refuse before restoring anything
  model, step, cfg = load_run_model(run_dir, step, log=log)
  check_output_dir(out_dir, overwrite=overwrite)   # emptied only once the model restored
  os.makedirs(out_dir, exist_ok=True)
  save(model, out_dir)
  copy_tokenizer(cfg, out_dir)
  return step
