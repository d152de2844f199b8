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

from dsv4_jax.config.errors import ConfigError, from_mapping

_SCORING_FUNCS = ("sqrtsoftplus", "sigmoid", "softmax")
_KERNELS = ("auto", "pallas", "xla")
_DTYPES = ("float32", "bfloat16", "float16")
_REMAT = ("none", "full", "save_dots")  # the keys of layers/layer_groups.REMAT_POLICIES


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
  moe_waves: int = 1  # expert parallelism: dispatch / compute / combine in this many overlapping waves
  moe_capacity_factor: float = 2.0  # expert parallelism: slots per destination = factor × its fair share
  qat: bool = False  # simulate the released model's FP8 KV / FP4 indexer quantisation
  scan_layers: bool = False  # consecutive layers of one kind as one jax.lax.scan (layers/layer_groups.py)
  remat: str = "none"  # rematerialisation of every block in the backward pass: none | full | save_dots
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
    need(self.moe_waves >= 1, f"moe_waves: expected a positive integer, got {self.moe_waves}")
    need(self.moe_capacity_factor > 0, f"moe_capacity_factor: expected > 0, got {self.moe_capacity_factor}")
    need(isinstance(self.scan_layers, bool), f"scan_layers: expected true or false, got {self.scan_layers!r}")
    need(self.remat in _REMAT, f"remat: expected one of {_REMAT}, got {self.remat!r}")
    need(self.dtype in _DTYPES, f"dtype: expected one of {_DTYPES}, got {self.dtype!r}")
    need(self.param_dtype in _DTYPES, f"param_dtype: expected one of {_DTYPES}, got {self.param_dtype!r}")

  # --- loading -------------------------------------------------------------------------------
  @classmethod
  def from_yaml(cls, path: str | os.PathLike) -> "ModelConfig":
    """Loads `configs/*.yaml`: either a flat mapping of fields or one under a `model:` key."""
    with open(path) as f:
      data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
      raise ConfigError(f"{path}: expected a mapping of config keys, got {type(data).__name__}")
    if "model" in data:
      data = data["model"]
    return from_mapping(cls, data, "model")

  @classmethod
  def from_hf_config(cls, path_or_dict: str | os.PathLike | Mapping[str, Any], **overrides) -> "ModelConfig":
    """Builds a config from a released hub `config.json` (a path to the file or its directory, or a dict).

    Hub metadata keys (architectures, torch_dtype, quantization_config, topk_method, ...) are accepted
    and ignored; `overrides` set our implementation fields (dtype, kernels, qat, ...). Raises
    ConfigError naming the file for an unreadable or non-JSON file, for missing architecture keys
    (all of them at once; an override counts as given) and for ones of the wrong type.
    """
    # Keys with no safe default: each sets tensor shapes or which tensors exist, or (routed_scaling_factor)
    # differs between the released models. The released config.json has all of them.
    required = {
        "vocab_size": int, "hidden_size": int, "num_hidden_layers": int, "num_attention_heads": int,
        "head_dim": int, "q_lora_rank": int, "o_lora_rank": int, "o_groups": int, "qk_rope_head_dim": int,
        "index_n_heads": int, "index_head_dim": int, "index_topk": int, "n_routed_experts": int,
        "num_experts_per_tok": int, "moe_intermediate_size": int, "num_hash_layers": int,
        "routed_scaling_factor": float, "sliding_window": int, "compress_ratios": list, "hc_mult": int,
        "num_nextn_predict_layers": int,
    }
    if isinstance(path_or_dict, Mapping):
      hf, source = dict(path_or_dict), "config.json"
    else:
      source = os.fspath(path_or_dict)
      if os.path.isdir(source):
        source = os.path.join(source, "config.json")
      try:
        with open(source, encoding="utf-8") as f:
          hf = json.load(f)
      except OSError as e:
        raise ConfigError(f"{source}: cannot read the hub config ({e.strerror or e})") from None
      except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
        raise ConfigError(f"{source}: not valid JSON ({e})") from None
      if not isinstance(hf, dict):
        raise ConfigError(f"{source}: expected a JSON object of config keys, got {type(hf).__name__}")
    missing = [key for key in required if key not in hf and key not in overrides]
    if missing:
      note = "; compress_ratios has one entry per layer, then one per MTP layer" if "compress_ratios" in missing else ""
      raise ConfigError(f"{source}: missing {', '.join(repr(k) for k in missing)} "
                        f"(architecture keys with no safe default{note})")

    def is_int(x):
      return isinstance(x, int) and not isinstance(x, bool)

    for key, kind in required.items():
      if key in overrides:
        continue
      value = hf[key]
      ok = {int: is_int(value), float: is_int(value) or isinstance(value, float),
            list: isinstance(value, (list, tuple)) and all(is_int(r) for r in value)}[kind]
      if not ok:
        what = {int: "an integer", float: "a number", list: "a list of integers"}[kind]
        raise ConfigError(f"{source}: {key}: expected {what}, got {value!r}")
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
    values.update(overrides)
    return from_mapping(cls, values, "model")

  def to_hf_config(self) -> dict[str, Any]:
    """The hub `config.json` dict for this config (what `save_checkpoint` writes)."""
    ours = {"dtype", "param_dtype", "attention_chunk_size", "kernels", "moe_waves", "moe_capacity_factor", "qat",
            "scan_layers", "remat", "init_std",
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
