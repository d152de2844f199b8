"""Prefill and incremental decoding with the compressed caches of `cache.py`.

  prefill(model, input_ids [B, S], max_len, lengths=[B]) -> (logits [B, S, V], cache)
  decode(model, tokens [B, 1], cache)                     -> (logits [B, 1, V], cache)

Prefill is the model's own sparse-mode forward (right-padded rows are masked as padding, so each row's
real positions get the logits of that prompt alone) that also records each layer's cache. Decode runs
one token per row at that row's position t = cache.lengths[b], reusing the model's projections, norms,
compressor pooling, indexer scoring and sparse attention; query t attends
  window rows        p ∈ [max(0, t − W + 1), t]                      (ring slot p mod W)
  compressed entries i < (t + 1) // r   (CSA: the indexer's top-k of them; HCA: all)
Entry t // r is pooled and written at the step where (t + 1) mod r = 0, before the token attends.
Both are jitted functions of the model's state (`nnx.split` once per `Engine`); decode has static shapes,
so a generation loop compiles it once. The MTP block is not run.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4_jax.inference.cache import (Cache, CompressorCache, LayerCache, encode_rows, decode_rows,
                                      resolve_storage, stored_storage, write_rows)
from dsv4_jax.layers.compressor import pool_blocks
from dsv4_jax.layers.mhc import mhc_post
from dsv4_jax.ops import dispatch
from dsv4_jax.ops.indexer import indexer_scores, select_topk


# --- shared structure ------------------------------------------------------------------------------

def _run_blocks(model, input_ids, token_mask, attend, last=None):
  """embed -> blocks (attention replaced by `attend(layer, attn, x_norm)`) -> head logits (fp32),
  at every position or, given `last` [B], only there ([B, 1, V])."""
  cfg = model.cfg
  b, s = input_ids.shape
  h = model.embed(input_ids)
  x = jnp.broadcast_to(h[:, :, None, :], (b, s, cfg.hc_mult, cfg.hidden_size))
  for layer, block in enumerate(model.layers):
    y, post, comb = block.hc_attn.pre(x)
    y = attend(layer, block.attn, block.attn_norm(y))
    x = mhc_post(y, x, post, comb)
    y, post, comb = block.hc_ffn.pre(x)
    y, _ = block.ffn(block.ffn_norm(y), input_ids, token_mask)
    x = mhc_post(y, x, post, comb)
  if last is not None:
    x = jnp.take_along_axis(x, last[:, None, None, None], axis=1)
  return model.head(model.norm(model.hc_head(x)))


def _gather(stored: dict, idx: jax.Array, dtype) -> jax.Array:
  """stored rows [B, N, ...], idx [B, K] (−1 allowed, reads row 0) -> rows [B, K, D] in `dtype`."""
  safe = jnp.clip(idx, 0)

  def take(buf):
    return jnp.take_along_axis(buf, safe.reshape(safe.shape + (1,) * (buf.ndim - 2)), axis=1)

  return decode_rows(jax.tree.map(take, stored), dtype)


# --- prefill ---------------------------------------------------------------------------------------

def _prefill_compressor(comp, x, positions, lengths, max_len, freqs, quantise, storage, rope_dim):
  """The compressor's cache after each row's first lengths[b] tokens of x [B, S, d]."""
  r, b, s = comp.ratio, x.shape[0], x.shape[1]
  n = s // r
  kv, score = comp.project(x, jnp.arange(s) % r)
  done = lengths // r  # complete blocks per row
  if n:
    entries = quantise(comp.finish(pool_blocks(kv, score, r, comp.overlap), positions[:, :n * r:r], freqs))
  else:  # shorter than one block (pool_blocks' overlap padding needs a block)
    entries = jnp.zeros((b, 0, comp.out_dim), jnp.float32)
  entries = jnp.where((jnp.arange(n)[None, :] < done[:, None])[..., None], entries, 0.0)
  entries = jnp.pad(entries, [(0, 0), (0, max_len // r - n), (0, 0)])

  def tokens_from(start):  # [B] first token of a block -> its r tokens' kv, score [B, r, coff·c]
    idx = jnp.clip(start[:, None] + jnp.arange(r), 0, s - 1)[..., None]
    return jnp.take_along_axis(kv, idx, axis=1), jnp.take_along_axis(score, idx, axis=1)

  block_kv, block_score = tokens_from(done * r)
  cache = CompressorCache(entries=encode_rows(entries, storage, rope_dim), block_kv=block_kv,
                          block_score=block_score)
  if comp.overlap:
    c = comp.out_dim
    prev_kv, prev_score = tokens_from(done * r - r)
    has_prev = (done > 0)[:, None, None]
    cache.prev_kv = jnp.where(has_prev, prev_kv[..., :c], 0.0)
    cache.prev_score = jnp.where(has_prev, prev_score[..., :c], -jnp.inf)
  return cache


def _prefill_layer(attn, x, positions, lengths, max_len, storage) -> LayerCache:
  cfg, s = attn.cfg, x.shape[1]
  w, rope_dim = cfg.sliding_window, cfg.qk_rope_head_dim
  kv = attn.window_kv(x, positions)
  last = lengths[:, None] - 1
  pos = last - jnp.mod(last - jnp.arange(w), w)  # the latest position ≤ last held by each ring slot
  rows = jnp.take_along_axis(kv, jnp.clip(pos, 0, s - 1)[..., None], axis=1)
  window = encode_rows(jnp.where((pos >= 0)[..., None], rows, 0.0), storage, rope_dim)
  layer = LayerCache(window=window)
  if attn.ratio:
    layer.compressor = _prefill_compressor(attn.compressor, x, positions, lengths, max_len, attn.freqs,
                                           attn._kv_quantise, storage, rope_dim)
  if attn.ratio == 4:
    layer.indexer = _prefill_compressor(attn.indexer.compressor, x, positions, lengths, max_len, attn.freqs,
                                        attn.indexer._quantise, storage, 0)
  return layer


def _prefill(model, input_ids, lengths, max_len, storage, last_only):
  b, s = input_ids.shape
  positions = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
  segment_ids = (positions < lengths[:, None]).astype(jnp.int32)  # right padding is segment 0
  layers = []

  def attend(layer, attn, x):
    out, _ = attn(x, positions, segment_ids, attention_mode="sparse", with_indexer_loss=False)
    layers.append(_prefill_layer(attn, x, positions, lengths, max_len, storage))
    return out

  logits = _run_blocks(model, input_ids, segment_ids != 0, attend, last=lengths - 1 if last_only else None)
  return logits, Cache(layers=tuple(layers), lengths=lengths.astype(jnp.int32))


# --- decode ----------------------------------------------------------------------------------------

def _compress_step(comp, cc: CompressorCache, x, t, freqs, quantise, rope_dim) -> CompressorCache:
  """Adds token t (x [B, 1, d]) to the partial block; pools and writes entry t // r where it completes."""
  r, b = comp.ratio, x.shape[0]
  batch = jnp.arange(b)
  kv, score = comp.project(x, (t % r)[:, None])
  block_kv = cc.block_kv.at[batch, t % r].set(kv[:, 0])
  block_score = cc.block_score.at[batch, t % r].set(score[:, 0])
  complete = (t + 1) % r == 0
  if comp.overlap:  # pool [previous block's first c channels | this block's last c] as pool_blocks' block 1
    pad = jnp.zeros_like(cc.prev_kv)
    seq_kv = jnp.concatenate([jnp.concatenate([cc.prev_kv, pad], -1), block_kv], axis=1)
    seq_score = jnp.concatenate([jnp.concatenate([cc.prev_score, pad], -1), block_score], axis=1)
    pooled = pool_blocks(seq_kv, seq_score, r, True, prev_valid=jnp.ones((b, 2), bool))[:, 1:]
  else:
    pooled = pool_blocks(block_kv, block_score, r, False)
  entry = quantise(comp.finish(pooled, (t - r + 1)[:, None], freqs))[:, 0]
  entries = write_rows(cc.entries, t // r, entry, stored_storage(cc.entries), rope_dim, when=complete)
  new = CompressorCache(entries=entries, block_kv=block_kv, block_score=block_score)
  if comp.overlap:
    c = comp.out_dim
    new.prev_kv = jnp.where(complete[:, None, None], block_kv[..., :c], cc.prev_kv)
    new.prev_score = jnp.where(complete[:, None, None], block_score[..., :c], cc.prev_score)
  return new


def _decode_layer(attn, x, positions, lc: LayerCache):
  """x [B, 1, d] at positions [B, 1] -> (attention output [B, 1, d], updated layer cache)."""
  cfg, r = attn.cfg, attn.ratio
  w, rope_dim = cfg.sliding_window, cfg.qk_rope_head_dim
  t = positions[:, 0]
  qr, q = attn.queries(x, positions)
  kv = attn.window_kv(x, positions)
  window = write_rows(lc.window, t % w, kv[:, 0], stored_storage(lc.window), rope_dim)
  slots = jnp.arange(w)
  window_idx = jnp.where(t[:, None] - jnp.mod(t[:, None] - slots, w) >= 0, slots, -1)  # [B, W]
  rows, idx = [_gather(window, window_idx, kv.dtype)], [window_idx]
  new = LayerCache(window=window)
  if r:
    new.compressor = _compress_step(attn.compressor, lc.compressor, x, t, attn.freqs, attn._kv_quantise, rope_dim)
    m = jax.tree.leaves(new.compressor.entries)[0].shape[1]
    visible = jnp.arange(m)[None, :] < ((t + 1) // r)[:, None]  # [B, M]
    if r == 4:
      new.indexer = _compress_step(attn.indexer.compressor, lc.indexer, x, t, attn.freqs, attn.indexer._quantise, 0)
      index_q, index_w = attn.indexer.queries(x, qr, positions, attn.freqs)
      index_k = decode_rows(new.indexer.entries, jnp.float32)
      cidx, _ = select_topk(indexer_scores(index_q, index_w, index_k), visible[:, None], cfg.index_topk)
      cidx = cidx[:, 0]
    else:
      cidx = jnp.where(visible, jnp.arange(m), -1)
    rows.append(_gather(new.compressor.entries, cidx, kv.dtype))
    idx.append(cidx)
  rows = jnp.concatenate(rows, axis=1)  # [B, K, D]: the only rows this token attends
  valid = jnp.concatenate(idx, axis=1) >= 0
  slot_idx = jnp.where(valid, jnp.arange(rows.shape[1]), -1)[:, None]  # [B, 1, K]
  o = dispatch.sparse_attention_fn(cfg.kernels)(q, rows, attn.attn_sink[...], slot_idx,
                                                scale=attn.head_dim ** -0.5, chunk_size=None)
  return attn.project_out(o, positions).astype(x.dtype), new


def _decode(model, tokens, cache: Cache):
  positions = cache.lengths[:, None]
  layers = []

  def attend(layer, attn, x):
    out, lc = _decode_layer(attn, x, positions, cache.layers[layer])
    layers.append(lc)
    return out

  logits = _run_blocks(model, tokens, jnp.ones(tokens.shape, bool), attend)
  return logits, Cache(layers=tuple(layers), lengths=cache.lengths + 1)


# --- jitted entry points ---------------------------------------------------------------------------

@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "storage", "last_only"))
def _prefill_jit(state, input_ids, lengths, *, graphdef, max_len, storage, last_only):
  return _prefill(nnx.merge(graphdef, state), input_ids, lengths, max_len, storage, last_only)


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _decode_jit(state, tokens, cache, *, graphdef):
  return _decode(nnx.merge(graphdef, state), tokens, cache)


