"""Training configuration: the curriculum stages and TrainConfig, the whole `dsv4 train` YAML file."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, Mapping

import yaml

from dsv4_jax.config.data import DataConfig
from dsv4_jax.config.errors import ConfigError, check_keys, check_value, field_types, from_mapping, parse_text
from dsv4_jax.config.mesh import MeshConfig
from dsv4_jax.config.model import ModelConfig
from dsv4_jax.config.optimizer import OptimizerConfig
from dsv4_jax.config.stability import StabilityConfig

ATTENTION_MODES = ("dense", "sparse")


@dataclasses.dataclass(frozen=True)
class CurriculumStage:
  """One stage of the sequence-length curriculum.

  Length is `steps`, or `tokens` (converted with the stage's batch: steps = tokens // (batch·seq_len)).
  attention: "dense" (CSA attends every visible compressed entry) or "sparse" (indexer top-k).
  indexer_warmup_steps: at the start of the stage, steps that train only the indexer (dense
    attention, KL loss only, the rest of the model frozen) before the stage's own steps.
  train_indexer: add the indexer KL loss (default: True for sparse stages).
  batch_size: rows per batch; default tokens_per_batch // seq_len (constant tokens per batch).
  """
  seq_len: int
  steps: int | None = None
  tokens: int | None = None
  attention: str = "dense"
  indexer_warmup_steps: int = 0
  train_indexer: bool | None = None
  batch_size: int | None = None
  name: str = ""

  def __post_init__(self):
    label = self.name or f"seq_len {self.seq_len}"
    if (self.steps is None) == (self.tokens is None):
      raise ConfigError(f"curriculum stage {label}: give exactly one of steps or tokens")
    if self.attention not in ATTENTION_MODES:
      raise ConfigError(f"curriculum stage {label}: attention must be one of {ATTENTION_MODES}, "
                        f"got {self.attention!r}")
    if self.seq_len < 1 or self.indexer_warmup_steps < 0:
      raise ConfigError(f"curriculum stage {label}: seq_len must be positive and indexer_warmup_steps >= 0")
    if self.train_indexer is None:
      object.__setattr__(self, "train_indexer", self.attention == "sparse")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything `dsv4 train` needs. `optimizer.total_steps` is derived from the curriculum.

  eval_every: steps between validations (also at the end of the run; 0 = never).
  eval_tokens: held-out tokens per validation: a fixed random sample of packed rows of the
    validation split at the current stage's seq_len (`validation_sample`).
  stability: loss-spike detection, rollback and anticipatory routing (its own YAML section).
  mesh: the device mesh (its own YAML section; default: data parallel over every device).
  """
  model: ModelConfig
  data: DataConfig
  optimizer: OptimizerConfig
  curriculum: tuple[CurriculumStage, ...]
  stability: StabilityConfig = StabilityConfig()
  mesh: MeshConfig = MeshConfig()
  tokens_per_batch: int = 8192
  seed: int = 0
  run_dir: str = "runs/tiny"
  mtp_loss_weight: float = 0.3
  mtp_loss_weight_after_decay: float = 0.1
  balance_loss_weight: float = 1e-4
  indexer_loss_weight: float = 1.0
  router_bias_speed: float = 1e-3
  log_every: int = 10
  eval_every: int = 200
  eval_tokens: int = 32768
  checkpoint_every: int = 200
  keep_checkpoints: int = 3

  def stage_batch_size(self, stage: CurriculumStage) -> int:
    return stage.batch_size or max(1, self.tokens_per_batch // stage.seq_len)

  def stage_steps(self, stage: CurriculumStage) -> int:
    """Steps of the stage, its indexer warm-up included."""
    if stage.steps is not None:
      return stage.steps + stage.indexer_warmup_steps
    return stage.tokens // (self.stage_batch_size(stage) * stage.seq_len) + stage.indexer_warmup_steps

  @property
  def total_steps(self) -> int:
    return sum(self.stage_steps(s) for s in self.curriculum)

  @classmethod
  def from_dict(cls, raw: Mapping[str, Any]) -> "TrainConfig":
    """Builds from the YAML layout: sections model, data, optimizer, curriculum (a list), train, stability,
    mesh.

    `optimizer.total_steps` is always derived from the curriculum.
    """
    if not isinstance(raw, Mapping):
      raise ConfigError(f"expected a mapping of config sections, got {type(raw).__name__}")
    known = {"model", "data", "optimizer", "curriculum", "train", "stability", "mesh"}
    unknown = sorted(str(k) for k in set(raw) - known)
    if unknown:
      raise ConfigError(f"unknown config sections {unknown}; expected some of {sorted(known)}")
    if raw.get("model") is None:
      raise ConfigError("model: missing section (the model config keys)")
    if not raw.get("curriculum") or not isinstance(raw["curriculum"], (list, tuple)):
      raise ConfigError("curriculum: expected a list of at least one stage")

    stages = tuple(from_mapping(CurriculumStage, s, f"curriculum[{i}]") for i, s in enumerate(raw["curriculum"]))
    # The optimizer's total_steps depends on the train section (tokens_per_batch): build with the
    # default optimizer first, then replace it.
    cfg = from_mapping(cls, raw.get("train"), "train", model=from_mapping(ModelConfig, raw["model"], "model"),
                       data=from_mapping(DataConfig, raw.get("data"), "data"), optimizer=OptimizerConfig(),
                       curriculum=stages,
                       stability=from_mapping(StabilityConfig, raw.get("stability"), "stability"),
                       mesh=from_mapping(MeshConfig, raw.get("mesh"), "mesh"))
    for name in ("tokens_per_batch", "eval_tokens", "log_every"):
      if getattr(cfg, name) < 1:
        raise ConfigError(f"train.{name}: expected a positive integer, got {getattr(cfg, name)}")
    for stage in stages:
      if stage.seq_len % cfg.data.align:
        raise ConfigError(f"curriculum: seq_len {stage.seq_len} is not a multiple of data.align {cfg.data.align}")
    optimizer = from_mapping(OptimizerConfig, raw.get("optimizer"), "optimizer", total_steps=cfg.total_steps)
    return dataclasses.replace(cfg, optimizer=optimizer)

  @classmethod
  def from_yaml(cls, path: str | os.PathLike, overrides: Mapping[str, Any] | None = None) -> "TrainConfig":
    """Loads a YAML file; `overrides` maps dotted keys ("optimizer.learning_rate", "curriculum.0.steps",
    "train.log_every") to `--set` texts, parsed against the type of the field they name ("1e-3" is a
    float for a float field), or to values of that type."""
    with open(path) as f:
      raw = yaml.safe_load(f)
    if raw is None:
      raw = {}
    if not isinstance(raw, dict):
      raise ConfigError(f"{path}: expected a mapping of config sections (model, data, optimizer, curriculum, "
                        f"train, stability, mesh), got {type(raw).__name__}")
    for key, value in (overrides or {}).items():
      _set_dotted(raw, key, value)
    return cls.from_dict(raw)


def _sections() -> dict[str, tuple[type, tuple[str, ...]]]:
  """Override section -> (its dataclass, the fields it may not set: they come from elsewhere)."""
  return {"model": (ModelConfig, ()), "data": (DataConfig, ()), "optimizer": (OptimizerConfig, ("total_steps",)),
          "train": (TrainConfig, ("model", "data", "optimizer", "curriculum", "stability", "mesh")),
          "stability": (StabilityConfig, ()), "mesh": (MeshConfig, ())}


def _set_dotted(tree: dict, key: str, value: Any) -> None:
  """Sets the override `key` ("section.field" or "curriculum.INDEX.field") in the raw YAML `tree`.

  A text `value` is parsed against the declared type of the field (`parse_text`), anything else is
  checked against it (`check_value`). An unknown section or key, an index out of range or a value of the
  wrong type is a ConfigError that starts with "--set key=value".
  """
  label = f"--set {key}={value}" if isinstance(value, str) else f"--set {key}"
  parts = key.split(".")
  sections = _sections()
  section = parts[0]
  if section == "curriculum":
    if len(parts) != 3 or not parts[1].isdigit():
      raise ConfigError(f"{label}: expected curriculum.INDEX.KEY, e.g. curriculum.0.steps")
    stages = tree.get("curriculum")
    if not isinstance(stages, list):
      raise ConfigError(f"{label}: the config file has no curriculum list")
    index = int(parts[1])
    if index >= len(stages):
      raise ConfigError(f"{label}: index {index} is out of range: the curriculum has {len(stages)} "
                        f"stage{'s' if len(stages) != 1 else ''} (0..{len(stages) - 1})")
    node, cls, fixed, where = stages[index], CurriculumStage, (), f"curriculum[{index}]"
    if not isinstance(node, dict):
      raise ConfigError(f"{label}: {where}: expected a mapping of config keys, got {type(node).__name__}")
  elif section in sections:
    if len(parts) != 2:
      raise ConfigError(f"{label}: expected {section}.KEY")
    cls, fixed = sections[section]
    where = section
    if tree.get(section) is None:
      tree[section] = {}
    node = tree[section]
    if not isinstance(node, dict):
      raise ConfigError(f"{label}: {section}: expected a mapping of config keys, got {type(node).__name__}")
  else:
    raise ConfigError(f"{label}: unknown config section {section!r}; expected one of "
                      f"{sorted([*sections, 'curriculum'])}")
  field = parts[-1]
  check_keys(cls, [field], where, fixed, context=label)
  tp = field_types(cls)[field]
  node[field] = parse_text(value, tp, label) if isinstance(value, str) else check_value(value, tp, label)
