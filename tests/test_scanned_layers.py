"""Scanned layer groups (layers/layer_groups.py) against the unrolled model with the same parameters.

Reference: the unrolled Transformer (a Python loop over its Blocks, checked by the other test files); the
scanned model gets the same values through `stack_layers`. fp32 throughout. Routing, expert loads and
the loaded / saved tensors must be equal; logits, losses, gradients and decoded logits within TOL = 1e-5
of the largest magnitude of each array plus ATOL = 1e-8 (for gradients that are nearly zero) (the same
arithmetic in another loop structure, which XLA may fuse and accumulate differently). The model has
Flash's layer pattern in small: two hash-routed window layers (a scanned period-1 group), a CSA/HCA pair
repeated twice (a scanned period-2 group) and the MTP block; the HCA ratio is 8, not 128, so that 32
tokens complete its blocks. Decoding is compared with the unrolled model's full forward, which equals
the unrolled model's own decoding (tests/test_inference.py).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from dsv4_jax.config import ConfigError, ModelConfig, from_mapping
from dsv4_jax.config.shipped import shipped_config
from dsv4_jax.convert import load_model, save_checkpoint
from dsv4_jax.inference import decode, prefill
from dsv4_jax.layers.block import Block
from dsv4_jax.layers.layer_groups import (REMAT_POLICIES, LayerGroup, layer_kind, plan_layer_groups, run_block,
                                          stack_layers, unstack_layers)
from dsv4_jax.layers.model import Transformer
from dsv4_jax.train.losses import training_losses
from helpers import randomize, tiny_config

SCAN = dict(num_hidden_layers=6, compress_ratios=(0, 0, 4, 8, 4, 8, 0), num_hash_layers=2)
TOL, ATOL = 1e-5, 1e-8
B, S = 2, 32


def close(a, b, what):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  assert a.shape == b.shape, f"{what}: shape {a.shape} vs {b.shape}"
  err, scale = np.abs(a - b).max(initial=0.0), np.abs(b).max(initial=0.0)
  assert err <= TOL * scale + ATOL, f"{what}: max difference {err:.3g}, largest magnitude {scale:.3g}"


def rebuilt(model: Transformer, **changes) -> Transformer:
  """The model of (unrolled) model's config with `changes` (scan_layers, remat), holding model's values."""
  cfg = model.cfg.replace(**changes)
  graphdef, _ = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))))
  state = stack_layers(nnx.state(model), cfg) if cfg.scan_layers else nnx.state(model)
  return nnx.merge(graphdef, state)


def flat(state) -> dict:
  return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}


@pytest.fixture(scope="module")
def unrolled():
  return randomize(Transformer(tiny_config(**SCAN), rngs=nnx.Rngs(0)), seed=1)


@pytest.fixture(scope="module")
def scanned(unrolled):
  return rebuilt(unrolled, scan_layers=True)


@pytest.fixture(scope="module")
def batch():
  """Tokens, targets, and routing indices [R, B, S, K] for the score-routed layers 2..5: row 0 all −1
  (the routers choose), row 1 given (experts its routers are unlikely to pick all of)."""
  rng = np.random.default_rng(0)
  routing = np.full((4, B, S, 2), -1, np.int32)
  routing[:, 1] = np.stack([rng.permutation(8)[:2] for _ in range(4 * S)]).reshape(4, S, 2)
  return {"input_ids": jnp.asarray(rng.integers(0, 256, (B, S)), jnp.int32),
          "targets": jnp.asarray(rng.integers(0, 256, (B, S)), jnp.int32),
          "loss_mask": jnp.ones((B, S), jnp.float32), "segment_ids": jnp.ones((B, S), jnp.int32),
          "routing": jnp.asarray(routing)}


def training_loss(graphdef, extra):
  """params, batch -> (the training loss: main, MTP, balance and indexer terms; ModelOutput)."""

  def loss(params, batch):
    out = nnx.merge(graphdef, params, extra)(batch["input_ids"], segment_ids=batch["segment_ids"],
                                             routing=batch["routing"])
    return training_losses(out, batch, mtp_weight=0.3, balance_weight=0.1, indexer_weight=1.0)["total"], out

  return loss


@pytest.fixture(scope="module")
def unrolled_run(unrolled, batch):
  """((loss, ModelOutput), gradients of every Param)."""
  graphdef, params, extra = nnx.split(unrolled, nnx.Param, ...)
  return jax.jit(jax.value_and_grad(training_loss(graphdef, extra), has_aux=True))(params, batch)


@pytest.fixture(scope="module")
def scanned_run(scanned, batch):
  """As unrolled_run, and what `route` returns, in one program (one compilation)."""
  graphdef, params, extra = nnx.split(scanned, nnx.Param, ...)

  @jax.jit
  def run(params, batch):
    route = nnx.merge(graphdef, params, extra).route(batch["input_ids"])
    return jax.value_and_grad(training_loss(graphdef, extra), has_aux=True)(params, batch), route

  return run(params, batch)


# --- the grouping --------------------------------------------------------------------------------

def test_plan_groups_flash_and_every_shipped_config():
  flash = ModelConfig.from_yaml(shipped_config("flash"))
  # ratios 0, 0 (hash) | 4 (hash) | 128, 4 alternating over layers 3..42 (score-routed)
  assert plan_layer_groups(flash) == (LayerGroup(0, 1, 2), LayerGroup(2), LayerGroup(3, 2, 20))
  assert plan_layer_groups(tiny_config(**SCAN)) == (LayerGroup(0, 1, 2), LayerGroup(2, 2, 2))
  for name in ("tiny", "flash", "pro"):
    cfg = ModelConfig.from_yaml(shipped_config(name))
    groups = plan_layer_groups(cfg)
    assert [i for g in groups for i in g.layers] == list(range(cfg.num_hidden_layers)), name
    for g in groups:
      for i in g.layers:
        assert layer_kind(cfg, i) == layer_kind(cfg, g.first + (i - g.first) % g.period), (name, i)


def test_same_initial_values_and_stack_roundtrip(unrolled):
  cfg = tiny_config(**SCAN)
  fresh = nnx.state(Transformer(cfg, rngs=nnx.Rngs(3)))
  built = flat(nnx.state(Transformer(cfg.replace(scan_layers=True), rngs=nnx.Rngs(3))))
  stacked = flat(stack_layers(fresh, cfg.replace(scan_layers=True)))
  assert built.keys() == stacked.keys()
  for name, var in built.items():
    np.testing.assert_array_equal(var[...], stacked[name][...], err_msg=name)
    assert var.get_metadata()["logical_axes"] == stacked[name].get_metadata()["logical_axes"], name
  assert built["groups.1.blocks.0.attn.wq_a.weight"].get_metadata()["logical_axes"] == ("layers", "q_lora", "embed")
  assert built["groups.1.blocks.0.attn.wq_a.weight"][...].shape == (2, cfg.q_lora_rank, cfg.hidden_size)

  back = flat(unstack_layers(stack_layers(nnx.state(unrolled), cfg), cfg))
  original = flat(nnx.state(unrolled))
  assert back.keys() == original.keys()
  for name, var in original.items():
    np.testing.assert_array_equal(back[name][...], var[...], err_msg=name)
    assert type(back[name]) is type(var) and back[name].get_metadata() == var.get_metadata(), name


# --- forward, gradients, routing -----------------------------------------------------------------

def test_forward_and_gradients_match_unrolled(scanned, unrolled_run, scanned_run):
  (loss, out), grads = unrolled_run
  ((s_loss, s_out), s_grads), _ = scanned_run
  close(s_loss, loss, "loss")
  close(s_out.logits, out.logits, "logits")
  close(s_out.mtp_logits, out.mtp_logits, "mtp_logits")
  assert s_out.aux.keys() == out.aux.keys()
  for key in out.aux:
    if key in ("expert_load", "routing", "mtp_expert_load", "dropped_copies"):
      np.testing.assert_array_equal(s_out.aux[key], out.aux[key], err_msg=key)
    else:
      close(s_out.aux[key], out.aux[key], key)
  assert out.aux["routing"].shape == (4, B, S, 2)  # the score-routed layers 2..5
  expected = flat(grads)
  got = flat(unstack_layers(s_grads, scanned.cfg))
  assert got.keys() == expected.keys()
  for name in expected:
    close(got[name][...], expected[name][...], name)
  assert np.abs(got["layers.4.attn.indexer.wq_b.weight"][...]).max() > 0  # the indexer's KL reaches the scan


def test_routing_and_router_bias_match_unrolled(unrolled, scanned, batch, unrolled_run, scanned_run):
  (_, out), _ = unrolled_run
  ((_, s_out), _), route = scanned_run
  np.testing.assert_array_equal(s_out.aux["routing"][:, 1], batch["routing"][:, 1])  # given: used
  np.testing.assert_array_equal(route[:, 0], out.aux["routing"][:, 0])  # row 0: the routers' own choice
  a, b = nnx.clone(unrolled), nnx.clone(scanned)
  a.balance_router_bias(out.aux, 0.01)
  b.balance_router_bias(out.aux, 0.01)
  biases = flat(nnx.state(a, nnx.Not(nnx.Param)))
  stacked = flat(unstack_layers(nnx.state(b, nnx.Not(nnx.Param)), b.cfg))
  for name, var in biases.items():
    np.testing.assert_array_equal(stacked[name][...], var[...], err_msg=name)
  before = flat(nnx.state(unrolled, nnx.Not(nnx.Param)))
  assert not np.array_equal(biases["layers.3.ffn.gate.bias"][...], before["layers.3.ffn.gate.bias"][...])


# --- remat ---------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def block_case():
  """A score-routed sliding-window block (layer 6: the MTP layer's kind) and inputs for it."""
  cfg = tiny_config(**SCAN)
  block = randomize(Block(cfg, 6, rngs=nnx.Rngs(2)), seed=2)
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((B, S, cfg.hc_mult, cfg.hidden_size)), jnp.float32)
  return block, x, jnp.asarray(rng.integers(0, 256, (B, S)), jnp.int32)


