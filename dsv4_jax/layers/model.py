"""The DeepSeek-V4 Transformer and its multi-token-prediction (MTP) block.

  h = embed(ids) [B, S, d] → X = h copied into N streams [B, S, N, d] → blocks → hc_head → norm → head
  MTP (depth 1): x = e_proj(enorm(embed(ids[t+1]))) + h_proj(hnorm(X_t)) (broadcast over streams),
                 one block, its own hc_head and norm, the shared head: predicts token t+2 from t.

Packed sequences: `segment_ids` [B, S] (0 = padding) and per-document `positions` [B, S]. Documents
must start at row offsets that are multiples of the largest compression ratio, so every compression
block belongs to one document; tokens attend only within their own segment.

Inference is the same call with a `cache` (layers/cache.py, `init_cache`): S > 1 tokens fill an empty
cache (prefill; right-padded rows, segment_ids 0 on padding), S = 1 token per row decodes at position
cache.lengths; `ModelOutput.cache` is the updated cache. The MTP block is not run with a cache.
(Several tokens into a non-empty cache, i.e. chunked prefill, is not supported: an eager call raises;
under jit the cache's lengths are not known, so keep to the rule.)

Routing: the score-routed main layers (every main layer from num_hash_layers on) report the experts
each token used in aux["routing"] [R, B, S, K]; `model(ids, routing=...)` takes such an array and
routes with it instead of choosing (the gate weights still come from the current parameters; −1
rows: the router's own choice, so one compiled program serves both), and
`model.route(ids)` computes it alone, stopping after the last score-routed layer's router (no
experts of that layer, no head, no MTP). Hash-routed layers are not part of it: their experts are
tid2eid[token], a fixed table. The MTP block always routes by itself.

Layers: `model.layers` [L Blocks], or with cfg.scan_layers `model.groups`: consecutive layers of one kind
as one `jax.lax.scan` over stacked variables (layers/layer_groups.py, which also maps a state to and from
the released layers.N.* layout). cfg.remat: the rematerialisation policy of every block (main and MTP).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4_jax.config import ModelConfig
from dsv4_jax.layers.block import Block
from dsv4_jax.layers.cache import Cache
from dsv4_jax.layers.layer_groups import (STREAMS_AXES, LayerGroup, ScannedBlocks, plan_layer_groups, run_block,
                                          run_group)
from dsv4_jax.layers.linear import ADAMW, Linear, param
from dsv4_jax.layers.mhc import HyperConnectionHead
from dsv4_jax.layers.norms import RMSNorm
from dsv4_jax.parallel.mesh import constrain


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ModelOutput:
  """logits [B, S, V] (fp32); mtp_logits [B, S−1, V] or None; aux: dict of per-layer statistics;
  cache: the updated decoding cache, or None when called without one.

  aux["expert_load"] [L, E] routed-token counts (main layers), aux["balance_loss"] (mean over
  score-routed layers), aux["indexer_loss"] (mean KL over CSA layers' queries), plus the MTP
  layer's under "mtp_*"; aux["hidden"] are the final streams [B, S, N, d]; aux["routing"]
  [R, B, S, K] int32 the experts of every token in each of the R score-routed main layers.
  """
  logits: jax.Array
  mtp_logits: jax.Array | None
  aux: dict[str, Any]
  cache: Cache | None = None


class MTPBlock(Block):
  """A Block plus e_proj, h_proj [d, d]; enorm, hnorm, norm; and its own hc_head (released layout)."""

  def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
    super().__init__(cfg, layer, rngs=rngs)
    d = cfg.hidden_size
    self.e_proj = Linear(d, d, ("embed", "embed_in"), rngs=rngs, cfg=cfg)
    self.h_proj = Linear(d, d, ("embed", "embed_in"), rngs=rngs, cfg=cfg)
    self.enorm = RMSNorm(d, cfg.rms_norm_eps)
    self.hnorm = RMSNorm(d, cfg.rms_norm_eps)
    self.norm = RMSNorm(d, cfg.rms_norm_eps)
    self.hc_head = HyperConnectionHead(d, cfg, rngs=rngs)

  def predict(self, streams, next_embed, next_ids, positions, segment_ids, *, remat: str, **kwargs):
    """streams [B, T, N, d], next_embed [B, T, d] -> (head input [B, T, d], aux); the block runs under
    the rematerialisation policy `remat`."""
    x = self.e_proj(self.enorm(next_embed))[:, :, None, :] + self.h_proj(self.hnorm(streams))
    x, aux, _ = run_block(self, x, next_ids, positions, segment_ids, remat=remat, **kwargs)
    return self.norm(self.hc_head(x)), aux


class Transformer(nnx.Module):
  """DeepSeek-V4. `model(input_ids, segment_ids=None, positions=None, cache=None)` -> ModelOutput.

  Main layers: `layers` (L Blocks), or with cfg.scan_layers `groups` (per LayerGroup of
  `plan_layer_groups(cfg)`, a Block or a ScannedBlocks), with the same initial values either way.
  """

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    d = cfg.hidden_size
    self.cfg = cfg
    self.embed = _Embedding(cfg, rngs=rngs)
    blocks = [Block(cfg, i, rngs=rngs) for i in range(cfg.num_hidden_layers)]
    if cfg.scan_layers:
      self.groups = nnx.List([ScannedBlocks(blocks[g.first:g.layers.stop], g.period) if g.scanned else blocks[g.first]
                              for g in plan_layer_groups(cfg)])
    else:
      self.layers = nnx.List(blocks)
    self.hc_head = HyperConnectionHead(d, cfg, rngs=rngs)
    self.norm = RMSNorm(d, cfg.rms_norm_eps)
    self.head = Linear(d, cfg.vocab_size, ("vocab", "embed"), rngs=rngs, cfg=cfg, dtype=jnp.float32,
                       optimizer=ADAMW)
    self.mtp = nnx.List([MTPBlock(cfg, cfg.num_hidden_layers + i, rngs=rngs)
                         for i in range(cfg.num_nextn_predict_layers)])

  def __getattr__(self, name: str):
    if name == "layers":  # only reached when the attribute is absent: a scan_layers model
      raise AttributeError("Transformer.layers: this model scans its layers (scan_layers=True); its blocks are in "
                           "`groups` (stacked; dsv4_jax/layers/layer_groups.py), or build it with scan_layers=False")
    raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")

  def layer_groups(self) -> list[tuple[LayerGroup, Block | ScannedBlocks]]:
    """(LayerGroup, its Block or ScannedBlocks) for the main layers, in layer order (every layer alone
    unless cfg.scan_layers)."""
    if self.cfg.scan_layers:
      return list(zip(plan_layer_groups(self.cfg), self.groups, strict=True))
    return [(LayerGroup(i), block) for i, block in enumerate(self.layers)]

  @property
  def routed_layers(self) -> tuple[int, ...]:
    """Indices of the score-routed main layers (those whose experts `routing` / aux["routing"] hold)."""
    return tuple(range(min(self.cfg.num_hash_layers, self.cfg.num_hidden_layers), self.cfg.num_hidden_layers))

  def __call__(self, input_ids: jax.Array, *, segment_ids: jax.Array | None = None,
               positions: jax.Array | None = None, cache: Cache | None = None, attention_mode: str = "sparse",
               with_indexer_loss: bool = True, with_mtp: bool = True,
               logits_at: jax.Array | None = None, routing: jax.Array | None = None) -> ModelOutput:
    """input_ids [B, S] int; segment_ids [B, S] (0 = padding; default all 1); positions [B, S] (default
    0..S−1, or cache.lengths + 0..S−1 with a cache). attention_mode "sparse" (top-k) or "dense" (CSA
    attends every visible entry). cache: see the module docstring. logits_at [B, K]: compute the
    logits only at these sequence indices (logits [B, K, V]; e.g. each prompt's last token).
    routing [R, B, S, K] int: the experts of each token in each score-routed main layer
    (`routed_layers`), used instead of the routers' own choice (e.g. a `route` of earlier parameters);
    −1 entries (a whole token's row): that token is routed as usual."""
    input_ids, segment_ids, positions = self._inputs(input_ids, segment_ids, positions, cache)
    b, s = input_ids.shape
    cfg = self.cfg
    routed = self.routed_layers
    if routing is not None and routing.shape != (len(routed), b, s, cfg.num_experts_per_tok):
      raise ValueError(f"routing: expected shape {(len(routed), b, s, cfg.num_experts_per_tok)} (score-routed "
                       f"layers {list(routed)}, batch, seq, top-k), got {routing.shape}")
    kwargs = dict(attention_mode=attention_mode, with_indexer_loss=with_indexer_loss)

    h = self.embed(input_ids)
    x = jnp.broadcast_to(h[:, :, None, :], (b, s, cfg.hc_mult, cfg.hidden_size))
    caches = [None] * cfg.num_hidden_layers if cache is None else list(cache.layers)
    given = [None if routing is None or i not in routed else routing[routed.index(i)]
             for i in range(cfg.num_hidden_layers)]
    layer_aux, layer_caches = [], []
    for group, module in self.layer_groups():
      x, auxes, new_caches = run_group(module, x, input_ids, positions, segment_ids,
                                       caches=[caches[i] for i in group.layers],
                                       routing=[given[i] for i in group.layers], remat=cfg.remat, **kwargs)
      layer_aux += auxes
      layer_caches += new_caches
    x = constrain(x, STREAMS_AXES)
    head_in = x if logits_at is None else jnp.take_along_axis(x, logits_at[:, :, None, None], axis=1)
    logits = self.head(self.norm(self.hc_head(head_in)))

    out_aux = _summarise(layer_aux, cfg)
    out_aux["routing"] = _stack_routing([layer_aux[i]["routing"] for i in routed], b, s, cfg)
    out_aux["hidden"] = x
    mtp_logits = new_cache = None
    if cache is not None:
      new_cache = Cache(layers=tuple(layer_caches),
                        lengths=cache.lengths + jnp.sum(segment_ids != 0, axis=1).astype(jnp.int32))
    elif with_mtp and len(self.mtp) and s > 1:
      mtp_in, mtp_aux = self.mtp[0].predict(x[:, :-1], self.embed(input_ids[:, 1:]), input_ids[:, 1:],
                                            positions[:, :-1], segment_ids[:, :-1], remat=cfg.remat, **kwargs)
      mtp_logits = self.head(mtp_in)
      out_aux.update({f"mtp_{k}": v for k, v in _summarise([mtp_aux], cfg, mtp=True).items()})
    return ModelOutput(logits=logits, mtp_logits=mtp_logits, aux=out_aux, cache=new_cache)

  def route(self, input_ids: jax.Array, *, segment_ids: jax.Array | None = None,
            positions: jax.Array | None = None, attention_mode: str = "sparse") -> jax.Array:
    """The routing-only forward: the experts every score-routed main layer would pick for these tokens
    with the current parameters, [R, B, S, K] int32 (the `routing` of `__call__`, equal to the
    aux["routing"] of a full forward). Runs the layers up to the last score-routed layer's router: that
    layer's experts, the head and the MTP block are not computed, nor the indexer loss."""
    input_ids, segment_ids, positions = self._inputs(input_ids, segment_ids, positions, None)
    b, s = input_ids.shape
    cfg = self.cfg
    routed = self.routed_layers
    if not routed:
      return _stack_routing([], b, s, cfg)
    h = self.embed(input_ids)
    x = jnp.broadcast_to(h[:, :, None, :], (b, s, cfg.hc_mult, cfg.hidden_size))
    found = []
    *before, (_, last) = self.layer_groups()  # the last score-routed layer is the last layer
    for group, module in before:
      n = len(group.layers)
      x, auxes, _ = run_group(module, x, input_ids, positions, segment_ids, caches=[None] * n, routing=[None] * n,
                              remat="none", attention_mode=attention_mode, with_indexer_loss=False)
      found += [aux["routing"] for i, aux in zip(group.layers, auxes) if i in routed]
    if isinstance(last, ScannedBlocks):
      found += last.route(x, input_ids, positions, segment_ids, attention_mode=attention_mode)
    else:
      x = constrain(x, STREAMS_AXES)
      found.append(last.route(x, input_ids, positions, segment_ids, attention_mode=attention_mode))
    return _stack_routing(found, b, s, cfg)

  def _inputs(self, input_ids, segment_ids, positions, cache):
    """Checks the call's arguments and fills the defaults -> (input_ids, segment_ids, positions)."""
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
      raise ValueError(f"input_ids: expected [batch, seq] integers, got shape {input_ids.shape}")
    b, s = input_ids.shape
    cfg = self.cfg
    if cache is not None and (len(cache.layers) != cfg.num_hidden_layers or cache.lengths.shape != (b,)):
      raise ValueError(f"cache: expected {cfg.num_hidden_layers} layers and lengths of shape ({b},), got "
                       f"{len(cache.layers)} layers and lengths of shape {cache.lengths.shape}")
    if cache is not None and s > 1 and not isinstance(cache.lengths, jax.core.Tracer) and np.any(cache.lengths):
      raise ValueError(f"cache: a call with {s} tokens fills an empty cache (prefill), but the cache already "
                       f"holds {np.asarray(cache.lengths).tolist()} tokens per row; decode one token at a time")
    if segment_ids is None:
      segment_ids = jnp.ones((b, s), jnp.int32)
    if positions is None:
      start = 0 if cache is None else cache.lengths[:, None]
      positions = jnp.broadcast_to(start + jnp.arange(s, dtype=jnp.int32), (b, s))
    for name, arr in (("segment_ids", segment_ids), ("positions", positions)):
      if jnp.shape(arr) != (b, s):
        raise ValueError(f"{name}: expected shape {(b, s)} like input_ids, got {jnp.shape(arr)}")
    return input_ids, segment_ids, positions

  def balance_router_bias(self, aux: dict[str, Any], speed: float) -> None:
    """Aux-loss-free balancing, after an optimizer step: every score-routed gate moves its bias by
    speed · sign(mean load − load), from the per-layer expert loads this model reported in `aux`
    (a ModelOutput.aux). Hash-routed gates have no bias and are left as they are. A scanned group's
    stacked gates [R, E] take their layers' loads [R, E] at once."""
    loads = aux["expert_load"]  # [L, E]
    if loads.shape[0] != self.cfg.num_hidden_layers:
      raise ValueError(f"expert_load: expected one row per main layer ({self.cfg.num_hidden_layers}), "
                       f"got shape {loads.shape}")
    for group, module in self.layer_groups():
      if isinstance(module, ScannedBlocks):
        for j, block in enumerate(module.blocks):
          block.ffn.gate.update_bias(loads[group.first + j:group.layers.stop:group.period], speed)
      else:
        module.ffn.gate.update_bias(loads[group.first], speed)
    if "mtp_expert_load" in aux:  # absent when the MTP block did not run (e.g. indexer warm-up steps)
      for block, load in zip(self.mtp, aux["mtp_expert_load"], strict=True):
        block.ffn.gate.update_bias(load, speed)


class _Embedding(nnx.Module):
  """embed.weight [V, d]."""

  def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs):
    self.weight = param(rngs, (cfg.vocab_size, cfg.hidden_size), ("vocab", "embed"), std=cfg.init_std,
                        dtype=jnp.dtype(cfg.param_dtype), optimizer=ADAMW)
    self.dtype = jnp.dtype(cfg.dtype)

  def __call__(self, ids: jax.Array) -> jax.Array:
    return self.weight[...][ids].astype(self.dtype)


def _stack_routing(ids: list, b: int, s: int, cfg: ModelConfig) -> jax.Array:
  """Per-layer experts [B, S, K] -> [R, B, S, K] int32 (R = 0: an empty array of that shape)."""
  if not ids:
    return jnp.zeros((0, b, s, cfg.num_experts_per_tok), jnp.int32)
  return jnp.stack(ids).astype(jnp.int32)


def _summarise(layer_aux: list[dict], cfg: ModelConfig, mtp: bool = False) -> dict:
  """Stacks per-layer expert loads and averages the balance and indexer losses."""
  first = cfg.num_hidden_layers if mtp else 0
  routed = [a["balance_loss"] for i, a in enumerate(layer_aux) if first + i >= cfg.num_hash_layers]
  kl_sum = sum(a["indexer_kl_sum"] for a in layer_aux)
  kl_count = sum(a["indexer_kl_count"] for a in layer_aux)
  return {
      "expert_load": jnp.stack([a["expert_load"] for a in layer_aux]),
      "balance_loss": jnp.mean(jnp.stack(routed)) if routed else jnp.zeros((), jnp.float32),
      "indexer_loss": kl_sum / jnp.maximum(kl_count, 1.0),
      "dropped_copies": sum(a["dropped_copies"] for a in layer_aux),
  }