def decode_compilations() -> int:
  """How many decode programs have been compiled so far in this process (for recompilation checks)."""
  return _decode_jit._cache_size()


class Engine:
  """A model split once into (graphdef, state) for repeated prefill / decode calls."""

  def __init__(self, model):
    self.cfg = model.cfg
    self.graphdef, self.state = nnx.split(model)

  def prefill(self, input_ids, max_len: int, *, lengths=None, storage: str | None = None,
              last_only: bool = False):
    """input_ids [B, S] (right-padded when `lengths` [B] is given) -> (logits [B, S, V], cache).

    max_len: the most tokens any row will hold (prompt + generated), S ≤ max_len; decoding past it is
    undefined (entries beyond the cache are dropped). storage: cache storage ("float32",
    "bfloat16"/"bf16", "mixed"; default the model's compute dtype). last_only: return only each row's
    last real position's logits [B, 1, V] (long prompts). Logits at padded positions are meaningless.
    """
    input_ids = jnp.asarray(input_ids, jnp.int32)
    if input_ids.ndim != 2:
      raise ValueError(f"prefill: input_ids must be [batch, seq], got shape {input_ids.shape}")
    b, s = input_ids.shape
    if not 1 <= s <= max_len:
      raise ValueError(f"prefill: prompt length {s} must be in [1, max_len={max_len}]")
    lengths = jnp.full((b,), s, jnp.int32) if lengths is None else jnp.asarray(lengths, jnp.int32)
    if lengths.shape != (b,):
      raise ValueError(f"prefill: lengths must have shape ({b},), got {lengths.shape}")
    host = np.asarray(lengths)
    if host.min() < 1 or host.max() > s:
      raise ValueError(f"prefill: lengths must lie in [1, {s}] (the padded width), got {host.tolist()}")
    return _prefill_jit(self.state, input_ids, lengths, graphdef=self.graphdef, max_len=int(max_len),
                        storage=resolve_storage(self.cfg, storage), last_only=bool(last_only))

  def decode(self, tokens, cache: Cache):
    """tokens [B, 1] at positions cache.lengths -> (logits [B, 1, V], new cache). `cache` is donated:
    do not use it afterwards. Positions must stay below the prefill's max_len."""
    tokens = jnp.asarray(tokens, jnp.int32)
    if tokens.shape != (cache.lengths.shape[0], 1):
      raise ValueError(f"decode: tokens must be [{cache.lengths.shape[0]}, 1], got {tokens.shape}")
    return _decode_jit(self.state, tokens, cache, graphdef=self.graphdef)


def prefill(model, input_ids, max_len: int, *, lengths=None, storage: str | None = None,
            last_only: bool = False):
  """`Engine(model).prefill(...)`; `model` may also be an Engine (avoids re-splitting)."""
  engine = model if isinstance(model, Engine) else Engine(model)
  return engine.prefill(input_ids, max_len, lengths=lengths, storage=storage, last_only=last_only)


def decode(model, tokens, cache: Cache):
  """`Engine(model).decode(...)`; `model` may also be an Engine (avoids re-splitting per token)."""
  engine = model if isinstance(model, Engine) else Engine(model)
  return engine.decode(tokens, cache)
