"""Training on a device mesh (train/placement.py, the `mesh:` config section) on 8 fake CPU devices.

- The state initialised on a mesh is bitwise the state initialised on one device, laid out as placed.
- One train step (the real step: losses, Muon/AdamW, router balancing) on six meshes gives the loss and
  updated parameters of one device, and returns its state laid out exactly as it came in.
- `dsv4 train --set mesh.data=2 --set mesh.expert=4` resumes bit-exactly.
"""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import pytest

from dsv4_jax.config import ConfigError, MeshConfig
from helpers import train_cli

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
EIGHT_DEVICES = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_NUM_CPU_DEVICES": "8"}

STEP_SCRIPT = textwrap.dedent("""
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np
    from jax.sharding import PartitionSpec as P
    from dsv4_jax.config import TrainConfig
    from dsv4_jax.data import load_tokenizer, make_dataset
    from dsv4_jax.parallel import make_mesh
    from dsv4_jax.train.checkpoint import flatten_named
    from dsv4_jax.train.curriculum import StepKind
    from dsv4_jax.train.loop import init_state
    from dsv4_jax.train.placement import Placement
    from dsv4_jax.train.step import make_train_step, own_routing

    # One CSA layer (ratio 4, lightning indexer) with 8 score-routed experts; capacity factor 8: expert
    # parallelism drops no token copy on any of these meshes.
    cfg = TrainConfig.from_dict({
        "model": dict(vocab_size=260, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=32,
                      q_lora_rank=16, o_groups=2, o_lora_rank=8, qk_rope_head_dim=8, sliding_window=16,
                      compress_ratios=[4], num_nextn_predict_layers=0, index_n_heads=4, index_head_dim=16, index_topk=8,
                      n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, num_hash_layers=0,
                      attention_chunk_size=128, moe_capacity_factor=8.0),
        "data": {"source": "stdlib", "prefetch_batches": 0, "num_threads": 1},
        "optimizer": {"learning_rate": 1e-3, "warmup_steps": 1},
        "curriculum": [{"seq_len": 512, "steps": 1, "attention": "sparse"}],
        "train": {"tokens_per_batch": 4096}})
    B, S = 8, 512
    batch = next(iter(make_dataset(cfg.data, S, B, load_tokenizer("byte"), split="train")))
    kind = StepKind("sparse", True, False)
    routing = own_routing(cfg.model, B, S)

    graphdef, state, tx = init_state(cfg)          # one device
    start = jax.device_get(state)

    def train_step(mesh):
      placement = Placement.of(mesh, start.params, start.extra, tx)
      step = make_train_step(graphdef, tx, cfg, 100, placement.state)
      with jax.set_mesh(mesh):
        new, metrics = step(placement.put_state(start), placement.batch(batch), kind, placement.routing(routing))
      assert [a.sharding for a in jax.tree.leaves(new)] == jax.tree.leaves(placement.state)   # laid out as placed
      assert float(metrics["dropped_copies"]) == 0
      return new, float(metrics["loss"])

    one, one_loss = train_step(make_mesh(devices=jax.devices()[:1]))
    expected = flatten_named(jax.device_get(one.params))
    # The first layer's mHC mixes 4 copies of one embedding, so its comb (Sinkhorn) logits, base[2N:] and
    # scale[2] of hc_attn, do not change the output: their gradients are rounding noise (~1e-19; 0 in exact
    # arithmetic) that AdamW's eps = 1e-20 turns into whole steps of either sign. Those elements, and only
    # they, are found from the 1-device gradient (Adam's first moment) and left out of the comparison.
    mu = flatten_named(jax.device_get(one.opt_state))
    gradient = lambda name: np.abs(mu[f"1.inner_states.adamw.inner_state.0.mu.{name}"]) / (1 - cfg.optimizer.adam_b1)
    n = cfg.model.hc_mult
    noise = {name: gradient(name) < 1e-15 for name in ("layers.0.hc_attn.base.value", "layers.0.hc_attn.scale.value")}
    assert noise["layers.0.hc_attn.base.value"].tolist() == [False] * 2 * n + [True] * n * n
    assert noise["layers.0.hc_attn.scale.value"].tolist() == [False, False, True]

    on_mesh = init_state(cfg, make_mesh(fsdp=8))[1]
    assert all(np.array_equal(a, b) for a, b in zip(jax.tree.leaves(jax.device_get(on_mesh)), jax.tree.leaves(start)))
    wq_a = on_mesh.params["layers"][0]["attn"]["wq_a"]["weight"][...]
    assert wq_a.sharding.spec == P(None, "fsdp") and wq_a.addressable_shards[0].data.shape == (16, 4), wq_a.sharding

    for sizes in (dict(data=8), dict(fsdp=8), dict(data=2, fsdp=2, tensor=2), dict(expert=8),
                  dict(expert=4, data=2), dict(context=4, fsdp=2)):
      new, loss = train_step(make_mesh(**sizes))
      got = flatten_named(jax.device_get(new.params))
      assert abs(loss - one_loss) <= 1e-6 * one_loss, (sizes, loss, one_loss)
      worst = max(float(np.abs(got[k] - expected[k])[~noise.get(k, False)].max()) for k in expected)
      assert worst <= 2e-6, (sizes, worst)
      print("OK", sizes, loss - one_loss, worst)
""")


