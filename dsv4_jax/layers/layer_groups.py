"""Scanned layer groups: consecutive blocks of one kind run as one `jax.lax.scan` over stacked variables.

A main layer's kind is (compress ratio, hash-routed): blocks of one kind have the same variables, shapes
and static attributes, so a run of them can share one traced and compiled body. `plan_layer_groups`
cuts the L main layers into groups in order: from each layer on, the longest stretch that is `repeats`
(≥ 2) copies of a unit of `period` (≤ MAX_PERIOD) consecutive kinds, the shorter unit on a tie; a layer
that starts no such stretch is a group of its own (period 1, repeats 1). Layer j of repeat k of a group
is layer first + k·period + j. Flash (ratios 0, 0, 4, then 128, 4 alternating; 3 hash layers):
layers 0–1 (window, hash) ×2, layer 2 alone, layers 3–42 (HCA, CSA) ×20.

With `scan_layers`, `Transformer.groups` holds per group a `Block` (a layer alone) or a `ScannedBlocks`
(repeats ≥ 2): `period` Blocks whose every variable is stacked over the R repeats, [R, ...], logical axis
"layers" first. E.g. groups.2.blocks.1.attn.wq_a.weight [20, q_lora, d] holds layers.4, layers.6, …,
layers.42 (Flash). The scan's body runs one unit: per step, `period` blocks on X [B, S, N, d]; the
per-layer aux, decoding caches and given routing travel as stacked scan inputs / outputs [R, ...].
`stack_layers` / `unstack_layers` map a state between that layout and the unrolled one (layers.N.*,
the released checkpoint's names); `unrolled_paths` maps one path.

`run_block` calls one block under the rematerialisation policy `remat` (ModelConfig.remat): "none"
(keep what autodiff keeps), "full" (`jax.checkpoint`: keep only the block's inputs, recompute the rest
in the backward pass), "save_dots" (keep the outputs of matmuls without batch dimensions, i.e. the
projections, recompute the rest).
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4_jax.config import ModelConfig
from dsv4_jax.layers.block import Block
from dsv4_jax.parallel.mesh import constrain

STREAMS_AXES = ("batch", "seq", "streams", "act_embed")  # X [B, S, N, d]
MAX_PERIOD = 4  # the longest repeating unit looked for
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@dataclasses.dataclass(frozen=True)
class LayerGroup:
  """Main layers first .. first + period·repeats − 1: `repeats` copies of a unit of `period` layers."""
  first: int
  period: int = 1
  repeats: int = 1

  @property
  def layers(self) -> range:
    return range(self.first, self.first + self.period * self.repeats)

  @property
  def scanned(self) -> bool:
    return self.repeats > 1


def layer_kind(cfg: ModelConfig, layer: int) -> tuple[int, bool]:
  """(compress ratio, hash-routed) of main layer `layer`: what decides a Block's structure."""
  return cfg.compress_ratios[layer], layer < cfg.num_hash_layers


def plan_layer_groups(cfg: ModelConfig) -> tuple[LayerGroup, ...]:
  """The groups of cfg's main layers, in layer order (see the module docstring; independent of
  cfg.scan_layers, which decides whether the model uses them)."""
  n = cfg.num_hidden_layers
  kinds = [layer_kind(cfg, i) for i in range(n)]
  groups, i = [], 0
  while i < n:
    best = LayerGroup(i)
    for period in range(1, MAX_PERIOD + 1):
      unit, repeats = kinds[i:i + period], 1
      while kinds[i + repeats * period:i + (repeats + 1) * period] == unit:
        repeats += 1
      if repeats > 1 and period * repeats > len(best.layers):
        best = LayerGroup(i, period, repeats)
    groups.append(best)
    i += len(best.layers)
  return tuple(groups)


# --- stacked variables --------------------------------------------------------------------------

def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def stack_variables(*variables: nnx.Variable) -> nnx.Variable:
  """R variables of one shape (one per layer) -> one [R, ...], its logical axes ("layers", ...)."""
  first = variables[0]
  axes = first.get_metadata().get("logical_axes") or (None,) * first[...].ndim
  return first.replace(jnp.stack([v[...] for v in variables]), logical_axes=("layers", *axes))


def variable_at(var: nnx.Variable, k: int) -> nnx.Variable:
  """Layer k of a stacked variable [R, ...] -> [...], "layers" dropped from its logical axes."""
  return var.replace(var[...][k], logical_axes=tuple(var.get_metadata()["logical_axes"][1:]))


