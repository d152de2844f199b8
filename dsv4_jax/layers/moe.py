"""DeepSeekMoE: sqrt-softplus router, bias-adjusted top-k (or hash routing), clamped SwiGLU experts.

Shapes: x [B, S, d] -> y [B, S, d]; E routed experts, K active per token, F = moe_intermediate_size.
  s = sqrt(softplus(x Wgᵀ))                              [T, E] fp32   (sigmoid / softmax also supported)
  ids = top-K(s + bias)        or   ids = tid2eid[token]  (the first num_hash_layers layers)
        or ids given by the caller where they are >= 0 (score-routed layers; anticipatory routing)
  weights = s[ids] / Σ s[ids] · routed_scaling_factor
  expert(x) = w2(clamp(w1 x, max=L)·σ(clamp(w1 x, max=L)) ⊙ clamp(w3 x, −L, L))   (SwiGLU, fp32)
  y = Σ_k weights_k · expert_{ids_k}(x) + shared_expert(x)
Routed experts run sparsely: token copies are sorted by expert and multiplied with `jax.lax.ragged_dot`.
Under a mesh whose `expert` axis has P > 1 devices, the experts are sharded over it and the token copies
travel to their expert's device and back by all-to-all, in `moe_waves` waves (parallel/expert.py); copies
beyond the dispatch capacity (`moe_capacity_factor`) are dropped and counted (aux["dropped_copies"]).
The router bias and `tid2eid` are not trained by gradients (bias: aux-loss-free balancing, outside).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4_jax.config import ModelConfig
from dsv4_jax.layers.linear import MUON, Linear, param
from dsv4_jax.parallel import expert


class RouterBias(nnx.Variable):
  """The aux-loss-free balancing bias: updated by the training loop, never by gradients."""


class HashTable(nnx.Variable):
  """The fixed token-id → expert-ids table of hash-routed layers."""


def swiglu(gate: jax.Array, up: jax.Array, limit: float) -> jax.Array:
  """silu(min(gate, L)) · clip(up, −L, L) in fp32 (no clamping when L ≤ 0)."""
  gate, up = gate.astype(jnp.float32), up.astype(jnp.float32)
  if limit > 0:
    up = jnp.clip(up, -limit, limit)
    gate = jnp.minimum(gate, limit)
  return jax.nn.silu(gate) * up


def router_scores(logits: jax.Array, scoring_func: str) -> jax.Array:
  logits = logits.astype(jnp.float32)
  if scoring_func == "sqrtsoftplus":
    return jnp.sqrt(jax.nn.softplus(logits))
  if scoring_func == "sigmoid":
    return jax.nn.sigmoid(logits)
  return jax.nn.softmax(logits, axis=-1)


class Expert(nnx.Module):
  """One SwiGLU expert (the shared expert): w1, w3 [F, d], w2 [d, F]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d, f = cfg.hidden_size, cfg.moe_intermediate_size
    self.w1 = Linear(d, f, ("mlp", "embed"), rngs=rngs, cfg=cfg)
    self.w2 = Linear(f, d, ("embed", "mlp"), rngs=rngs, cfg=cfg)
    self.w3 = Linear(d, f, ("mlp", "embed"), rngs=rngs, cfg=cfg)
    self.limit = cfg.swiglu_limit

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.w2(swiglu(self.w1(x), self.w3(x), self.limit))


