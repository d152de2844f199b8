"""Configs: YAML and hub config.json loading, released numbers, validation and unknown-key errors."""

import json
import os

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
    ("mesh", {"dat": 1}, r"unknown mesh keys \['dat'\]; known keys: \['context', 'data'"),
    ("mesh", {"data": 0}, r"mesh: axis sizes must be positive, or -1 for the rest of the devices; got \{'data': 0\}"),
    ("mesh", {"fsdp": -1}, r"mesh: at most one axis may be -1 \(the rest of the devices\), got \['data', 'fsdp'\]"),
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


@pytest.mark.parametrize("key, text, expected", [
    ("optimizer.learning_rate", "1e-3", 1e-3),         # YAML 1.1 would give the string '1e-3'
    ("optimizer.learning_rate", "2", 2.0),
    ("optimizer.grad_clip_norm", "null", None),
    ("optimizer.grad_clip_norm", "None", None),
    ("optimizer.decay_steps", "10", 10),
    ("optimizer.ns_fast_coeffs", "[1, 2, 3]", (1.0, 2.0, 3.0)),
    ("optimizer.ns_fast_coeffs", "1,2,3", (1.0, 2.0, 3.0)),
    ("curriculum.0.steps", "1e2", 100),
    ("curriculum.0.train_indexer", "yes", True),
    ("data.shuffle", "false", False),
    ("data.shuffle", "0", False),
    ("data.paths", "a.txt,b.txt", (os.path.abspath("a.txt"), os.path.abspath("b.txt"))),
    ("model.compress_ratios", "[0,4,128,4,0]", (0, 4, 128, 4, 0)),
    ("train.run_dir", "runs/123", "runs/123"),
    ("train.log_every", "5", 5),
])
def test_set_overrides_are_typed(key, text, expected):
  cfg = TrainConfig.from_yaml("configs/tiny.yaml", {key: text})
  section, *rest = key.split(".")
  node = cfg if section == "train" else getattr(cfg, section)
  if section == "curriculum":
    node, rest = node[int(rest[0])], rest[1:]
  value = getattr(node, rest[0])
  assert value == expected and type(value) is type(expected)


@pytest.mark.parametrize("key, text, message", [
    ("optimizer.learning_rate", "abc", r"^--set optimizer\.learning_rate=abc: expected a float, got 'abc'$"),
    ("optimizer.warmup_steps", "2.5", r"expected an integer, got '2\.5'"),
    ("optimizer.warmup_steps", "null", r"expected an integer, got 'null'"),
    ("data.shuffle", "maybe", r"expected a boolean \(true/false\), got 'maybe'"),
    ("optimizer.ns_fast_coeffs", "1,2", r"expected a list of 3 floats, got '1,2'"),
    ("model.compress_ratios", "[0, x]", r"expected a list of integers"),
    ("optimizer.lr", "1", r"^--set optimizer\.lr=1: unknown optimizer keys \['lr'\]; known keys: \[.*'learning_rate'"),
    ("optimizer.total_steps", "5", r"optimizer: keys \['total_steps'\] may not be set here"),
    ("curriculum.9.steps", "5", r"index 9 is out of range: the curriculum has 3 stages \(0\.\.2\)"),
    ("curriculum.first.steps", "5", r"expected curriculum\.INDEX\.KEY"),
    ("mesh.data", "two", r"--set mesh\.data=two: expected an integer, got 'two'"),
    ("optimizer", "1", r"expected optimizer\.KEY"),
])
def test_set_override_errors(key, text, message):
  with pytest.raises(ConfigError, match=message):
    TrainConfig.from_yaml("configs/tiny.yaml", {key: text})


def test_non_text_override_is_checked():
  assert TrainConfig.from_yaml("configs/tiny.yaml", {"curriculum.0.steps": 7}).curriculum[0].steps == 7
  with pytest.raises(ConfigError, match=r"--set curriculum\.0\.steps: expected an integer or null, got 2\.5"):
    TrainConfig.from_yaml("configs/tiny.yaml", {"curriculum.0.steps": 2.5})


@pytest.mark.parametrize("section, change, message", [
    ("optimizer", {"learning_rate": "abc"}, r"^optimizer\.learning_rate: expected a float, got 'abc'$"),
    ("optimizer", {"warmup_steps": True}, r"optimizer\.warmup_steps: expected an integer, got True"),
    ("data", {"shuffle": "maybe"}, r"data\.shuffle: expected a boolean \(true/false\), got 'maybe'"),
    ("data", {"source": 3}, r"data\.source: expected a string, got 3"),
    ("train", {"log_every": [1]}, r"train\.log_every: expected an integer, got \[1\]"),
    ("model", {"compress_ratios": [0, "four", 128, 4, 0]}, r"model\.compress_ratios: expected a list of integers"),
    ("curriculum", [{"seq_len": "long", "steps": 1}], r"curriculum\[0\]\.seq_len: expected an integer, got 'long'"),
])
def test_yaml_values_of_the_wrong_type(section, change, message):
  raw = _tiny_run()
  raw[section] = {**raw[section], **change} if isinstance(change, dict) else change
  with pytest.raises(ConfigError, match=message):
    TrainConfig.from_dict(raw)


def test_yaml_values_are_converted_to_the_field_type(tmp_path):
  """YAML 1.1 reads `1e-3` as a string and `2` as an int: float fields get floats either way."""
  raw = _tiny_run()
  raw["optimizer"].update(learning_rate="1e-3", weight_decay=0)
  cfg = TrainConfig.from_dict(raw)
  assert cfg.optimizer.learning_rate == 1e-3 and type(cfg.optimizer.weight_decay) is float


def test_train_yaml_that_is_not_a_mapping(tmp_path):
  path = tmp_path / "list.yaml"
  path.write_text("- model\n- data\n")
  with pytest.raises(ConfigError, match=r"list\.yaml: expected a mapping of config sections .* got list"):
    TrainConfig.from_yaml(path, {"optimizer.learning_rate": "1e-3"})


def test_data_paths_and_tokenizer_are_stored_absolute(tmp_path, monkeypatch):
  """A run's saved config must name the same files when it is resumed, exported or evaluated elsewhere."""
  monkeypatch.chdir(tmp_path)
  cfg = DataConfig(source="text", paths=("docs", "/abs/x.txt"), validation_paths="held", tokenizer="tok/tokenizer.json")
  assert cfg.paths == (str(tmp_path / "docs"), "/abs/x.txt")
  assert cfg.validation_paths == (str(tmp_path / "held"),)
  assert cfg.tokenizer == str(tmp_path / "tok" / "tokenizer.json")
  assert DataConfig().tokenizer == "byte"
