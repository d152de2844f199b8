"""Inference: compressed KV caches, prefill / incremental decode, sampling and generation."""

from dsv4_jax.inference.engine import Engine, decode, decode_compilations, prefill
from dsv4_jax.layers.cache import Cache, CompressorCache, LayerCache, cache_bytes, init_cache

__all__ = ["Cache", "CompressorCache", "Engine", "LayerCache", "cache_bytes", "decode", "decode_compilations",
           "init_cache", "prefill"]