def test_train_step_on_six_meshes_equals_one_device():
  result = subprocess.run([sys.executable, "-c", STEP_SCRIPT], cwd=TESTS, capture_output=True, text=True,
                          env=EIGHT_DEVICES, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
  assert result.stdout.count("OK") == 6, result.stdout


def test_mesh_config_resolves_the_rest_and_names_what_does_not_fit():
  assert MeshConfig().axis_sizes(8) == dict(data=8, fsdp=1, expert=1, tensor=1, context=1)
  assert MeshConfig(data=1, fsdp=-1, expert=4).axis_sizes(8)["fsdp"] == 2
  with pytest.raises(ConfigError, match=r"the fixed axes \{'fsdp': 1, 'expert': 3, 'tensor': 1, 'context': 1\} "
                                        r"use 3 devices, which does not divide the 8 devices"):
    MeshConfig(expert=3).axis_sizes(8)
  with pytest.raises(ConfigError, match="multiply to 4, but 8 devices are available"):
    MeshConfig(data=4).axis_sizes(8)


def _losses(run_dir, kind):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if r["kind"] == kind}


def test_cli_trains_on_a_mesh_and_resumes_bit_exactly(tmp_path):
  """The README's tiny config for 4 steps with one of its layers (hash-routed window) and no MTP block.
  The train steps equal one device's for every layer kind (the test above); a checkpoint resuming on another
  mesh and in another number of processes: tests/test_multiprocess.py."""
  config = os.path.join(REPO, "configs", "tiny.yaml")
  small = ["--set=model.num_hidden_layers=1", "--set=model.compress_ratios=[0]",
           "--set=model.num_nextn_predict_layers=0", "--set=train.log_every=1",
           "--set=train.eval_every=2", "--set=train.eval_tokens=2048", "--set=train.checkpoint_every=2"]
  mesh = ["--set=mesh.data=2", "--set=mesh.expert=4"]
  cache = tmp_path / "cache"

  def run(name, *flags, env=EIGHT_DEVICES):
    result = train_cli(config, tmp_path / name, cache, *small, *flags, env=env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout

  out = run("straight", *mesh, "--max_steps=4")   # checkpoints at steps 2 and 4
  assert "[mesh] mesh (data 2, expert 4); batch [8, 256] split as (('data', 'expert'), None)" in out
  shutil.copytree(tmp_path / "straight", tmp_path / "resumed")
  shutil.rmtree(tmp_path / "resumed" / "checkpoints" / "4")
  out = run("resumed", *mesh, "--max_steps=4", "--resume")
  assert "resumed from step 2" in out

  straight = _losses(tmp_path / "straight", "train")
  assert sorted(straight) == [1, 2, 3, 4]
  assert _losses(tmp_path / "resumed", "train") == straight                       # bit-exact resume
  assert _losses(tmp_path / "resumed", "eval") == _losses(tmp_path / "straight", "eval")