class RoutedExperts(nnx.Module):
  """E experts stacked on a leading axis: w1, w3 [E, F, d], w2 [E, d, F]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    e, d, f = cfg.n_routed_experts, cfg.hidden_size, cfg.moe_intermediate_size
    pd = jnp.dtype(cfg.param_dtype)
    self.w1 = param(rngs, (e, f, d), ("experts", "mlp", "embed"), std=cfg.init_std, dtype=pd, optimizer=MUON)
    self.w2 = param(rngs, (e, d, f), ("experts", "embed", "mlp"), std=cfg.init_std, dtype=pd, optimizer=MUON)
    self.w3 = param(rngs, (e, f, d), ("experts", "mlp", "embed"), std=cfg.init_std, dtype=pd, optimizer=MUON)
    self.limit, self.dtype = cfg.swiglu_limit, jnp.dtype(cfg.dtype)
    self.waves, self.capacity_factor = cfg.moe_waves, cfg.moe_capacity_factor

  def __call__(self, x: jax.Array, ids: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x [T, d], ids / weights [T, K] -> (Σ_k weights_k · expert_{ids_k}(x) [T, d] fp32, the number of token
    copies dropped for lack of dispatch capacity: always 0 without expert parallelism)."""
    if expert.expert_size() > 1:
      return expert.routed_experts(x, ids, weights, self.w1[...], self.w2[...], self.w3[...], swiglu=swiglu,
                                   limit=self.limit, dtype=self.dtype, waves=self.waves,
                                   capacity_factor=self.capacity_factor)
    t, k = ids.shape
    e = self.w1[...].shape[0]
    flat_ids = ids.reshape(-1)
    order = jnp.argsort(flat_ids, stable=True)
    token = order // k
    group_sizes = jnp.bincount(flat_ids, length=e).astype(jnp.int32)
    xs = x[token].astype(self.dtype)
    w1 = jnp.swapaxes(self.w1[...], 1, 2).astype(self.dtype)  # [E, d, F]
    w3 = jnp.swapaxes(self.w3[...], 1, 2).astype(self.dtype)
    w2 = jnp.swapaxes(self.w2[...], 1, 2).astype(self.dtype)  # [E, F, d]
    h = swiglu(jax.lax.ragged_dot(xs, w1, group_sizes), jax.lax.ragged_dot(xs, w3, group_sizes), self.limit)
    h = h * weights.reshape(-1)[order][:, None]
    ys = jax.lax.ragged_dot(h.astype(self.dtype), w2, group_sizes).astype(jnp.float32)
    return jnp.zeros((t, x.shape[-1]), jnp.float32).at[token].add(ys), jnp.zeros((), jnp.int32)


class Gate(nnx.Module):
  """Router: weight [E, d]; bias [E] (score-routed layers) or tid2eid [V, K] (hash-routed layers)."""

  def __init__(self, cfg: ModelConfig, hash_routed: bool, *, rngs: nnx.Rngs):
    e = cfg.n_routed_experts
    self.weight = param(rngs, (e, cfg.hidden_size), ("experts", "embed"), std=cfg.init_std, optimizer=MUON)
    self.hash_routed = hash_routed
    if hash_routed:
      # A fixed balanced assignment: token v uses experts (v·K + j) mod E.
      table = (np.arange(cfg.vocab_size)[:, None] * cfg.num_experts_per_tok
               + np.arange(cfg.num_experts_per_tok)) % e
      self.tid2eid = HashTable(jnp.asarray(table, jnp.int32), logical_axes=("vocab", None))
    else:
      self.bias = RouterBias(jnp.asarray(np.zeros((e,), np.float32)), logical_axes=("experts",))
    self.topk, self.scoring_func, self.scale = cfg.num_experts_per_tok, cfg.scoring_func, cfg.routed_scaling_factor

  def __call__(self, x: jax.Array, token_ids: jax.Array, ids: jax.Array | None = None):
    """x [T, d], token_ids [T] -> (ids [T, K], weights [T, K], scores [T, E]) (fp32).

    ids [T, K] (score-routed gates only): use these experts instead of the top-K of this call's
    scores, except for tokens whose row is negative (−1: this call's own choice); the weights are
    still this call's scores at the experts used (so they, and their gradients, come from the current
    parameters). Hash-routed gates always take tid2eid[token] (a ValueError if ids are given: their
    choice depends on no parameter, so there is nothing to give).
    """
    scores = router_scores(jnp.einsum("td,ed->te", x.astype(jnp.float32), self.weight[...]), self.scoring_func)
    if self.hash_routed:
      if ids is not None:
        raise ValueError("gate: a hash-routed gate takes its experts from tid2eid; routing indices were given")
      ids = self.tid2eid[...][token_ids]
    else:
      if ids is not None and ids.shape != (x.shape[0], self.topk):
        raise ValueError(f"gate: routing indices: expected shape {(x.shape[0], self.topk)} (tokens, top-k), "
                         f"got {ids.shape}")
      given = ids
      _, ids = jax.lax.top_k(scores + jax.lax.stop_gradient(self.bias[...]), self.topk)
      if given is not None:
        ids = jnp.where(given[:, :1] >= 0, given.astype(ids.dtype), ids)
    weights = jnp.take_along_axis(scores, ids, axis=-1)
    if self.scoring_func != "softmax":
      weights = weights / jnp.sum(weights, axis=-1, keepdims=True)
    return ids, weights * self.scale, scores

  def update_bias(self, load: jax.Array, speed: float) -> None:
    """Aux-loss-free balancing step from this layer's expert loads `load` [E] (a gate of a scanned
    layer group, its bias stacked [R, E]: the loads of those layers [R, E]):

      bias_e ← bias_e + speed · sign(mean_e'(load_e') − load_e)

    (under-loaded experts are raised, over-loaded ones lowered). No-op for hash-routed gates (no bias).
    """
    if self.hash_routed:
      return
    self.bias.value = self.bias[...] + speed * jnp.sign(jnp.mean(load, axis=-1, keepdims=True) - load)


