"""Training: bit-exact resume across processes and a curriculum boundary, losses, aux-free balancing,
indexer warm-up."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from dsv4_jax.config import TrainConfig
from dsv4_jax.parallel.mesh import make_mesh
from dsv4_jax.train import curriculum
from dsv4_jax.train.compile_ahead import CompileAhead
from dsv4_jax.train.curriculum import StepKind
from dsv4_jax.train.loop import init_state
from dsv4_jax.train.losses import cross_entropy, mtp_mask
from dsv4_jax.train.step import make_train_step
from helpers import forward_fn, tiny_config, tiny_model

SMALL_RUN = {
    "model": dict(vocab_size=260, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=32,
                  q_lora_rank=16, o_groups=2, o_lora_rank=8, qk_rope_head_dim=8, sliding_window=16,
                  compress_ratios=[4, 128, 0], index_n_heads=4, index_head_dim=16, index_topk=4,
                  n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, num_hash_layers=0,
                  attention_chunk_size=128),
    "data": {"source": "stdlib", "prefetch_batches": 0, "num_threads": 1},
    "optimizer": {"learning_rate": 1e-3, "warmup_steps": 2},
    "curriculum": [{"seq_len": 128, "steps": 3, "attention": "dense"},
                   {"seq_len": 256, "steps": 2, "attention": "sparse", "indexer_warmup_steps": 1}],
    "train": {"tokens_per_batch": 512, "log_every": 1, "eval_every": 3, "eval_tokens": 1024,
              "checkpoint_every": 2, "keep_checkpoints": 2},
}


def _run(config_path, run_dir, cache_dir, *flags):
  env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  cmd = [sys.executable, "-m", "dsv4_jax.cli", "train", f"--config={config_path}",
         f"--set=train.run_dir={run_dir}", "--noprogress", *flags]
  result = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


def _losses(run_dir, kind="train"):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    records = [json.loads(line) for line in f]
  return {r["step"]: (r.get("total"), r["loss"]) for r in records if r["kind"] == kind}


def test_resume_is_bit_exact_across_processes_and_a_stage_boundary(tmp_path):
  config = tmp_path / "run.yaml"
  config.write_text(yaml.safe_dump(SMALL_RUN))
  total = TrainConfig.from_yaml(config).total_steps
  assert total == 3 + 2 + 1
  straight, split = tmp_path / "straight", tmp_path / "split"
  out = _run(config, straight, tmp_path / "cache")
  assert "[curriculum] stage 1" in out and "[eval] step 3" in out
  assert "of the validation split's unigram byte entropy" in out.splitlines()[-1]
  _run(config, split, tmp_path / "cache", "--max_steps=2")   # stops inside stage 0
  _run(config, split, tmp_path / "cache", "--resume")   # crosses into stage 1 (indexer warm-up included)
  a, b = _losses(straight), _losses(split)
  assert sorted(a) == list(range(1, total + 1)) and sorted(b) == sorted(a)
  for step in a:
    assert a[step] == b[step], (step, a[step], b[step])
  evals_straight, evals_split = _losses(straight, "eval"), _losses(split, "eval")
  assert sorted(evals_straight) == [3, 6]   # the split run also evaluates where it stops (2)
  assert all(evals_split[step] == evals_straight[step] for step in evals_straight)


def test_stage_plan_keeps_tokens_per_batch():
  cfg = TrainConfig.from_dict(SMALL_RUN)
  plans = curriculum.plan(cfg)
  assert [(p.start, p.end, p.batch_size) for p in plans] == [(0, 3, 4), (3, 6, 2)]
  assert plans[1].kind(3).indexer_only and plans[1].kind(3).attention == "dense"
  assert plans[1].kind(4) == curriculum.StepKind("sparse", True, False)
  assert plans[1].kinds(0, 6) == [plans[1].kind(3), plans[1].kind(4)]
  assert plans[1].kinds(4, 6) == [plans[1].kind(4)] and plans[0].kinds(3, 6) == []
  assert cfg.optimizer.total_steps == 6


def test_compile_ahead_returns_programs_and_raises_their_errors():
  compiler = CompileAhead(make_mesh(devices=jax.devices()[:1]))
  square = jax.jit(lambda x: x * x)
  compiler.submit("square", lambda: square.lower(jax.ShapeDtypeStruct((3,), jnp.float32)))
  compiler.submit("broken", lambda: square.lower(object()))
  np.testing.assert_array_equal(compiler.get("square")(jnp.arange(3.0)), [0.0, 1.0, 4.0])
  with pytest.raises(TypeError):
    compiler.get("broken")
  with pytest.raises(KeyError, match="nothing was submitted for 'cube'"):
    compiler.get("cube")


def test_bad_train_config_is_named():
  bad = dict(SMALL_RUN, train={"tokens_per_batch": 512, "log_evry": 3})
  with pytest.raises(ValueError, match=r"unknown train keys \['log_evry'\]"):
    TrainConfig.from_dict(bad)
  bad = dict(SMALL_RUN, curriculum=[{"seq_len": 100, "steps": 3}])
  with pytest.raises(ValueError, match="seq_len 100 is not a multiple of data.align 128"):
    TrainConfig.from_dict(bad)


def test_cross_entropy_and_mtp_mask_closed_form():
  logits = jnp.log(jnp.array([[[0.5, 0.25, 0.25], [0.1, 0.8, 0.1]]]))
  mean, total, count = cross_entropy(logits, jnp.array([[0, 1]]), jnp.array([[1.0, 0.0]]))
  assert np.isclose(mean, np.log(2)) and count == 1
  seg = jnp.array([[1, 1, 2, 2, 0]])
  mask = jnp.array([[1, 1, 1, 1, 0]])
  np.testing.assert_array_equal(mtp_mask(mask, seg), [[True, False, True, False]])


def test_aux_free_bias_update_reduces_imbalance():
  """A router skewed toward expert 0: repeated bias updates (speed 1e-3) even out the loads."""
  from dsv4_jax.layers.moe import Gate
  cfg = tiny_config(n_routed_experts=8, num_experts_per_tok=2)
  gate = Gate(cfg, hash_routed=False, rngs=nnx.Rngs(0))
  x = jax.random.normal(jax.random.key(0), (512, cfg.hidden_size))
  skew = jnp.zeros((8, cfg.hidden_size)).at[0].set(jnp.mean(x, 0) * 3).at[1].set(jnp.mean(x, 0) * 2)
  gate.weight[...] = gate.weight[...] + skew
  graphdef, params, extra = nnx.split(gate, nnx.Param, ...)

  @jax.jit
  def step(extra):
    gate = nnx.merge(graphdef, params, extra)
    ids, _, _ = gate(x, jnp.zeros(512, jnp.int32))
    load = jnp.bincount(ids.reshape(-1), length=8).astype(jnp.float32)
    gate.update_bias(load, 1e-3)
    return nnx.split(gate, nnx.Param, ...)[2], load

  imbalance = []
  for _ in range(400):
    extra, load = step(extra)
    imbalance.append(float(load.max() / load.mean()))
  assert imbalance[0] > 2.0, imbalance[0]
  assert np.mean(imbalance[-20:]) < 0.6 * imbalance[0], (imbalance[0], imbalance[-20:])


def test_model_balances_every_score_routed_gate():
  """Transformer.balance_router_bias: each score-routed gate (main and MTP layers) moves by exactly
  speed · sign(mean load − load) from the loads of its own layer; hash-routed gates have no bias."""
  model = tiny_model(0)
  cfg = model.cfg
  assert cfg.num_hash_layers >= 1 and cfg.num_nextn_predict_layers >= 1
  ids = jax.random.randint(jax.random.key(1), (2, 64), 0, cfg.vocab_size)
  aux = forward_fn(model)(ids).aux
  gates = [block.ffn.gate for block in model.layers] + [block.ffn.gate for block in model.mtp]
  loads = list(np.asarray(aux["expert_load"])) + list(np.asarray(aux["mtp_expert_load"]))
  assert len(loads) == len(gates) == cfg.num_hidden_layers + cfg.num_nextn_predict_layers
  before = [np.asarray(g.bias[...]) if not g.hash_routed else None for g in gates]
  speed = np.float32(1e-3)
  model.balance_router_bias(aux, float(speed))
  moved = 0
  for i, (gate, load, old) in enumerate(zip(gates, loads, before)):
    if i < cfg.num_hash_layers:
      assert gate.hash_routed and not hasattr(gate, "bias") and hasattr(gate, "tid2eid"), i
      continue
    assert not gate.hash_routed, i
    new = np.asarray(gate.bias[...])
    direction = np.sign(load.mean() - load)   # +1 under-loaded, −1 over-loaded, 0 exactly balanced
    np.testing.assert_array_equal(new, old + speed * direction.astype(np.float32), err_msg=str(i))
    np.testing.assert_allclose(np.abs(new - old)[direction != 0], speed, rtol=1e-3)
    moved += int(np.any(new != old))
  assert moved == len(gates) - cfg.num_hash_layers


def test_indexer_warmup_step_changes_only_indexer_parameters():
  """An indexer-only step: every Param tagged indexer=True moves; every other Param and all non-Param
  state (router biases: no balancing on these steps) stay bit-identical."""
  cfg = TrainConfig.from_dict(SMALL_RUN)
  graphdef, state, tx = init_state(cfg)
  step = make_train_step(graphdef, tx, cfg, cfg.optimizer.decay_start_step)
  rng = np.random.default_rng(0)
  b, s = 2, 128
  ids = rng.integers(1, cfg.model.vocab_size, (b, s)).astype(np.int32)
  batch = {"input_ids": ids, "targets": np.roll(ids, -1, 1), "loss_mask": np.ones((b, s), np.float32),
           "segment_ids": np.ones((b, s), np.int32), "target_bytes": np.ones((b, s), np.int32),
           "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))}

  def flat(tree):  # path -> (tagged indexer, value)
    return {p: (v.get_metadata("indexer", False), np.array(v[...])) for p, v in nnx.to_flat_state(tree)}

  params, extra = flat(state.params), flat(state.extra)
  assert any(tagged for tagged, _ in params.values())
  state, metrics = step(state, {k: jnp.asarray(v) for k, v in batch.items()}, StepKind("dense", True, True))
  assert np.isfinite(float(metrics["indexer_loss"])) and float(metrics["indexer_loss"]) > 0
  new_params, new_extra = flat(state.params), flat(state.extra)
  assert new_params.keys() == params.keys() and new_extra.keys() == extra.keys()
  for path, (tagged, old) in params.items():
    changed = not np.array_equal(new_params[path][1], old)
    assert changed == tagged, (path, tagged)
  for path, (_, old) in extra.items():
    np.testing.assert_array_equal(new_extra[path][1], old, err_msg=str(path))
