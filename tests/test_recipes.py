"""The pre-training recipes configs/flash_train.yaml and configs/pro_train.yaml.

- Their model sections are the released architectures (configs/flash.yaml, configs/pro.yaml) key for key, plus
  implementation fields only, so the two cannot drift apart.
- Their curricula have the report's shape: 4K -> 16K -> 64K -> 1M, dense attention before sparse, an indexer
  warm-up at the first sparse stage, and the report's batch (75.5M / 94.4M tokens) from the 4K stage on.
- `dsv4 train --config configs/flash_train.yaml`, shrunk to CPU size by --set (widths, and each stage's length
  and batch, the stage structure kept), runs the first step of every stage (and the indexer warm-up step).
"""

import json
import os

import pytest
import yaml

from dsv4_jax.config import ModelConfig, TrainConfig
from helpers import train_cli

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = os.path.join(REPO, "configs")
# ModelConfig fields that are implementation choices, not architecture (ModelConfig.to_hf_config leaves them out).
IMPLEMENTATION = {"dtype", "param_dtype", "attention_chunk_size", "kernels", "moe_waves", "moe_capacity_factor",
                  "qat", "scan_layers", "remat", "init_std"}
# The report's batch: the tokens per step the batch ramps up to (rounded to 0.1M), per model.
REPORT_BATCH = {"flash": 75.5e6, "pro": 94.4e6}


def _model_section(path):
  with open(path) as f:
    return yaml.safe_load(f)["model"]


@pytest.mark.parametrize("name", ["flash", "pro"])
def test_recipe_model_is_the_released_architecture(name):
  released = _model_section(os.path.join(CONFIGS, f"{name}.yaml"))
  recipe = _model_section(os.path.join(CONFIGS, f"{name}_train.yaml"))
  assert {k: recipe.get(k) for k in released} == released
  assert set(recipe) - set(released) <= IMPLEMENTATION, set(recipe) - set(released) - IMPLEMENTATION
  architecture = {k: v for k, v in vars(ModelConfig.from_yaml(os.path.join(CONFIGS, f"{name}_train.yaml"))).items()
                  if k not in IMPLEMENTATION}
  assert architecture == {k: v for k, v in vars(ModelConfig.from_yaml(os.path.join(CONFIGS, f"{name}.yaml"))).items()
                          if k not in IMPLEMENTATION}


@pytest.mark.parametrize("name", ["flash", "pro"])
def test_recipe_curriculum_has_the_report_shape(name):
  cfg = TrainConfig.from_yaml(os.path.join(CONFIGS, f"{name}_train.yaml"))
  stages = cfg.curriculum
  lengths = list(dict.fromkeys(s.seq_len for s in stages))
  assert lengths == [4096, 16384, 65536, 1048576]
  assert [s.seq_len for s in stages] == sorted(s.seq_len for s in stages)
  modes = [s.attention for s in stages]
  first_sparse = modes.index("sparse")
  assert modes == ["dense"] * first_sparse + ["sparse"] * (len(modes) - first_sparse)
  assert stages[first_sparse].seq_len == 65536 and stages[first_sparse].indexer_warmup_steps > 0
  assert all(s.indexer_warmup_steps == 0 for i, s in enumerate(stages) if i != first_sparse)
  first_4k = max(i for i, s in enumerate(stages) if s.seq_len == 4096)
  for stage in stages[first_4k:]:   # the batch the ramp reaches, at every sequence length after it
    assert abs(cfg.stage_batch_size(stage) * stage.seq_len - REPORT_BATCH[name]) < 0.05e6
  assert all(cfg.stage_batch_size(s) * s.seq_len < REPORT_BATCH[name] for s in stages[:first_4k])
  assert cfg.optimizer.warmup_steps == 2000
  assert cfg.optimizer.learning_rate == {"flash": 2.7e-4, "pro": 2.0e-4}[name]
  assert cfg.optimizer.final_lr_fraction == 0.1


# CPU size: one CSA layer (the indexer's warm-up needs one), tiny widths; every stage runs one step, the 64K and
# 1M stages one row of 1024 tokens. Stages of one shape and step kind (the ramp and 4K; 64K and 1M, sparse) reuse
# one compiled step (persistent compilation cache): four compilations in all. fp32 without rematerialisation: XLA's
# CPU backend compiles that faster (and does not lower its memory: remat buys nothing there).
SHRINK = {
    "model.vocab_size": 512, "model.hidden_size": 32, "model.num_hidden_layers": 1, "model.compress_ratios": "[4]",
    "model.num_nextn_predict_layers": 0, "model.num_hash_layers": 0, "model.num_attention_heads": 2,
    "model.head_dim": 32, "model.q_lora_rank": 16, "model.o_groups": 2, "model.o_lora_rank": 8,
    "model.qk_rope_head_dim": 8, "model.sliding_window": 16, "model.index_n_heads": 2, "model.index_head_dim": 16,
    "model.index_topk": 8, "model.n_routed_experts": 4, "model.num_experts_per_tok": 2,
    "model.moe_intermediate_size": 32, "model.attention_chunk_size": 128, "model.dtype": "float32",
    "model.remat": "none",
    "data.source": "stdlib", "data.tokenizer": "byte", "data.validation_paths": "[]", "data.num_threads": 1,
    "data.prefetch_batches": 0, "data.row_shuffle_tokens": 0,
    "optimizer.warmup_steps": 1, "train.tokens_per_batch": 1024, "train.log_every": 1, "train.eval_every": 0,
    "curriculum.0.seq_len": 256, "curriculum.0.batch_size": 4, "curriculum.0.tokens": 1024,
    "curriculum.1.seq_len": 256, "curriculum.1.tokens": 1024,
    "curriculum.2.seq_len": 512, "curriculum.2.tokens": 1024,
    "curriculum.3.seq_len": 1024, "curriculum.3.tokens": 1024, "curriculum.3.indexer_warmup_steps": 1,
    "curriculum.4.seq_len": 1024, "curriculum.4.tokens": 1024,
}


def test_flash_recipe_runs_the_first_step_of_every_stage(tmp_path):
  run_dir = tmp_path / "run"
  sets = [f"--set={key}={value}" for key, value in SHRINK.items()]
  result = train_cli(os.path.join(CONFIGS, "flash_train.yaml"), run_dir, tmp_path / "cache", "--mesh=data", *sets)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  stages = [line for line in result.stdout.splitlines() if line.startswith("[curriculum] stage")]
  assert len(stages) == 5, result.stdout
  for line, (name, seq_len, attention) in zip(stages, [("4k_ramp", 256, "dense"), ("4k", 256, "dense"),
                                                        ("16k", 512, "dense"), ("64k", 1024, "sparse"),
                                                        ("1m", 1024, "sparse")]):
    assert f"({name}): seq_len {seq_len}," in line and f"{attention} attention" in line, line
  assert "indexer warm-up 1 steps" in stages[3]
  with open(run_dir / "metrics.jsonl") as f:
    records = [r for r in map(json.loads, f) if r["kind"] == "train"]
  assert [r["seq_len"] for r in records] == [256, 256, 512, 1024, 1024, 1024]
  assert all(r["loss"] == r["loss"] and r["grad_norm"] == r["grad_norm"] for r in records)   # finite, not NaN
  assert records[4]["indexer_loss"] > 0   # the sparse stage trains the indexer toward the attention
