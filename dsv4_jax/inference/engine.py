"""Prefill and incremental decoding: jitted calls of the model with its cache.

  prefill(model, input_ids [B, S], max_len, lengths=[B]) -> (logits [B, S, V], cache)
  decode(model, tokens [B, 1], cache)                     -> (logits [B, 1, V], cache)

Both are `model(ids, cache=...)` (layers/model.py): prefill starts from an empty cache
(`init_cache`) with right-padded rows marked as padding (segment 0), so each row's real positions get
the logits of that prompt alone; decode runs one token per row at position cache.lengths[b]. Here are
only the argument checks and the jitted wrappers over the model's (graphdef, state), split once per
`Engine`; decode has static shapes, so a generation loop compiles it once.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4_jax.layers.cache import Cache, init_cache, resolve_storage


@functools.partial(jax.jit, static_argnames=("graphdef", "max_len", "storage", "last_only"))
def _prefill_jit(state, input_ids, lengths, *, graphdef, max_len, storage, last_only):
  model = nnx.merge(graphdef, state)
  b, s = input_ids.shape
  segment_ids = (jnp.arange(s)[None, :] < lengths[:, None]).astype(jnp.int32)  # right padding: segment 0
  out = model(input_ids, segment_ids=segment_ids, cache=init_cache(model.cfg, b, max_len, storage),
              attention_mode="sparse", with_indexer_loss=False,
              logits_at=(lengths - 1)[:, None] if last_only else None)
  return out.logits, out.cache


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def _decode_jit(state, tokens, cache, *, graphdef):
  out = nnx.merge(graphdef, state)(tokens, cache=cache, attention_mode="sparse", with_indexer_loss=False)
  return out.logits, out.cache


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
