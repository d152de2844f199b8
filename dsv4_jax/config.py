"""Model configuration: a frozen dataclass holding every architecture field of DeepSeek-V4.

Loaded from our YAML files (`ModelConfig.from_yaml`) or from a released hub `config.json`
(`ModelConfig.from_hf_config`). Field names follow the hub keys where one exists; the nested
`rope_scaling` dict of the hub config is flattened into the `rope_*` / `yarn_*` fields.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping

import yaml

_SCORING_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")
_KERNELS = ("auto", "pallas", "xla")
_DTYPES = ("float32", "bfloat16", "float16")


class ConfigError(ValueError):
  """A configuration value is missing, unknown or inconsistent."""


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  # Sizes.
  vocab_size: int = 129280
  hidden_size: int = 4096
  num_hidden_layers: int = 43
  num_attention_heads: int = 64
  head_dim: int = 512
  num_key_value_heads: int = 1
  q_lora_rank: int = 1024
  o_groups: int = 8
  o_lora_rank: int = 1024
  # RoPE: interleaved pairs on the last `qk_rope_head_dim` dims. Compressed (CSA/HCA) layers use
  # `compress_rope_theta` with YaRN; sliding-window-only layers use `rope_theta` without YaRN.
  qk_rope_head_dim: int = 64
  rope_theta: float = 10000.0
  compress_rope_theta: float = 160000.0
  yarn_factor: float = 16.0
  yarn_original_max_position: int = 65536
  yarn_beta_fast: float = 32.0
  yarn_beta_slow: float = 1.0
  max_position_embeddings: int = 1048576
  # Hybrid attention.
  sliding_window: int = 128
  compress_ratios: tuple[int, ...] = ()
  index_n_heads: int = 64
  index_head_dim: int = 128
  index_topk: int = 512
  # MoE.
  n_routed_experts: int = 256
  n_shared_experts: int = 1
  num_experts_per_tok: int = 6
  moe_intermediate_size: int = 2048
  num_hash_layers: int = 3
  routed_scaling_factor: float = 1.5
  scoring_func: str = "sqrtsoftplus"
  swiglu_limit: float = 10.0
  # Manifold-constrained hyper-connections.
  hc_mult: int = 4
  hc_sinkhorn_iters: int = 20
  hc_eps: float = 1e-6
  rms_norm_eps: float = 1e-6
  # Multi-token prediction.
  num_nextn_predict_layers: int = 1
  # Implementation choices (not part of the released architecture).
  dtype: str = "float32"  # compute dtype of the matmuls; norms, softmax, router, mHC stay fp32
  param_dtype: str = "float32"
  attention_chunk_size: int = 256  # queries per chunk in CSA/HCA/SWA and the indexer
  kernels: str = "auto"  # auto | pallas | xla
  qat: bool = False  # simulate the released model's FP8 KV / FP4 indexer quantisation
  init_std: float = 0.02

  def __post_init__(self):
    object.__setattr__(self, "compress_ratios", tuple(int(r) for r in self.compress_ratios))
    self.validate()

  # --- derived -------------------------------------------------------------------------------
  @property
  def num_layers_total(self) -> int:
    """Main layers plus MTP layers: the length `compress_ratios` must have."""
    return self.num_hidden_layers + self.num_nextn_predict_layers

  @property
  def mix_hc(self) -> int:
    """Width of the mHC mixing vector: n pre + n post + n*n comb entries."""
    return (2 + self.hc_mult) * self.hc_mult

  def layer_ratio(self, layer: int) -> int:
    return self.compress_ratios[layer]

  # --- validation ----------------------------------------------------------------------------
  def validate(self) -> None:
    def need(cond, msg):
      if not cond:
        raise ConfigError(msg)

    for name in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "head_dim",
                 "q_lora_rank", "o_groups", "o_lora_rank", "n_routed_experts", "num_experts_per_tok",
                 "moe_intermediate_size", "hc_mult", "hc_sinkhorn_iters", "attention_chunk_size",
                 "index_n_heads", "index_head_dim", "index_topk", "sliding_window"):
      need(getattr(self, name) > 0, f"{name}: expected a positive integer, got {getattr(self, name)}")
    need(len(self.compress_ratios) == self.num_layers_total,
         f"compress_ratios: expected {self.num_layers_total} entries (num_hidden_layers "
         f"{self.num_hidden_layers} + num_nextn_predict_layers {self.num_nextn_predict_layers}), "
         f"got {len(self.compress_ratios)}")
    for i, r in enumerate(self.compress_ratios):
      need(r == 0 or r > 1, f"compress_ratios[{i}]: expected 0 (window only) or a ratio > 1, got {r}")
    need(self.num_nextn_predict_layers in (0, 1),
         f"num_nextn_predict_layers: expected 0 or 1 (the released models use 1), "
         f"got {self.num_nextn_predict_layers}")
    need(self.num_key_value_heads == 1,
         f"num_key_value_heads: expected 1 (shared-KV MQA), got {self.num_key_value_heads}")
    need(self.num_attention_heads % self.o_groups == 0,
         f"num_attention_heads ({self.num_attention_heads}) must be divisible by o_groups ({self.o_groups})")
    need(self.qk_rope_head_dim % 2 == 0 and 0 < self.qk_rope_head_dim <= self.head_dim,
         f"qk_rope_head_dim: expected an even number in (0, head_dim={self.head_dim}], "
         f"got {self.qk_rope_head_dim}")
    need(self.qk_rope_head_dim <= self.index_head_dim,
         f"qk_rope_head_dim ({self.qk_rope_head_dim}) must not exceed index_head_dim ({self.index_head_dim})")
    need(self.n_shared_experts == 1, f"n_shared_experts: expected 1, got {self.n_shared_experts}")
    need(self.num_experts_per_tok <= self.n_routed_experts,
         f"num_experts_per_tok ({self.num_experts_per_tok}) exceeds n_routed_experts ({self.n_routed_experts})")
    need(0 <= self.num_hash_layers <= self.num_hidden_layers,
         f"num_hash_layers: expected 0..{self.num_hidden_layers}, got {self.num_hash_layers}")
    need(self.scoring_func in _SCORING_FUNCS,
         f"scoring_func: expected one of {_SCORING_FUNCS}, got {self.scoring_func!r}")
    need(self.kernels in _KERNELS, f"kernels: expected one of {_KERNELS}, got {self.kernels!r}")
    need(self.dtype in _DTYPES, f"dtype: expected one of {_DTYPES}, got {self.dtype!r}")
    need(self.param_dtype in _DTYPES, f"param_dtype: expected one of {_DTYPES}, got {self.param_dtype!r}")
    if self.qat:  # FP8 KV sim in blocks of 64 on the non-RoPE dims; Hadamard + FP4 in blocks of 32
      nope = self.head_dim - self.qk_rope_head_dim
      need(nope % 64 == 0, f"qat: head_dim − qk_rope_head_dim ({nope}) must be a multiple of 64 (FP8 blocks)")
      need(self.index_head_dim % 32 == 0 and not self.index_head_dim & (self.index_head_dim - 1),
           f"qat: index_head_dim must be a power of two ≥ 32 (Hadamard, FP4 blocks), got {self.index_head_dim}")

  # --- loading -------------------------------------------------------------------------------
  @classmethod
  def from_dict(cls, values: Mapping[str, Any]) -> "ModelConfig":
    """Builds a config from our own field names; unknown keys are an error."""
    fields = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - fields)
    if unknown:
      raise ConfigError(f"unknown model config keys {unknown}; known keys: {sorted(fields)}")
    return cls(**values)

  @classmethod
  def from_yaml(cls, path: str | os.PathLike) -> "ModelConfig":
    """Loads `configs/*.yaml`: either a flat mapping of fields or one under a `model:` key."""
    with open(path) as f:
      data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
      raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    if "model" in data:
      data = data["model"]
    return cls.from_dict(data)

  @classmethod
  def from_hf_config(cls, path_or_dict: str | os.PathLike | Mapping[str, Any], **overrides) -> "ModelConfig":
    """Builds a config from a released hub `config.json` (a path to the file or its directory, or a dict).

    Hub metadata keys (architectures, torch_dtype, quantization_config, topk_method, ...) are accepted
    and ignored; `overrides` set our implementation fields (dtype, kernels, qat, ...).
    """
    if isinstance(path_or_dict, Mapping):
      hf = dict(path_or_dict)
    else:
      path = os.fspath(path_or_dict)
      if os.path.isdir(path):
        path = os.path.join(path, "config.json")
      with open(path) as f:
        hf = json.load(f)
    values: dict[str, Any] = {}
    fields = {f.name for f in dataclasses.fields(cls)}
    for key, value in hf.items():
      if key in fields:
        values[key] = value
    scaling = hf.get("rope_scaling") or hf.get("rope_parameters") or {}
    if scaling:
      values["yarn_factor"] = scaling.get("factor", cls.yarn_factor)
      values["yarn_original_max_position"] = scaling.get("original_max_position_embeddings",
                                                         cls.yarn_original_max_position)
      values["yarn_beta_fast"] = scaling.get("beta_fast", cls.yarn_beta_fast)
      values["yarn_beta_slow"] = scaling.get("beta_slow", cls.yarn_beta_slow)
    else:
      values["yarn_original_max_position"] = 0  # no YaRN
    if "compress_ratios" not in values:
      raise ConfigError("config.json: missing 'compress_ratios' (one per layer, then one per MTP layer)")
    values.update(overrides)
    return cls.from_dict(values)

  def to_hf_config(self) -> dict[str, Any]:
    """The hub `config.json` dict for this config (what `save_checkpoint` writes)."""
    ours = {"dtype", "param_dtype", "attention_chunk_size", "kernels", "qat", "init_std",
            "yarn_factor", "yarn_original_max_position", "yarn_beta_fast", "yarn_beta_slow"}
    hf = {k: v for k, v in dataclasses.asdict(self).items() if k not in ours}
    hf["compress_ratios"] = list(self.compress_ratios)
    hf.update({
        "architectures": ["DeepseekV4ForCausalLM"],
        "model_type": "deepseek_v4",
        "torch_dtype": "float32" if self.param_dtype == "float32" else "bfloat16",
        "hidden_act": "silu",
        "norm_topk_prob": True,
        "tie_word_embeddings": False,
        "topk_method": "noaux_tc",
        "initializer_range": self.init_std,
    })
    if self.yarn_original_max_position > 0:
      hf["rope_scaling"] = {
          "type": "yarn", "factor": self.yarn_factor,
          "original_max_position_embeddings": self.yarn_original_max_position,
          "beta_fast": self.yarn_beta_fast, "beta_slow": self.yarn_beta_slow,
      }
    return hf

  def replace(self, **changes) -> "ModelConfig":
    return dataclasses.replace(self, **changes)


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
class MeshConfig:
  """Mesh axis sizes; data = -1 takes every device not used by the other axes."""
  data: int = -1
  fsdp: int = 1
  expert: int = 1
  tensor: int = 1
  context: int = 1


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything `dsv4 train` needs. `optimizer.total_steps` is derived from the curriculum.

  eval_every: steps between validations (also at the end of the run; 0 = never).
  eval_tokens: held-out tokens per validation: a fixed random sample of packed rows of the
    validation split at the current stage's seq_len (`validation_sample`).
  """
  model: ModelConfig
  data: Any  # dsv4_jax.data.DataConfig
  optimizer: Any  # dsv4_jax.optim.OptimizerConfig
  curriculum: tuple[CurriculumStage, ...]
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
    """Builds from the YAML layout: sections model, data, optimizer, curriculum (a list), mesh, train."""
    from dsv4_jax.data.config import DataConfig
    from dsv4_jax.optim.config import OptimizerConfig

    known = {"model", "data", "optimizer", "curriculum", "mesh", "train"}
    unknown = sorted(set(raw) - known)
    if unknown:
      raise ConfigError(f"unknown config sections {unknown}; expected some of {sorted(known)}")
    if not raw.get("curriculum"):
      raise ConfigError("curriculum: expected a list of at least one stage")

    def build(kind, values):
      fields = {f.name for f in dataclasses.fields(kind)}
      bad = sorted(set(values or {}) - fields)
      if bad:
        raise ConfigError(f"unknown {kind.__name__} keys {bad}; known keys: {sorted(fields)}")
      return kind(**(values or {}))

    stages = tuple(build(CurriculumStage, s) for s in raw["curriculum"])
    train = dict(raw.get("train") or {})
    shell = dict(model=ModelConfig.from_dict(raw["model"]), data=build(DataConfig, raw.get("data")),
                 optimizer=None, curriculum=stages, mesh=build(MeshConfig, raw.get("mesh")))
    fields = {f.name for f in dataclasses.fields(cls)} - set(shell)
    bad = sorted(set(train) - fields)
    if bad:
      raise ConfigError(f"unknown train keys {bad}; known keys: {sorted(fields)}")
    cfg = cls(**shell, **train)
    optimizer = dict(raw.get("optimizer") or {})
    optimizer["total_steps"] = cfg.total_steps
    cfg = dataclasses.replace(cfg, optimizer=build(OptimizerConfig, optimizer))
    for name in ("tokens_per_batch", "eval_tokens", "log_every"):
      if getattr(cfg, name) < 1:
        raise ConfigError(f"train.{name}: expected a positive integer, got {getattr(cfg, name)}")
    for stage in stages:
      if stage.seq_len % cfg.data.align:
        raise ConfigError(f"curriculum: seq_len {stage.seq_len} is not a multiple of data.align {cfg.data.align}")
    return cfg

  @classmethod
  def from_yaml(cls, path: str | os.PathLike, overrides: Mapping[str, str] | None = None) -> "TrainConfig":
    """Loads a YAML file; `overrides` maps dotted keys ("optimizer.learning_rate", "curriculum.0.steps",
    "train.log_every") to YAML-parsed values."""
    with open(path) as f:
      raw = yaml.safe_load(f) or {}
    for key, value in (overrides or {}).items():
      _set_dotted(raw, key, yaml.safe_load(value) if isinstance(value, str) else value)
    return cls.from_dict(raw)


def _set_dotted(tree: dict, key: str, value) -> None:
  parts = key.split(".")
  node = tree
  for i, part in enumerate(parts[:-1]):
    nxt = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
    if not isinstance(nxt, (dict, list)):
      raise ConfigError(f"--set {key}: {'.'.join(parts[:i + 1])} is not a section")
    node = nxt
  last = parts[-1]
  if isinstance(node, list):
    node[int(last)] = value
  else:
    node[last] = value