class MoE(nnx.Module):
  """Routed experts + one shared expert. Returns (y, aux) with expert loads and the balance loss."""

  def __init__(self, cfg: ModelConfig, hash_routed: bool, *, rngs: nnx.Rngs):
    self.gate = Gate(cfg, hash_routed, rngs=rngs)
    self.experts = RoutedExperts(cfg, rngs=rngs)
    self.shared_experts = Expert(cfg, rngs=rngs)
    self.n_experts, self.topk = cfg.n_routed_experts, cfg.num_experts_per_tok

  def __call__(self, x: jax.Array, token_ids: jax.Array, token_mask: jax.Array, routing: jax.Array | None = None):
    """x [B, S, d], token_ids [B, S], token_mask [B, S] (False for padding) -> (y [B, S, d], aux).

    routing [B, S, K] int (score-routed layers only): the experts of each token, given instead of
    chosen here (`Gate.__call__`; a token with −1 entries is routed as usual); the gate weights still
    come from the current parameters.
    aux["expert_load"] [E]: routed token count per expert (real tokens only).
    aux["balance_loss"]: sequence-wise balance loss  mean_b Σ_e f_{b,e} P_{b,e} with
      f = E/(K·T_b) · count of tokens choosing e,  P = mean over tokens of s_e / Σ s (0 for hash layers).
    aux["routing"] [B, S, K] int32: the experts each token used.
    aux["dropped_copies"]: token copies dropped by expert parallelism's dispatch capacity (0 without it).
    """
    b, s, d = x.shape
    flat = x.reshape(b * s, d)
    given = None if routing is None else routing.reshape(b * s, self.topk)
    ids, weights, scores = self.gate(flat, token_ids.reshape(-1), given)
    routed, dropped = self.experts(flat, ids, weights)
    y = routed + self.shared_experts(flat).astype(jnp.float32)  # independent: runs while the copies travel

    mask = token_mask.reshape(b, s).astype(jnp.float32)
    chosen = jax.nn.one_hot(ids, self.n_experts, dtype=jnp.float32).sum(axis=1).reshape(b, s, -1)
    load = jnp.sum(chosen * mask[..., None], axis=(0, 1))
    if self.gate.hash_routed:
      balance = jnp.zeros((), jnp.float32)
    else:
      n_tok = jnp.maximum(jnp.sum(mask, axis=1), 1.0)[:, None]
      f = jnp.sum(chosen * mask[..., None], axis=1) * self.n_experts / (self.topk * n_tok)
      probs = (scores / jnp.sum(scores, axis=-1, keepdims=True)).reshape(b, s, -1)
      p = jnp.sum(probs * mask[..., None], axis=1) / n_tok
      balance = jnp.mean(jnp.sum(f * p, axis=-1))
    return y.reshape(b, s, d).astype(x.dtype), {"expert_load": load, "balance_loss": balance,
                                                "routing": ids.reshape(b, s, self.topk), "dropped_copies": dropped}

  def route(self, x: jax.Array, token_ids: jax.Array) -> jax.Array:
    """The router alone: x [B, S, d], token_ids [B, S] -> the experts each token would use [B, S, K] int32."""
    b, s, d = x.shape
    ids, _, _ = self.gate(x.reshape(b * s, d), token_ids.reshape(-1))
    return ids.reshape(b, s, self.topk)
