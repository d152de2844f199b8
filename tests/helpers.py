"""Shared test utilities: tiny configs and randomised models."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4_jax.config import ModelConfig
from dsv4_jax.layers.model import Transformer

TINY = dict(
    vocab_size=256, hidden_size=64, num_hidden_layers=5, num_attention_heads=4, head_dim=32,
    q_lora_rank=32, o_groups=2, o_lora_rank=16, qk_rope_head_dim=8, sliding_window=16,
    compress_ratios=(0, 4, 128, 4, 0, 0), index_n_heads=16, index_head_dim=16, index_topk=8,
    n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, num_hash_layers=1,
    routed_scaling_factor=1.5, attention_chunk_size=64,
)


def tiny_config(**overrides) -> ModelConfig:
  return ModelConfig(**{**TINY, **overrides})


def randomize(model: nnx.Module, seed: int = 0, scale: float = 0.3) -> nnx.Module:
  """Overwrites every float parameter with noise so that no component is near-trivial.

  Norm weights become 1 + noise, matrices get std `scale`/sqrt(fan_in), biases/sinks/ape O(scale).
  The router bias is randomised too (so bias-adjusted top-k differs from plain top-k).
  """
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(model)):
    value = var[...]
    if not jnp.issubdtype(value.dtype, jnp.floating):
      continue
    name = ".".join(str(p) for p in path)
    shape = value.shape
    if "norm" in name and name.endswith("weight"):
      new = 1.0 + 0.1 * rng.standard_normal(shape)
    elif len(shape) >= 2:
      new = rng.standard_normal(shape) * scale / np.sqrt(shape[-1]) * 3
    elif name.endswith("scale"):
      new = 0.5 + rng.random(shape)
    else:
      new = rng.standard_normal(shape) * scale
    var[...] = jnp.asarray(new, value.dtype)
  return model


def tiny_model(seed: int = 0, **overrides) -> Transformer:
  return randomize(Transformer(tiny_config(**overrides), rngs=nnx.Rngs(seed)), seed)


def forward_fn(model: Transformer, **call_kwargs):
  """A jitted pure function ids -> ModelOutput for `model` (split once, as in hot paths)."""
  graphdef, state = nnx.split(model)

  @jax.jit
  def run(state, ids, segment_ids=None, positions=None):
    return nnx.merge(graphdef, state)(ids, segment_ids=segment_ids, positions=positions, **call_kwargs)

  return lambda ids, **kw: run(state, ids, **kw)


def train_cli(config, run_dir, cache_dir, *flags, env=None) -> subprocess.CompletedProcess:
  """`dsv4 train --config=config --set=train.run_dir=run_dir --noprogress *flags` in a subprocess (its
  environment: `env`, default this one's); runs that share `cache_dir` share one persistent compilation
  cache (later runs skip XLA's compile)."""
  env = {**(os.environ if env is None else env), "JAX_COMPILATION_CACHE_DIR": str(cache_dir),
         "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0", "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "0"}
  cmd = [sys.executable, "-m", "dsv4_jax.cli", "train", f"--config={config}", f"--set=train.run_dir={run_dir}",
         "--noprogress", *flags]
  return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