def block_grads(block_case, remat: str):
  """Gradients (parameters, input streams) of a scalar of the output streams and the balance loss."""
  block, x, ids = block_case
  graphdef, params, extra = nnx.split(block, nnx.Param, ...)
  positions, segment_ids = jnp.broadcast_to(jnp.arange(S), (B, S)), jnp.ones((B, S), jnp.int32)

  def loss(params, x):
    y, aux, _ = run_block(nnx.merge(graphdef, params, extra), x, ids, positions, segment_ids, remat=remat)
    return jnp.sum(jnp.sin(y)) + aux["balance_loss"]

  return jax.jit(jax.grad(loss, argnums=(0, 1)))(params, x)


@pytest.fixture(scope="module")
def block_reference(block_case):
  return block_grads(block_case, "none")


@pytest.mark.parametrize("remat", ["full", "save_dots"])
def test_remat_gives_the_same_gradients(block_case, block_reference, remat):
  got = block_grads(block_case, remat)
  close(got[1], block_reference[1], f"{remat}: input streams")
  for (name, var), (_, ref) in zip(nnx.to_flat_state(got[0]), nnx.to_flat_state(block_reference[0]), strict=True):
    close(var[...], ref[...], f"{remat}: {'.'.join(map(str, name))}")


@pytest.mark.parametrize("scan,remat", [(True, "full"), (False, "save_dots")])
def test_remat_wraps_every_block(scan, remat):
  """The policy reaches every traced block: once per scan body position or unrolled layer, and the MTP block."""
  model = nnx.eval_shape(lambda: Transformer(tiny_config(**SCAN, scan_layers=scan, remat=remat), rngs=nnx.Rngs(0)))
  graphdef, state = nnx.split(model)
  ids = jax.ShapeDtypeStruct((B, S), jnp.int32)
  jaxpr = str(jax.make_jaxpr(lambda state, ids: nnx.merge(graphdef, state)(ids).logits)(state, ids))
  blocks = sum(group.period for group, _ in model.layer_groups()) + 1
  policy = REMAT_POLICIES[remat]  # printed as its name (a function) or its repr (DotsSaveable(...))
  assert jaxpr.count(getattr(policy, "__name__", repr(policy))) == blocks


