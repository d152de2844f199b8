"""MoE routing and experts against a dense NumPy loop over experts (the MoE routing of the DeepSeek-V4 release).

  s = sqrt(softplus(x Wgᵀ));  ids = top-K(s + bias) or tid2eid[token];  w = s[ids] / Σ s[ids] · scale
  expert(x) = w2(silu(min(w1 x, L)) ⊙ clip(w3 x, −L, L));   y = Σ_k w_k expert_{ids_k}(x) + shared(x)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dsv4_jax.layers.moe import MoE, swiglu
from tests.helpers import randomize, tiny_config

T = 40


def np_scores(x, weight):
  logits = x.astype(np.float64) @ np.asarray(weight, np.float64).T
  return np.sqrt(np.logaddexp(0.0, logits))


def np_silu(v):
  return v / (1.0 + np.exp(-v))


def np_expert(x, w1, w2, w3, limit):
  gate = np.minimum(x @ np.asarray(w1, np.float64).T, limit)
  up = np.clip(x @ np.asarray(w3, np.float64).T, -limit, limit)
  return (np_silu(gate) * up) @ np.asarray(w2, np.float64).T


def make_moe(hash_routed, seed, scale=0.3):
  cfg = tiny_config()
  moe = randomize(MoE(cfg, hash_routed=hash_routed, rngs=nnx.Rngs(seed)), seed=seed, scale=scale)
  return cfg, moe


def inputs(cfg, seed, scale=1.0):
  rng = np.random.default_rng(seed)
  x = (rng.standard_normal((T, cfg.hidden_size)) * scale).astype(np.float32)
  tokens = rng.integers(0, cfg.vocab_size, (T,)).astype(np.int32)
  return x, tokens


def test_swiglu_clamps_gate_above_and_up_both_sides():
  gate = np.array([-30.0, -3.0, 0.5, 9.9, 10.0, 12.0, 50.0], np.float32)
  up = np.array([-50.0, -11.0, -2.0, 3.0, 10.5, 40.0, 0.1], np.float32)
  expected = np_silu(np.minimum(gate, 10.0)) * np.clip(up, -10.0, 10.0)
  np.testing.assert_allclose(np.asarray(swiglu(gate, up, 10.0)), expected, rtol=1e-6)
  # Large gate values are clamped to 10: silu(50) would be 50, the clamped value is silu(10).
  assert abs(float(swiglu(jnp.float32(50.0), jnp.float32(1.0), 10.0)) - np_silu(10.0)) < 1e-5
  # The gate is clamped only from above: very negative gates are not raised to −10.
  assert float(swiglu(jnp.float32(-30.0), jnp.float32(1.0), 10.0)) == pytest.approx(np_silu(-30.0), abs=1e-9)


def test_hash_gate_picks_tid2eid_of_token():
  cfg, moe = make_moe(True, 0)
  gate = moe.gate
  x, tokens = inputs(cfg, 1)
  assert not isinstance(gate.tid2eid, nnx.Param)
  ids, weights, _ = gate(jnp.asarray(x), jnp.asarray(tokens))
  np.testing.assert_array_equal(np.asarray(ids), np.asarray(gate.tid2eid[...])[tokens])

  # A custom table: the ids follow it, whatever the router scores say.
  rng = np.random.default_rng(2)
  table = np.stack([rng.permutation(cfg.n_routed_experts)[:cfg.num_experts_per_tok]
                    for _ in range(cfg.vocab_size)]).astype(np.int32)
  gate.tid2eid[...] = jnp.asarray(table)
  ids, weights, _ = jax.jit(lambda x, t: nnx.merge(*nnx.split(gate))(x, t))(jnp.asarray(x), jnp.asarray(tokens))
  np.testing.assert_array_equal(np.asarray(ids), table[tokens])
  s = np_scores(x, gate.weight[...])
  expected = np.take_along_axis(s, table[tokens], -1)
  expected = expected / expected.sum(-1, keepdims=True) * cfg.routed_scaling_factor
  np.testing.assert_allclose(np.asarray(weights), expected, rtol=1e-5)


def test_score_gate_uses_bias_for_selection_only():
  cfg, moe = make_moe(False, 3)
  gate = moe.gate
  assert not isinstance(gate.bias, nnx.Param)
  x, tokens = inputs(cfg, 4)
  s = np_scores(x, gate.weight[...])
  bias = np.random.default_rng(5).standard_normal(cfg.n_routed_experts) * np.std(s)
  gate.bias[...] = jnp.asarray(bias, jnp.float32)
  ids, weights, scores = gate(jnp.asarray(x), jnp.asarray(tokens))
  np.testing.assert_allclose(np.asarray(scores), s, rtol=1e-5)
  expected_ids = np.argsort(-(s + bias), axis=-1)[:, :cfg.num_experts_per_tok]
  np.testing.assert_array_equal(np.sort(np.asarray(ids), -1), np.sort(expected_ids, -1))
  # The bias changes the choice for some tokens (else this test would not test it) ...
  plain = np.sort(np.argsort(-s, axis=-1)[:, :cfg.num_experts_per_tok], -1)
  assert np.any(plain != np.sort(expected_ids, -1))
  # ... but the weights are the unbiased scores, normalised and scaled.
  chosen = np.take_along_axis(s, np.asarray(ids), -1)
  np.testing.assert_allclose(np.asarray(weights), chosen / chosen.sum(-1, keepdims=True) * cfg.routed_scaling_factor,
                             rtol=1e-5)
  np.testing.assert_allclose(np.asarray(weights).sum(-1), cfg.routed_scaling_factor, rtol=1e-5)


@pytest.mark.parametrize("hash_routed", [False, True])
def test_moe_matches_dense_expert_loop(hash_routed):
  cfg, moe = make_moe(hash_routed, 6, scale=2.0)  # large weights so that SwiGLU clamping is active
  x, tokens = inputs(cfg, 7, scale=3.0)
  mask = np.ones((1, T), bool)
  mask[0, -5:] = False
  y, aux = nnx.jit(lambda m, *a: m(*a))(moe, jnp.asarray(x)[None], jnp.asarray(tokens)[None], jnp.asarray(mask))
  ids, weights, _ = moe.gate(jnp.asarray(x), jnp.asarray(tokens))
  ids, weights = np.asarray(ids), np.asarray(weights, np.float64)

  x64 = x.astype(np.float64)
  w1, w2, w3 = (np.asarray(v[...]) for v in (moe.experts.w1, moe.experts.w2, moe.experts.w3))
  sh = moe.shared_experts
  expected = np_expert(x64, sh.w1.weight[...], sh.w2.weight[...], sh.w3.weight[...], cfg.swiglu_limit)
  pre_clamp = []
  for e in range(cfg.n_routed_experts):
    out_e = np_expert(x64, w1[e], w2[e], w3[e], cfg.swiglu_limit)
    pre_clamp.append(np.abs(x64 @ w3[e].T).max())
    coef = np.sum(np.where(ids == e, weights, 0.0), axis=-1)
    expected += coef[:, None] * out_e
  assert max(pre_clamp) > cfg.swiglu_limit  # clamping is exercised
  np.testing.assert_allclose(np.asarray(y)[0], expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())

  real = mask[0]
  load = np.array([np.sum(ids[real] == e) for e in range(cfg.n_routed_experts)])
  np.testing.assert_array_equal(np.asarray(aux["expert_load"]), load)
  if hash_routed:
    assert float(aux["balance_loss"]) == 0.0
  else:
    s = np_scores(x, moe.gate.weight[...])[real]
    f = load * cfg.n_routed_experts / (cfg.num_experts_per_tok * real.sum())
    p = (s / s.sum(-1, keepdims=True)).mean(0)
    np.testing.assert_allclose(float(aux["balance_loss"]), np.sum(f * p), rtol=1e-5)


def test_given_routing_uses_those_experts_with_current_gate_scores():
  """Routing indices given to a score-routed MoE (anticipatory routing): the experts are the given ones,
  whatever the scores and bias say; their weights are this call's scores at those experts, normalised
  and scaled; the output is the dense expert loop with those experts and weights."""
  cfg, moe = make_moe(False, 8, scale=1.0)
  x, tokens = inputs(cfg, 9)
  rng = np.random.default_rng(10)
  given = np.stack([rng.permutation(cfg.n_routed_experts)[:cfg.num_experts_per_tok] for _ in range(T)]).astype(np.int32)
  chosen, _, _ = moe.gate(jnp.asarray(x), jnp.asarray(tokens))
  assert np.any(np.sort(np.asarray(chosen), -1) != np.sort(given, -1))   # differs from the gate's own choice
  y, aux = moe(jnp.asarray(x)[None], jnp.asarray(tokens)[None], jnp.ones((1, T), bool),
               routing=jnp.asarray(given)[None])
  np.testing.assert_array_equal(np.asarray(aux["routing"])[0], given)

  s = np_scores(x, moe.gate.weight[...])
  w = np.take_along_axis(s, given, -1)
  w = w / w.sum(-1, keepdims=True) * cfg.routed_scaling_factor
  _, weights, _ = moe.gate(jnp.asarray(x), jnp.asarray(tokens), jnp.asarray(given))
  np.testing.assert_allclose(np.asarray(weights), w, rtol=1e-5)
  x64 = x.astype(np.float64)
  sh = moe.shared_experts
  expected = np_expert(x64, sh.w1.weight[...], sh.w2.weight[...], sh.w3.weight[...], cfg.swiglu_limit)
  w1, w2, w3 = (np.asarray(v[...]) for v in (moe.experts.w1, moe.experts.w2, moe.experts.w3))
  for e in range(cfg.n_routed_experts):
    coef = np.sum(np.where(given == e, w, 0.0), -1)
    expected += coef[:, None] * np_expert(x64, w1[e], w2[e], w3[e], cfg.swiglu_limit)
  np.testing.assert_allclose(np.asarray(y)[0], expected, rtol=2e-4, atol=2e-4 * np.abs(expected).max())
  np.testing.assert_array_equal(np.asarray(aux["expert_load"]),
                                np.bincount(given.reshape(-1), minlength=cfg.n_routed_experts))

  # MoE.route is the gate's own choice; routing with it reproduces the unrouted call exactly.
  own = moe.route(jnp.asarray(x)[None], jnp.asarray(tokens)[None])
  np.testing.assert_array_equal(np.asarray(own)[0], np.asarray(chosen))
  plain, _ = moe(jnp.asarray(x)[None], jnp.asarray(tokens)[None], jnp.ones((1, T), bool))
  again, _ = moe(jnp.asarray(x)[None], jnp.asarray(tokens)[None], jnp.ones((1, T), bool), routing=own)
  np.testing.assert_array_equal(np.asarray(again), np.asarray(plain))


def test_hash_routed_gate_refuses_given_routing():
  cfg, moe = make_moe(True, 11)
  x, tokens = inputs(cfg, 12)
  with pytest.raises(ValueError, match="hash-routed gate takes its experts from tid2eid"):
    moe.gate(jnp.asarray(x), jnp.asarray(tokens), jnp.zeros((T, cfg.num_experts_per_tok), jnp.int32))
  cfg, moe = make_moe(False, 11)
  with pytest.raises(ValueError, match=r"routing indices: expected shape \(40, 2\)"):
    moe.gate(jnp.asarray(x), jnp.asarray(tokens), jnp.zeros((T, 3), jnp.int32))
