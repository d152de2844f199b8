"""`dsv4 export` and `dsv4 generate --checkpoint RUN_DIR`: a training checkpoint -> the released layout,
the same logits; clear errors. One short training run (2 steps, tiny shapes) is shared by the module."""

import dataclasses
import functools
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from dsv4_jax.config import TrainConfig
from dsv4_jax.convert import load_model, save_checkpoint
from dsv4_jax.train.checkpoint import RunDirectoryError, TrainCheckpointer
from dsv4_jax.train.export import copy_tokenizer, export_run, is_run_dir, read_run_config
from dsv4_jax.train.loop import init_state, train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
ENV.pop("DSV4_DEBUG", None)

RUN = {
    "model": dict(vocab_size=260, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=32,
                  q_lora_rank=16, o_groups=2, o_lora_rank=8, qk_rope_head_dim=8, sliding_window=16,
                  compress_ratios=[4, 0, 0], index_n_heads=4, index_head_dim=16, index_topk=4,
                  n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, num_hash_layers=1,
                  attention_chunk_size=128),
    "data": {"source": "stdlib", "prefetch_batches": 0, "num_threads": 1},
    "optimizer": {"learning_rate": 1e-2, "warmup_steps": 1},
    "curriculum": [{"seq_len": 128, "steps": 2, "attention": "dense"}],
    "train": {"tokens_per_batch": 256, "log_every": 1, "eval_every": 0, "eval_tokens": 256,
              "checkpoint_every": 1, "keep_checkpoints": 3},
}


def dsv4(*args):
  return subprocess.run([sys.executable, "-m", "dsv4_jax.cli", *args], capture_output=True, text=True,
                        env=ENV, cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
  run = tmp_path_factory.mktemp("export") / "run"
  cfg = dataclasses.replace(TrainConfig.from_dict(RUN), run_dir=str(run))
  train(cfg, progress=False, log=lambda *a: None)
  return run


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, state, ids):
  return nnx.merge(graphdef, state)(ids).logits


def _logits(model, ids):
  graphdef, state = nnx.split(model)
  return np.asarray(_forward(graphdef, state, ids))


def _values(model):
  return {".".join(map(str, p)): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}


def test_config_json_round_trips(run_dir):
  cfg = read_run_config(run_dir)
  assert cfg == dataclasses.replace(TrainConfig.from_dict(RUN), run_dir=str(run_dir))
  assert is_run_dir(run_dir) and not is_run_dir(run_dir / "checkpoints")


def test_export_matches_the_training_state(run_dir, tmp_path):
  out = tmp_path / "out"
  assert export_run(run_dir, out, save=save_checkpoint, log=lambda *a: None) == 2
  assert not (out / "tokenizer.json").exists()   # byte tokenizer
  exported = load_model(out)

  # The model of the training state, restored independently of export.py.
  cfg = dataclasses.replace(TrainConfig.from_dict(RUN), run_dir=str(run_dir))
  graphdef, target, _ = init_state(cfg)
  ckpt = TrainCheckpointer(os.path.join(run_dir, "checkpoints"), keep=3, save_every=0)
  state, _, _ = ckpt.restore(2, target)
  ckpt.close()
  trained = nnx.merge(graphdef, state.params, state.extra)
  initial = nnx.merge(graphdef, target.params, target.extra)

  ids = np.random.default_rng(0).integers(0, 256, (2, 40)).astype(np.int32)
  expected = _logits(trained, ids)
  np.testing.assert_allclose(_logits(exported, ids), expected, rtol=0, atol=1e-6)
  values, initial = _values(exported), _values(nnx.merge(graphdef, target.params, target.extra))
  assert values.keys() == initial.keys()
  changed = {name for name in values if not np.array_equal(values[name], initial[name])}
  assert any(name.endswith("wq_a.weight") for name in changed)   # training moved the parameters
  # and the non-Param state came along: the router biases moved away from their initial zeros
  assert any("gate" in name and name.endswith("bias") for name in changed), sorted(changed)

  # an earlier step is another model
  earlier = tmp_path / "step1"
  assert export_run(run_dir, earlier, 1, save=save_checkpoint) == 1
  step1 = _values(load_model(earlier))
  assert any(not np.array_equal(step1[name], values[name]) for name in changed)


def test_copy_tokenizer(run_dir, tmp_path):
  tok = tmp_path / "tok.json"
  tok.write_text('{"version": "1.0"}')
  cfg = read_run_config(run_dir)
  cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, tokenizer=str(tok)))
  (tmp_path / "out").mkdir()
  assert copy_tokenizer(cfg, tmp_path / "out") == str(tmp_path / "out" / "tokenizer.json")
  assert (tmp_path / "out" / "tokenizer.json").read_text() == tok.read_text()


def test_export_and_generate_cli(run_dir, tmp_path):
  out = tmp_path / "hub"
  proc = dsv4("export", str(run_dir), str(out))
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "exported step 2" in proc.stdout
  assert json.loads((out / "config.json").read_text())["vocab_size"] == 260
  for checkpoint in (out, run_dir):
    proc = dsv4("generate", "--checkpoint", str(checkpoint), "--prompt", "def ", "--max_new_tokens", "5")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("def "), proc.stdout


def test_export_errors(run_dir, tmp_path):
  empty = tmp_path / "empty"
  empty.mkdir()
  with pytest.raises(RunDirectoryError, match="no checkpoint"):
    export_run(empty, tmp_path / "o1", save=save_checkpoint)
  with pytest.raises(RunDirectoryError, match=r"no checkpoint at step 999 \(checkpoints at steps \[1, 2\]\)"):
    export_run(run_dir, tmp_path / "o2", 999, save=save_checkpoint)
  full = tmp_path / "full"
  full.mkdir()
  (full / "keep.txt").write_text("x")
  with pytest.raises(FileExistsError, match="not empty"):
    export_run(run_dir, full, save=save_checkpoint)
  assert os.listdir(full) == ["keep.txt"]
  assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()

  proc = dsv4("export", str(empty), str(tmp_path / "o3"))
  assert proc.returncode == 1 and "dsv4 export: error:" in proc.stderr and "no checkpoint" in proc.stderr
  assert "Traceback" not in proc.stderr
  proc = dsv4("export", str(run_dir), str(tmp_path / "o4"), "--step", "999")
  assert proc.returncode == 1 and "no checkpoint at step 999" in proc.stderr, proc.stderr
  proc = dsv4("export", str(run_dir), str(full))
  assert proc.returncode == 2 and "not empty" in proc.stderr and "--overwrite" in proc.stderr, proc.stderr
  proc = dsv4("export", str(run_dir), str(full), "--overwrite", "--step", "1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "keep.txt" not in os.listdir(full) and (full / "config.json").exists()
