"""One DeepSeek-V4 block: attention and MoE, each wrapped in manifold-constrained hyper-connections.

  X [B, S, N, d]:  y, post, comb = hc_attn.pre(X);  X = hc_attn.post(attn(attn_norm(y)), X, post, comb)
                   y, post, comb = hc_ffn.pre(X);   X = hc_ffn.post(moe(ffn_norm(y)),  X, post, comb)
`Block.route` runs the same attention half and stops at the MoE's router (the experts it would pick).
"""

from __future__ import annotations

import jax
from flax import nnx

from dsv4_jax.config import ModelConfig
from dsv4_jax.layers.attention import Attention
from dsv4_jax.layers.cache import LayerCache
from dsv4_jax.layers.mhc import HyperConnection
from dsv4_jax.layers.moe import MoE
from dsv4_jax.layers.norms import RMSNorm


class Block(nnx.Module):

  def __init__(self, cfg: ModelConfig, layer: int, *, rngs: nnx.Rngs):
    """`layer` indexes compress_ratios (MTP layers follow the main layers) and decides hash routing."""
    d = cfg.hidden_size
    self.ratio = cfg.compress_ratios[layer]
    self.attn = Attention(cfg, self.ratio, rngs=rngs)
    self.ffn = MoE(cfg, hash_routed=layer < cfg.num_hash_layers, rngs=rngs)
    self.attn_norm = RMSNorm(d, cfg.rms_norm_eps)
    self.ffn_norm = RMSNorm(d, cfg.rms_norm_eps)
    self.hc_attn = HyperConnection(d, cfg, rngs=rngs)
    self.hc_ffn = HyperConnection(d, cfg, rngs=rngs)

  def __call__(self, x: jax.Array, token_ids: jax.Array, positions: jax.Array, segment_ids: jax.Array, *,
               cache: LayerCache | None = None, attention_mode: str = "sparse", with_indexer_loss: bool = True,
               routing: jax.Array | None = None):
    """x [B, S, N, d] -> (x [B, S, N, d], aux dict of the attention and MoE, the attention's cache).

    routing [B, S, K]: the MoE's experts per token, given instead of chosen (score-routed layers; a
    token whose row is −1 is routed as usual)."""
    x, attn_aux, cache = self._attend(x, positions, segment_ids, cache=cache, attention_mode=attention_mode,
                                      with_indexer_loss=with_indexer_loss)
    y, post, comb = self.hc_ffn.pre(x)
    y, moe_aux = self.ffn(self.ffn_norm(y), token_ids, segment_ids != 0, routing=routing)
    x = self.hc_ffn.post(y, x, post, comb)
    return x, {**attn_aux, **moe_aux}, cache

  def route(self, x: jax.Array, token_ids: jax.Array, positions: jax.Array, segment_ids: jax.Array, *,
            attention_mode: str = "sparse") -> jax.Array:
    """The experts this block's MoE would pick for x [B, S, N, d]: [B, S, K] int32 (no expert runs)."""
    x, _, _ = self._attend(x, positions, segment_ids, cache=None, attention_mode=attention_mode,
                           with_indexer_loss=False)
    y, _, _ = self.hc_ffn.pre(x)
    return self.ffn.route(self.ffn_norm(y), token_ids)

  def _attend(self, x, positions, segment_ids, *, cache, attention_mode, with_indexer_loss):
    """The attention half: X -> X + attention, through hc_attn -> (x, attention aux, cache)."""
    y, post, comb = self.hc_attn.pre(x)
    y, attn_aux, cache = self.attn(self.attn_norm(y), positions, segment_ids, cache=cache,
                                   attention_mode=attention_mode, with_indexer_loss=with_indexer_loss)
    return self.hc_attn.post(y, x, post, comb), attn_aux, cache