def stack_blocks(blocks: Sequence[Block]) -> Block:
  """Blocks of one kind -> one Block whose every variable is stacked over them, [R, ...]."""
  splits = [nnx.split(block) for block in blocks]
  graphdef = splits[0][0]
  if any(g != graphdef for g, _ in splits):
    raise ValueError("stack_blocks: the blocks differ in structure (layers of different kinds)")
  return nnx.merge(graphdef, jax.tree.map(stack_variables, *[s for _, s in splits], is_leaf=_is_variable))


# --- running ------------------------------------------------------------------------------------

def run_block(block: Block, x: jax.Array, token_ids: jax.Array, positions: jax.Array, segment_ids: jax.Array, *,
              remat: str, cache=None, routing: jax.Array | None = None, **kwargs):
  """`block(x, ...)` -> (x [B, S, N, d], aux, cache) (Block.__call__) under the rematerialisation policy
  `remat` (a key of REMAT_POLICIES); x gets the streams' sharding constraint first."""
  x = constrain(x, STREAMS_AXES)
  if remat == "none":
    return block(x, token_ids, positions, segment_ids, cache=cache, routing=routing, **kwargs)
  graphdef, state = nnx.split(block)

  def call(state, x, token_ids, positions, segment_ids, cache, routing):
    return nnx.merge(graphdef, state)(x, token_ids, positions, segment_ids, cache=cache, routing=routing, **kwargs)

  return jax.checkpoint(call, policy=REMAT_POLICIES[remat])(state, x, token_ids, positions, segment_ids, cache,
                                                            routing)


class ScannedBlocks(nnx.Module):
  """`repeats` copies of a unit of `period` Blocks: blocks[j] holds unit position j of every repeat,
  each variable stacked [R, ...]. Called like a Block, but with one cache and one routing per layer."""

  def __init__(self, blocks: Sequence[Block], period: int):
    """blocks: the group's layers in layer order (R·period of them; layer k·period + j is of kind j)."""
    self.period, self.repeats = period, len(blocks) // period
    self.blocks = nnx.List([stack_blocks(blocks[j::period]) for j in range(period)])

  def __call__(self, x: jax.Array, token_ids: jax.Array, positions: jax.Array, segment_ids: jax.Array, *,
               caches: list, routing: list, remat: str, **kwargs):
    """x [B, S, N, d]; caches: per layer of the group a LayerCache or None; routing: per layer [B, S, K] or
    None -> (x, [aux per layer], [cache per layer]) (in layer order; kwargs go to Block.__call__)."""
    return self._scan(self.repeats, x, token_ids, positions, segment_ids, caches=caches, routing=routing,
                      remat=remat, **kwargs)

  def route(self, x: jax.Array, token_ids: jax.Array, positions: jax.Array, segment_ids: jax.Array, *,
            attention_mode: str) -> list[jax.Array]:
    """The experts every layer of the group picks, [B, S, K] int32 per layer: all layers run but the
    last, which stops at its router (Block.route)."""
    n = self.repeats - 1
    kwargs = dict(attention_mode=attention_mode, with_indexer_loss=False)
    x, auxes, _ = self._scan(n, x, token_ids, positions, segment_ids, caches=[None] * (n * self.period),
                             routing=[None] * (n * self.period), remat="none", **kwargs)
    found = [aux["routing"] for aux in auxes]
    last = [self.block(n, j) for j in range(self.period)]
    for block in last[:-1]:
      x, aux, _ = run_block(block, x, token_ids, positions, segment_ids, remat="none", **kwargs)
      found.append(aux["routing"])
    x = constrain(x, STREAMS_AXES)
    found.append(last[-1].route(x, token_ids, positions, segment_ids, attention_mode=attention_mode))
    return found

  def block(self, k: int, j: int) -> Block:
    """Unit position j of repeat k (layer k·period + j of the group) as a Block of its own (a copy)."""
    graphdef, state = nnx.split(self.blocks[j])
    return nnx.merge(graphdef, jax.tree.map(lambda v: variable_at(v, k), state, is_leaf=_is_variable))

  def _scan(self, repeats, x, token_ids, positions, segment_ids, *, caches, routing, remat, **kwargs):
    """Runs the first `repeats` repeats as one scan; caches / routing: one per layer of those."""
    p = self.period
    graphdef, state = nnx.split(self.blocks)
    state = jax.tree.map(lambda v: v[:repeats], state)

    def by_position(per_layer):  # per layer -> per unit position j: stacked over the repeats [R, ...]
      return [jax.tree.map(lambda *a: jnp.stack(a), *per_layer[j::p]) for j in range(p)]

    def body(x, xs):
      state_k, caches_k, routing_k = xs
      outs = []
      for block, cache, given in zip(nnx.merge(graphdef, state_k), caches_k, routing_k):
        x, aux, cache = run_block(block, x, token_ids, positions, segment_ids, cache=cache, routing=given,
                                  remat=remat, **kwargs)
        outs.append((aux, cache))
      return x, outs

    x, outs = jax.lax.scan(body, x, (state, by_position(caches), by_position(routing)))
    per_layer = [jax.tree.map(lambda a: a[k], outs[j]) for k in range(repeats) for j in range(p)]
    return x, [aux for aux, _ in per_layer], [cache for _, cache in per_layer]


