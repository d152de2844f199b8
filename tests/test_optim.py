"""Optimizer tests: Newton-Schulz, per-expert Muon, update RMS, decoupled weight decay, partition, schedule.

References are independent of the code under test: SVD polar factors (numpy float64), closed-form
schedules and decays, and an explicit per-name table of expected optimizer groups (checked against
the `optimizer` metadata each layer declares).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from dsv4_jax.optim import (ADAMW, HYBRID_NS_COEFFS, MUON, OptimizerConfig, build_optimizer,
                            learning_rate_schedule, newton_schulz, orthogonalize, param_group_rows,
                            param_group_table, param_groups, scale_by_muon)
from tests.helpers import tiny_model

NS_SHAPES = [(32, 64), (64, 32), (48, 48), (8, 128), (128, 8), (100, 30)]


def polar_factor(x: np.ndarray) -> np.ndarray:
  """U Vᵀ of x = U S Vᵀ (float64), the exact orthogonalisation Newton-Schulz approximates."""
  u, _, vt = np.linalg.svd(np.asarray(x, np.float64), full_matrices=False)
  return u @ vt


def rms(x) -> float:
  return float(np.sqrt(np.mean(np.square(np.asarray(x, np.float64)))))


def muon(x) -> nnx.Param:
  return nnx.Param(jnp.asarray(x, jnp.float32), optimizer=MUON)


def adamw(x) -> nnx.Param:
  return nnx.Param(jnp.asarray(x, jnp.float32), optimizer=ADAMW)


@pytest.fixture(scope="module")
def tiny():
  return tiny_model(0)


@pytest.fixture(scope="module")
def tiny_params(tiny):
  return nnx.state(tiny, nnx.Param)


# ---------------------------------------------------------------- Newton-Schulz

def test_newton_schulz_singular_values_near_one():
  """Gaussian matrices of 6 shapes (square, wide, tall; condition numbers up to ~850), 3 draws each.

  Observed band of singular values after the hybrid iteration (8 fast + 2 final steps, fp32):
  [0.9999999, 1.00054]. Asserted band: [0.999, 1.002]. The final (2, −1.5, 0.5) steps matter: the 8
  fast steps alone leave the singular values spread over about [0.68, 1.13].
  (Singular values below ~3e-5·‖X‖_F are not lifted to 1 by 8 steps of slope 3.4445; Gaussian
  matrices of these sizes have none.)
  """
  rng = np.random.default_rng(0)
  ns = jax.jit(newton_schulz, static_argnums=1)
  fast_only = jax.jit(lambda x: newton_schulz(x, HYBRID_NS_COEFFS[:8]))
  for shape in NS_SHAPES:
    for _ in range(3):
      x = rng.standard_normal(shape).astype(np.float32)
      out = np.asarray(ns(jnp.asarray(x), HYBRID_NS_COEFFS), np.float64)
      assert out.shape == shape
      sv = np.linalg.svd(out, compute_uv=False)
      assert 0.999 <= sv.min() and sv.max() <= 1.002, (shape, sv.min(), sv.max())
      # Same singular vectors as x: close to the exact polar factor in spectral norm.
      assert np.linalg.norm(out - polar_factor(x), ord=2) < 2e-3, shape
      if shape in NS_SHAPES[:2]:
        sv_fast = np.linalg.svd(np.asarray(fast_only(jnp.asarray(x)), np.float64), compute_uv=False)
        assert np.abs(sv_fast - 1).max() > 0.05, (shape, sv_fast.min(), sv_fast.max())


def test_newton_schulz_zero_stays_zero():
  assert np.all(np.asarray(newton_schulz(jnp.zeros((4, 8)))) == 0)


# ---------------------------------------------------------------- per-expert Muon

def test_expert_stack_is_orthogonalised_per_expert():
  """[E, out, in] with wildly different per-expert scales: equals orthogonalising each expert alone."""
  rng = np.random.default_rng(1)
  scales = np.array([1.0, 10.0, 1e-2, 1e3], np.float32)
  stack = rng.standard_normal((4, 16, 32)).astype(np.float32) * scales[:, None, None]
  out = np.asarray(jax.jit(orthogonalize)(jnp.asarray(stack)))
  for e in range(4):
    alone = np.asarray(orthogonalize(jnp.asarray(stack[e])))
    np.testing.assert_allclose(out[e], alone, atol=1e-5)
    np.testing.assert_allclose(out[e], polar_factor(stack[e]), atol=2e-3)
  # Treating the stack as one [E·out, in] matrix would be a different (wrong) result.
  joint = polar_factor(stack.reshape(64, 32)).reshape(4, 16, 32)
  assert np.abs(out - joint).max() > 0.1


def test_muon_transform_stack_equals_separate_experts():
  """Two Muon steps (momentum included) on a stack = the same steps on each expert as its own leaf."""
  rng = np.random.default_rng(2)
  grads = [rng.standard_normal((3, 8, 24)).astype(np.float32) * np.array([1, 50, 0.02])[:, None, None]
           for _ in range(2)]
  tx = scale_by_muon()
  update = jax.jit(tx.update)
  stacked = {"w": jnp.zeros((3, 8, 24))}
  separate = {f"w{e}": jnp.zeros((8, 24)) for e in range(3)}
  s_state, p_state = tx.init(stacked), tx.init(separate)
  for g in grads:
    u_stack, s_state = update({"w": jnp.asarray(g)}, s_state)
    u_sep, p_state = update({f"w{e}": jnp.asarray(g[e]) for e in range(3)}, p_state)
    for e in range(3):
      np.testing.assert_allclose(np.asarray(u_stack["w"][e]), np.asarray(u_sep[f"w{e}"]), atol=1e-6)


# ---------------------------------------------------------------- RMS and momentum

def test_muon_update_rms_and_nesterov_momentum():
  """Update = polar(μ M + G) · sqrt(max(n, m)) · 0.18 with M ← μ M + G; RMS 0.18 per matrix/expert."""
  mu, rng = 0.95, np.random.default_rng(3)
  shapes = {"a": (32, 64), "b": (64, 32), "c": (24, 256), "experts": (4, 16, 48)}
  tx = scale_by_muon(momentum=mu, update_rms=0.18)
  state = tx.init({k: jnp.zeros(s) for k, s in shapes.items()})
  momentum = {k: np.zeros(s) for k, s in shapes.items()}
  update = jax.jit(tx.update)
  for _ in range(3):
    grads = {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}
    out, state = update({k: jnp.asarray(g) for k, g in grads.items()}, state)
    for k, shape in shapes.items():
      momentum[k] = mu * momentum[k] + grads[k]
      nesterov = mu * momentum[k] + grads[k]
      mats = nesterov.reshape(-1, *shape[-2:])
      got = np.asarray(out[k]).reshape(mats.shape)
      for got_e, mat in zip(got, mats):
        expected = polar_factor(mat) * math.sqrt(max(mat.shape)) * 0.18
        np.testing.assert_allclose(got_e, expected, atol=0.18 * 2e-3)
        assert abs(rms(got_e) - 0.18) < 2e-4, (k, rms(got_e))


def test_builder_muon_step_has_rms_lr_times_018():
  params = nnx.State({"layers": {0: {"attn": {"wq_a": {"weight": muon(jnp.zeros((32, 64)))}},
                                     "ffn": {"experts": {"w1": muon(jnp.zeros((4, 16, 64)))}}}}})
  config = OptimizerConfig(learning_rate=0.5, warmup_steps=0, total_steps=10, decay_steps=0,
                           weight_decay=0.0, grad_clip_norm=None)
  tx = build_optimizer(config, params)
  grads = jax.tree.map(lambda p: jnp.asarray(np.random.default_rng(4).standard_normal(p.shape), jnp.float32),
                       params)
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  assert abs(rms(updates["layers"][0]["attn"]["wq_a"]["weight"][...]) - 0.5 * 0.18) < 1e-4
  for e in range(4):
    assert abs(rms(updates["layers"][0]["ffn"]["experts"]["w1"][e]) - 0.5 * 0.18) < 1e-4


# ---------------------------------------------------------------- weight decay

def test_weight_decay_is_decoupled_and_lr_scaled():
  """Zero gradient: each trainable parameter shrinks by exactly lr(t)·wd·p (Muon and AdamW alike).

  A coupled L2 term would instead pass wd·p through Newton-Schulz (RMS 0.18 per matrix) or Adam
  (≈ lr·sign(p)), giving very different steps.
  """
  rng = np.random.default_rng(5)
  params = nnx.State({
      "embed": {"weight": adamw(rng.standard_normal((16, 8)))},
      "layers": {0: {"attn": {"wq_a": {"weight": muon(rng.standard_normal((8, 8)))},
                              "attn_sink": adamw(rng.standard_normal((4,)))},
                     "ffn": {"experts": {"w1": muon(rng.standard_normal((2, 4, 8)))}}}},
  })
  config = OptimizerConfig(learning_rate=0.01, warmup_steps=4, total_steps=20, decay_steps=8, weight_decay=0.1)
  tx = build_optimizer(config, params)
  assert param_groups(params)["layers"][0]["attn"]["wq_a"]["weight"].get_value() == MUON
  assert param_groups(params)["embed"]["weight"].get_value() == ADAMW
  update = jax.jit(tx.update)
  state = tx.init(params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for step in range(20):
    lr = closed_form_lr(step, 0.01, 4, 12, 8, 0.1)
    updates, state = update(zeros, state, params)
    new = optax.apply_updates(params, updates)
    for (path, p), n in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(new)):
      p64 = np.asarray(p, np.float64)
      np.testing.assert_allclose(np.asarray(n), p64 - lr * 0.1 * p64, rtol=2e-6, err_msg=str((step, path)))
    params = new


# ---------------------------------------------------------------- partition

# Expected group by (parent, leaf) name for every parameter kind of the model; written out by hand.
EXPECTED_GROUPS = {
    ("embed", "weight"): ADAMW, ("head", "weight"): ADAMW, ("norm", "weight"): ADAMW,
    ("attn_norm", "weight"): ADAMW, ("ffn_norm", "weight"): ADAMW, ("q_norm", "weight"): ADAMW,
    ("kv_norm", "weight"): ADAMW, ("enorm", "weight"): ADAMW, ("hnorm", "weight"): ADAMW,
    ("attn", "attn_sink"): ADAMW, ("compressor", "ape"): ADAMW,
    ("hc_attn", "base"): ADAMW, ("hc_attn", "scale"): ADAMW, ("hc_ffn", "base"): ADAMW,
    ("hc_ffn", "scale"): ADAMW, ("hc_head", "base"): ADAMW, ("hc_head", "scale"): ADAMW,
    ("hc_attn", "fn"): MUON, ("hc_ffn", "fn"): MUON, ("hc_head", "fn"): MUON,
    ("wq_a", "weight"): MUON, ("wq_b", "weight"): MUON, ("wkv", "weight"): MUON, ("wo_a", "weight"): MUON,
    ("wo_b", "weight"): MUON, ("wgate", "weight"): MUON, ("weights_proj", "weight"): MUON,
    ("e_proj", "weight"): MUON, ("h_proj", "weight"): MUON, ("gate", "weight"): MUON,
    ("w1", "weight"): MUON, ("w2", "weight"): MUON, ("w3", "weight"): MUON,
    ("experts", "w1"): MUON, ("experts", "w2"): MUON, ("experts", "w3"): MUON,
}


def test_partition_of_every_tiny_model_parameter(tiny_params):
  print("\n" + param_group_table(tiny_params))
  rows = param_group_rows(tiny_params)
  flat = dict(nnx.to_flat_state(tiny_params))
  assert len(rows) == len(flat)
  seen = set()
  for name, shape, group in rows:
    parts = name.split(".")
    key = (parts[-2], parts[-1])
    assert key in EXPECTED_GROUPS, f"{name}: no expected group written in the test"
    assert group == EXPECTED_GROUPS[key], f"{name} {shape}: got {group}, expected {EXPECTED_GROUPS[key]}"
    seen.add(key)
    if group == MUON:
      assert len(shape) in (2, 3), name
  # Every parameter kind of the table actually occurs in the tiny model (the table is not stale).
  assert seen == set(EXPECTED_GROUPS)
  # The labels tree has the structure of the parameter tree (usable by optax.partition).
  labels = param_groups(tiny_params)
  assert jax.tree.structure(labels) == jax.tree.structure(tiny_params)
  assert jax.tree.leaves(labels) == [r[2] for r in rows]


def test_partition_rejects_an_unknown_matrix():
  with pytest.raises(ValueError, match=r"layers\.0\.mystery\.kernel: expected an nnx.Param.*\(4, 4\)"):
    param_groups({"layers": {0: {"mystery": {"kernel": jnp.zeros((4, 4))}}}})


def test_partition_rejects_a_param_without_optimizer_metadata():
  unannotated, unknown = nnx.Param(jnp.zeros((4, 4))), nnx.Param(jnp.zeros(4), optimizer="sgd")
  for param, got in ((unannotated, "None"), (unknown, "'sgd'")):
    tree = nnx.State({"layers": {0: {"mystery": {"kernel": param}}},
                      "norm": {"weight": adamw(jnp.ones(4))}})
    with pytest.raises(ValueError, match=rf"layers\.0\.mystery\.kernel: .*got optimizer={got}"):
      param_groups(tree)
    with pytest.raises(ValueError, match=r"layers\.0\.mystery\.kernel"):
      build_optimizer(OptimizerConfig(warmup_steps=0, total_steps=10, decay_steps=0), tree)


def test_router_state_is_not_a_parameter(tiny):
  """Router bias and tid2eid are not Params: they never reach the optimizer (an error if passed); every
  Param of a sub-tree moves under one step of random gradients."""
  full = nnx.state(tiny)
  with pytest.raises(ValueError, match=r"layers\.0\.ffn\.gate\.tid2eid: expected an nnx.Param.*HashTable"):
    param_groups(full)
  with pytest.raises(ValueError, match=r"layers\.1\.ffn\.gate\.bias: expected an nnx.Param.*RouterBias"):
    param_groups(nnx.State({"layers": {1: {"ffn": {"gate": full["layers"][1]["ffn"]["gate"]}}}}))
  params = nnx.state(tiny, nnx.Param)
  kinds = {type(v).__name__ for _, v in nnx.to_flat_state(full)} - {"Param"}
  assert kinds == {"RouterBias", "HashTable"}
  assert all(type(v) is nnx.Param for _, v in nnx.to_flat_state(params))

  sub = nnx.State({"layers": {1: {"ffn": params["layers"][1]["ffn"]}}, "norm": params["norm"]})
  config = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=10, decay_steps=0, grad_clip_norm=1.0)
  tx = build_optimizer(config, sub)
  rng = np.random.default_rng(6)
  grads = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), x.dtype), sub)
  updates, _ = jax.jit(tx.update)(grads, tx.init(sub), sub)
  new = optax.apply_updates(sub, updates)
  for (path, old), (_, var) in zip(nnx.to_flat_state(sub), nnx.to_flat_state(new)):
    assert not np.array_equal(np.asarray(var[...]), np.asarray(old[...])), path


def test_gradient_clipping_by_global_norm():
  """Clipping inside the chain = feeding pre-clipped gradients (g·min(1, c/‖g‖)) to an unclipped chain."""
  rng = np.random.default_rng(7)
  params = nnx.State({"layers": {0: {"attn": {"wq_a": {"weight": muon(rng.standard_normal((8, 16)))}}}},
                      "norm": {"weight": adamw(jnp.ones((16,)))}})
  base = OptimizerConfig(learning_rate=1e-2, warmup_steps=0, total_steps=10, decay_steps=0)
  clipped = build_optimizer(base.replace(grad_clip_norm=1.0), params)
  unclipped = build_optimizer(base.replace(grad_clip_norm=None), params)
  s_c, s_u = clipped.init(params), unclipped.init(params)
  update_c, update_u = jax.jit(clipped.update), jax.jit(unclipped.update)
  for scale in (100.0, 0.01, 30.0):  # momentum mixes steps, so differently scaled gradients matter
    grads = jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape) * scale, jnp.float32), params)
    norm = math.sqrt(sum(float(np.sum(np.asarray(g, np.float64) ** 2)) for g in jax.tree.leaves(grads)))
    pre = jax.tree.map(lambda g: g * min(1.0, 1.0 / norm), grads)
    u_c, s_c = update_c(grads, s_c, params)
    u_u, s_u = update_u(pre, s_u, params)
    for a, b in zip(jax.tree.leaves(u_c), jax.tree.leaves(u_u)):
      np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-7)


# ---------------------------------------------------------------- schedule

def closed_form_lr(t: int, peak: float, warmup: int, decay_start: int, tail: int, final: float) -> float:
  if t < warmup:
    return peak * (t + 1) / warmup
  if t < decay_start:
    return peak
  progress = min(1.0, (t - decay_start) / tail)
  return peak * (final + (1 - final) * 0.5 * (1 + math.cos(math.pi * progress)))


def test_schedule_at_key_steps():
  peak = 2.7e-4
  config = OptimizerConfig(learning_rate=peak, warmup_steps=100, total_steps=1000, decay_fraction=0.3)
  assert config.decay_start_step == 700 and config.tail_steps == 300
  lr = learning_rate_schedule(config)
  expected = {0: peak / 100, 49: peak / 2, 99: peak, 100: peak, 400: peak, 699: peak, 700: peak,
              850: peak * 0.55, 1000: peak * 0.1, 5000: peak * 0.1}
  for step, value in expected.items():
    assert float(lr(step)) == pytest.approx(value, rel=1e-5), step
  for step in range(0, 1001, 37):
    assert float(lr(step)) == pytest.approx(closed_form_lr(step, peak, 100, 700, 300, 0.1), rel=1e-5), step
  # An explicit tail length overrides the fraction.
  config = config.replace(decay_steps=100)
  assert config.decay_start_step == 900
  assert float(learning_rate_schedule(config)(950)) == pytest.approx(peak * 0.55, rel=1e-5)


def test_config_rejects_inconsistent_values():
  from dsv4_jax.config import ConfigError, from_mapping
  with pytest.raises(ConfigError, match="warmup_steps"):
    OptimizerConfig(warmup_steps=200, total_steps=100)
  with pytest.raises(ConfigError, match="overlaps the warm-up"):
    OptimizerConfig(warmup_steps=90, total_steps=100, decay_fraction=0.5)
  with pytest.raises(ConfigError, match="unknown optimizer keys"):
    from_mapping(OptimizerConfig, {"lr": 1.0}, "optimizer")
  assert OptimizerConfig().ns_coefficients == ((3.4445, -4.7750, 2.0315),) * 8 + ((2.0, -1.5, 0.5),) * 2
