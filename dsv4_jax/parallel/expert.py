"""Expert parallelism: the routed experts sharded over the mesh axis `expert`, token copies sent by all-to-all.

With P devices on `expert`, device p holds experts [p·E/P, (p+1)·E/P) and its share of the tokens (split
over every batch axis: data, fsdp, expert). Each token copy
(token t, its k-th expert e, weight w) goes to device e // (E/P) and back:
  dispatch   each device packs its copies by destination into a buffer [P, cap, d] (at most `cap` copies per
             destination; the rest are dropped and counted) and `all_to_all` swaps the buffers;
  compute    the received copies are sorted by local expert and run through the SwiGLU experts with
             `jax.lax.ragged_dot` (the same arithmetic as layers/moe.RoutedExperts);
  combine    a second `all_to_all` returns the outputs, which are weighted and added into their tokens.
The copies are split into `waves` groups with their own dispatch / compute / combine, independent of each
other, so that XLA's scheduler can overlap wave k + 1's dispatch and wave k − 1's combine with wave k's
expert compute (asynchronous collectives on TPU / GPU; on CPU they run in order).
cap = ceil(capacity_factor · T_local · K / P / waves) per destination and wave: with capacity_factor ≥ P
nothing can be dropped (every copy of a device may go to one destination).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P

from dsv4_jax.parallel.mesh import LOGICAL_RULES, axis_size

AXIS = "expert"


def expert_size() -> int:
  """Devices of the `expert` axis in the current mesh (1: the layers run unsharded; see mesh.axis_size)."""
  return axis_size(AXIS)


def capacity(tokens: int, topk: int, devices: int, waves: int, capacity_factor: float) -> int:
  """Slots per (destination, wave) in the dispatch buffer of one device holding `tokens` tokens."""
  return max(1, math.ceil(capacity_factor * tokens * topk / devices / waves))


def _expert_mlp(xs, local_ids, valid, w1, w2, w3, swiglu, limit, dtype):
  """Copies xs [R, d] of local experts local_ids [R] (valid [R]) -> expert outputs [R, d] fp32 (0 if invalid)."""
  e_local = w1.shape[0]
  key = jnp.where(valid, local_ids, e_local)  # invalid copies sort last, outside every group
  order = jnp.argsort(key, stable=True)
  group_sizes = jnp.bincount(key, length=e_local + 1)[:e_local].astype(jnp.int32)
  xs = xs[order].astype(dtype)
  w1t, w3t, w2t = (jnp.swapaxes(w, 1, 2).astype(dtype) for w in (w1, w3, w2))
  h = swiglu(jax.lax.ragged_dot(xs, w1t, group_sizes), jax.lax.ragged_dot(xs, w3t, group_sizes), limit)
  ys = jax.lax.ragged_dot(h.astype(dtype), w2t, group_sizes).astype(jnp.float32)
  ys = jnp.where((jnp.arange(xs.shape[0]) < jnp.sum(group_sizes))[:, None], ys, 0.0)
  return jnp.zeros_like(ys).at[order].set(ys)


def routed_experts(x, ids, weights, w1, w2, w3, *, swiglu, limit: float, dtype, waves: int = 1,
                   capacity_factor: float = 2.0):
  """Σ_k weights_k · expert_{ids_k}(x) with the experts sharded over `expert` (see the module docstring).

  x [T, d], ids / weights [T, K]; w1, w3 [E, F, d], w2 [E, d, F] (the full arrays; sharded here over
  `expert`). swiglu(gate, up, limit): the activation. T need not divide by P (padding tokens are added and
  send nothing). Returns (y [T, d] fp32, dropped: the number of token copies that found no slot, summed
  over all devices).
  """
  devices = expert_size()
  t, k = ids.shape
  e = w1.shape[0]
  if e % devices:
    raise ValueError(f"expert parallelism over {devices} devices: the {e} experts must divide evenly")
  # Tokens are split over every mesh axis the batch is (data, fsdp, expert: all manual here, so that the
  # packing below runs on each device's own tokens); the all-to-alls run over `expert` alone.
  mesh = jax.sharding.get_abstract_mesh()
  token_axes = tuple(a for a in LOGICAL_RULES["batch"] if a == AXIS or mesh.shape.get(a, 1) > 1)
  shards = math.prod(mesh.shape[a] for a in token_axes)
  pad = -t % shards  # padding tokens (expert −1) send nothing
  x, weights = jnp.pad(x, [(0, pad), (0, 0)]), jnp.pad(weights, [(0, pad), (0, 0)])
  ids = jnp.pad(ids, [(0, pad), (0, 0)], constant_values=-1)
  e_local, t_local = e // devices, (t + pad) // shards
  cap = capacity(t_local, k, devices, waves, capacity_factor)

  def local(x, ids, weights, w1, w2, w3):
    copies = t_local * k
    flat_ids = ids.reshape(-1)
    real = flat_ids >= 0
    dest = jnp.where(real, flat_ids // e_local, 0)                                 # [copies]
    # rank of each copy among the copies to the same destination, in token order
    sent = jax.nn.one_hot(dest, devices, dtype=jnp.int32) * real[:, None]
    rank = jnp.cumsum(sent, axis=0)[jnp.arange(copies), dest] - 1
    wave, slot = rank // cap, rank % cap
    kept = real & (wave < waves)
    dropped = jnp.sum(real & ~kept).astype(jnp.int32)
    token = jnp.arange(copies) // k
    y = jnp.zeros((t_local, x.shape[-1]), jnp.float32)
    for w in range(waves):   # independent waves: XLA may overlap one's transfers with another's compute
      mine = kept & (wave == w)
      target = jnp.where(mine, dest * cap + slot, devices * cap)   # out of range: not sent
      send_x = jnp.zeros((devices * cap, x.shape[-1]), x.dtype).at[target].set(x[token], mode="drop")
      send_e = jnp.full((devices * cap,), -1, jnp.int32).at[target].set(flat_ids % e_local, mode="drop")
      recv_x = jax.lax.all_to_all(send_x, AXIS, 0, 0, tiled=True)   # [P·cap, d]: cap rows from each device
      recv_e = jax.lax.all_to_all(send_e, AXIS, 0, 0, tiled=True)
      out = _expert_mlp(recv_x, recv_e, recv_e >= 0, w1, w2, w3, swiglu, limit, dtype)
      back = jax.lax.all_to_all(out, AXIS, 0, 0, tiled=True)         # each output to its copy's device
      got = back[jnp.clip(target, 0, devices * cap - 1)] * (mine * weights.reshape(-1))[:, None]
      y = y.at[token].add(got)
    return y, jax.lax.psum(dropped, token_axes)

  tokens, experts = P(token_axes), P(AXIS)
  y, dropped = jax.shard_map(local, in_specs=(tokens, tokens, tokens, experts, experts, experts),
                             out_specs=(tokens, P()), axis_names=set(token_axes))(x, ids, weights, w1, w2, w3)
  return y[:t], dropped