def run_group(module: Block | ScannedBlocks, x: jax.Array, token_ids: jax.Array, positions: jax.Array,
              segment_ids: jax.Array, *, caches: list, routing: list, remat: str, **kwargs):
  """One group, a Block or a ScannedBlocks -> (x [B, S, N, d], [aux per layer], [cache per layer])."""
  if isinstance(module, ScannedBlocks):
    return module(x, token_ids, positions, segment_ids, caches=caches, routing=routing, remat=remat, **kwargs)
  x, aux, cache = run_block(module, x, token_ids, positions, segment_ids, cache=caches[0], routing=routing[0],
                            remat=remat, **kwargs)
  return x, [aux], [cache]


# --- the released (unrolled) layout -------------------------------------------------------------

def scanned_path(path: tuple, groups: Sequence[LayerGroup]) -> tuple[tuple, int | None]:
  """An unrolled Transformer's state path -> (the scanned Transformer's path, the index on its stacked
  axis, or None if it is not stacked). ('layers', 5, 'attn', ...) -> (('groups', 2, 'blocks', 0, 'attn',
  ...), 1) for Flash; paths outside `layers` are the same in both."""
  if path[0] != "layers":
    return path, None
  layer, rest = path[1], path[2:]
  for g, group in enumerate(groups):
    if layer in group.layers:
      if not group.scanned:
        return ("groups", g, *rest), None
      k, j = divmod(layer - group.first, group.period)
      return ("groups", g, "blocks", j, *rest), k
  raise ValueError(f"{'.'.join(map(str, path))}: layer {layer} is not one of the {groups[-1].layers.stop} main layers")


def unrolled_paths(path: tuple, groups: Sequence[LayerGroup]) -> tuple[list[tuple], bool]:
  """A (scanned or unrolled) Transformer's state path -> (the unrolled paths it holds, in the order of its
  stacked axis; whether it is stacked). Paths outside `groups` are returned as they are."""
  if path[0] != "groups":
    return [path], False
  group = groups[path[1]]
  if not group.scanned:
    return [("layers", group.first, *path[2:])], False
  j, rest = path[3], path[4:]
  return [("layers", group.first + k * group.period + j, *rest) for k in range(group.repeats)], True


def stack_layers(state: nnx.State, cfg: ModelConfig) -> nnx.State:
  """An unrolled Transformer's state, or any part of it (params, gradients) -> the same values in the
  layout of the `scan_layers` Transformer of `cfg` (groups.G.*, stacked [R, ...] where scanned)."""
  groups = plan_layer_groups(cfg)
  flat, stacked = [], {}
  for path, var in nnx.to_flat_state(state):
    target, k = scanned_path(path, groups)
    if k is None:
      flat.append((target, var))
    else:
      stacked.setdefault(target, {})[k] = var
  flat += [(target, stack_variables(*[layers[k] for k in sorted(layers)])) for target, layers in stacked.items()]
  return nnx.from_flat_state(flat)


def unstack_layers(state: nnx.State, cfg: ModelConfig) -> nnx.State:
  """The inverse of `stack_layers`: a scanned Transformer's state (or part) -> the unrolled layout
  (layers.N.*); an unrolled state is returned unchanged."""
  groups = plan_layer_groups(cfg)
  flat = []
  for path, var in nnx.to_flat_state(state):
    paths, stacked = unrolled_paths(path, groups)
    flat += [(p, variable_at(var, k)) for k, p in enumerate(paths)] if stacked else [(paths[0], var)]
  return nnx.from_flat_state(flat)
