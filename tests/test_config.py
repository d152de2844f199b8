"""Configs: YAML and hub config.json loading, released numbers, validation and unknown-key errors."""

import json

import pytest
import yaml

from dsv4_jax.config import (ConfigError, CurriculumStage, DataConfig, ModelConfig, OptimizerConfig, TrainConfig,
                             from_mapping)
from helpers import TINY

RELEASED_FLASH = {  # the released DeepSeek-V4-Flash config.json (abridged to architecture + metadata keys)
    "architectures": ["DeepseekV4ForCausalLM"], "model_type": "deepseek_v4", "torch_dtype": "bfloat16",
    "topk_method": "noaux_tc", "norm_topk_prob": True, "hidden_act": "silu", "expert_dtype": "fp4",
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "scale_fmt": "ue8m0", "weight_block_size": [128, 128]},
    "hc_eps": 1e-06, "hc_mult": 4, "hc_sinkhorn_iters": 20, "head_dim": 512, "hidden_size": 4096,
    "index_head_dim": 128, "index_n_heads": 64, "index_topk": 512, "max_position_embeddings": 1048576,
    "moe_intermediate_size": 2048, "n_routed_experts": 256, "n_shared_experts": 1, "num_attention_heads": 64,
    "num_experts_per_tok": 6, "num_hidden_layers": 43, "num_hash_layers": 3, "num_key_value_heads": 1,
    "num_nextn_predict_layers": 1, "o_groups": 8, "o_lora_rank": 1024, "q_lora_rank": 1024,
    "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 16, "original_max_position_embeddings": 65536,
                     "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 1.5, "scoring_func": "sqrtsoftplus", "sliding_window": 128,
    "swiglu_limit": 10.0, "vocab_size": 129280, "compress_rope_theta": 160000,
    "compress_ratios": [0, 0] + [4, 128] * 20 + [4, 0],
}


def test_flash_yaml_matches_released_config_json():
  ours = ModelConfig.from_yaml("configs/flash.yaml")
  assert ours == ModelConfig.from_hf_config(RELEASED_FLASH)


def test_pro_yaml_has_spec_numbers():
  pro = ModelConfig.from_yaml("configs/pro.yaml")
  assert (pro.num_hidden_layers, pro.hidden_size, pro.num_attention_heads, pro.q_lora_rank) == (61, 7168, 128, 1536)
  assert (pro.o_groups, pro.n_routed_experts, pro.moe_intermediate_size, pro.index_topk) == (16, 384, 3072, 1024)
  assert pro.routed_scaling_factor == 2.5 and pro.compress_ratios[:4] == (128, 128, 4, 128)
  assert len(pro.compress_ratios) == 62 and pro.compress_ratios[-1] == 0


def test_hub_file_and_dir(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps(RELEASED_FLASH))
  a = ModelConfig.from_hf_config(tmp_path)
  b = ModelConfig.from_hf_config(tmp_path / "config.json", dtype="bfloat16")
  assert a.yarn_factor == 16 and a.yarn_original_max_position == 65536 and a.compress_rope_theta == 160000
  assert b.dtype == "bfloat16" and b.replace(dtype="float32") == a


def test_hf_round_trip():
  cfg = ModelConfig(**TINY)
  assert ModelConfig.from_hf_config(cfg.to_hf_config(), attention_chunk_size=cfg.attention_chunk_size) == cfg


@pytest.mark.parametrize("change, message", [
    (dict(compress_ratios=(0, 4, 128)), r"compress_ratios: expected 6 entries"),
    (dict(o_groups=3), r"num_attention_heads \(4\) must be divisible by o_groups \(3\)"),
    (dict(compress_ratios=(0, 4, 1, 4, 0, 0)), r"compress_ratios\[2\]"),
    (dict(scoring_func="relu"), r"scoring_func: expected one of"),
    (dict(kernels="cuda"), r"kernels: expected one of"),
    (dict(num_experts_per_tok=9), r"num_experts_per_tok \(9\) exceeds n_routed_experts \(8\)"),
    (dict(qk_rope_head_dim=7), r"qk_rope_head_dim"),
])
def test_validation_errors(change, message):
  with pytest.raises(ConfigError, match=message):
    ModelConfig(**{**TINY, **change})


def test_unknown_yaml_key(tmp_path):
  path = tmp_path / "bad.yaml"
  path.write_text("model:\n  hidden_size: 64\n  hiden_layers: 3\n")
  with pytest.raises(ConfigError, match=r"unknown model keys \['hiden_layers'\]; known keys: \[.*'hidden_size'"):
    ModelConfig.from_yaml(path)


def test_hub_config_without_ratios():
  bad = dict(RELEASED_FLASH)
  del bad["compress_ratios"]
  with pytest.raises(ConfigError, match="missing 'compress_ratios'"):
    ModelConfig.from_hf_config(bad)


def _tiny_run():
  with open("configs/tiny.yaml") as f:
    return yaml.safe_load(f)


def test_tiny_train_yaml_builds_typed_sections():
  cfg = TrainConfig.from_yaml("configs/tiny.yaml", {"optimizer.learning_rate": "1.0e-3"})
  assert isinstance(cfg.data, DataConfig) and isinstance(cfg.optimizer, OptimizerConfig)
  assert all(isinstance(s, CurriculumStage) for s in cfg.curriculum)
  assert cfg.optimizer.learning_rate == 1e-3 and cfg.optimizer.total_steps == cfg.total_steps == 312


@pytest.mark.parametrize("section, change, message", [
    ("mesh", {"data": 1}, r"unknown config sections \['mesh'\]"),
    ("data", {"sorce": "text"}, r"unknown data keys \['sorce'\]; known keys: \[.*'source'"),
    ("optimizer", {"lr": 1.0}, r"unknown optimizer keys \['lr'\]; known keys: \[.*'learning_rate'"),
    ("optimizer", {"total_steps": 5}, r"optimizer: keys \['total_steps'\] may not be set here"),
    ("train", {"model": {}}, r"train: keys \['model'\] may not be set here"),
    ("curriculum", [{"seq_len": 256, "steps": 1, "atention": "dense"}], r"unknown curriculum\[0\] keys \['atention'\]"),
    ("curriculum", ["short"], r"curriculum\[0\]: expected a mapping of config keys, got str"),
    ("model", None, r"model: missing section"),
])
def test_train_config_rejects_unknown_keys(section, change, message):
  raw = _tiny_run()
  if isinstance(change, dict) and isinstance(raw.get(section), dict):
    raw[section] = {**raw[section], **change}
  else:
    raw[section] = change
  with pytest.raises(ConfigError, match=message):
    TrainConfig.from_dict(raw)


def test_from_mapping_names_section_unknown_and_known_keys():
  with pytest.raises(ConfigError) as error:
    from_mapping(CurriculumStage, {"seq_len": 8, "steps": 1, "x": 1, "a": 2}, "curriculum[3]")
  known = sorted(f for f in CurriculumStage.__dataclass_fields__)
  assert str(error.value) == f"unknown curriculum[3] keys ['a', 'x']; known keys: {known}"
  assert from_mapping(DataConfig, None, "data") == DataConfig()