# --- decoding ------------------------------------------------------------------------------------

def test_decode_matches_unrolled(scanned, batch, unrolled_run):
  """Row 0's tokens (the routers' own choice in the reference) as two prompts of 25 and 20 tokens
  (right-padded), then 5 teacher-forced decode steps per prompt."""
  (_, out), _ = unrolled_run
  ids, reference = np.asarray(batch["input_ids"])[0], np.asarray(out.logits)[0]
  lengths = np.array([25, 20])
  logits, cache = prefill(scanned, np.where(np.arange(25) < lengths[:, None], ids[:25], 0), S, lengths=lengths)
  for row, length in enumerate(lengths):
    close(logits[row, :length], reference[:length], f"prefill row {row}")
  for step in range(5):
    step_logits, cache = decode(scanned, ids[lengths + step][:, None], cache)
    close(step_logits[:, 0], reference[lengths + step], f"decode step {step}")


# --- the released layout -------------------------------------------------------------------------

def test_released_checkpoint_roundtrip(unrolled, tmp_path):
  save_checkpoint(unrolled, tmp_path / "unrolled")
  loaded = load_model(tmp_path / "unrolled", scan_layers=True)
  assert loaded.cfg.scan_layers and not hasattr(loaded, "layers")
  expected = flat(stack_layers(nnx.state(unrolled), loaded.cfg))
  got = flat(nnx.state(loaded))
  assert got.keys() == expected.keys()
  for name, var in expected.items():
    np.testing.assert_array_equal(got[name][...], var[...], err_msg=name)
    assert got[name].get_metadata()["logical_axes"] == var.get_metadata()["logical_axes"], name

  save_checkpoint(loaded, tmp_path / "scanned")
  released = {}
  for name in ("unrolled", "scanned"):
    released[name] = {}
    for file in sorted((tmp_path / name).glob("*.safetensors")):
      released[name].update(load_file(file))
  assert released["scanned"].keys() == released["unrolled"].keys()
  assert "layers.5.attn.compressor.wkv.weight" in released["scanned"]
  for name, value in released["unrolled"].items():
    np.testing.assert_array_equal(released["scanned"][name], value, err_msg=name)
  assert (tmp_path / "scanned" / "config.json").read_text() == (tmp_path / "unrolled" / "config.json").read_text()


# --- configuration -------------------------------------------------------------------------------

def test_config_values_and_layers_attribute(scanned):
  fields = dict(tiny_config(**SCAN).__dict__)
  for remat in REMAT_POLICIES:
    assert ModelConfig(**{**fields, "remat": remat}).remat == remat
  with pytest.raises(ConfigError, match=r"remat: expected one of \('none', 'full', 'save_dots'\), got 'dots'"):
    ModelConfig(**{**fields, "remat": "dots"})
  with pytest.raises(ConfigError, match="scan_layers: expected true or false, got 'yes'"):
    ModelConfig(**{**fields, "scan_layers": "yes"})
  with pytest.raises(ConfigError, match="model.scan_layers"):
    from_mapping(ModelConfig, {**fields, "scan_layers": "maybe"}, "model")
  hub = tiny_config(**SCAN, scan_layers=True, remat="full").to_hf_config()
  assert "scan_layers" not in hub and "remat" not in hub
  with pytest.raises(AttributeError, match=r"scan_layers=True.*groups"):
    scanned.layers  # noqa: B018
