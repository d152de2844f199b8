"""Compiled temp memory and time of one CSA layer forward+backward vs sequence length.

Prints S, XLA temp bytes, time per step, and the log-log growth exponent of memory (must be ~linear:
no [S, S] or [S, S/4]-sized tensor is built). Usage:
  python benchmarks/attention_scaling.py [--lengths 1024,2048,4096,8192,16384] [--mode sparse|dense]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4_jax.config import ModelConfig
from dsv4_jax.layers.attention import Attention


def measure(cfg: ModelConfig, ratio: int, seq_len: int, mode: str, repeats: int = 3):
  layer = Attention(cfg, ratio, rngs=nnx.Rngs(0))
  graphdef, state = nnx.split(layer)
  x = jax.random.normal(jax.random.key(0), (1, seq_len, cfg.hidden_size), jnp.float32)
  positions = jnp.arange(seq_len)[None]
  segments = jnp.ones((1, seq_len), jnp.int32)

  def loss(state, x):
    out, aux, _ = nnx.merge(graphdef, state)(x, positions, segments, attention_mode=mode)
    return jnp.sum(out ** 2) + aux["indexer_kl_sum"]

  step = jax.jit(jax.grad(loss, argnums=(0, 1)))
  compiled = step.lower(state, x).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  jax.block_until_ready(compiled(state, x))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(compiled(state, x))
    times.append(time.perf_counter() - start)
  return temp, float(np.median(times))


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--config", default="configs/tiny.yaml")
  parser.add_argument("--lengths", default="1024,2048,4096,8192,16384")
  parser.add_argument("--mode", default="sparse", choices=["sparse", "dense"])
  parser.add_argument("--ratio", type=int, default=4)
  args = parser.parse_args()
  cfg = ModelConfig.from_yaml(args.config)
  lengths = [int(s) for s in args.lengths.split(",")]
  print(f"one attention layer (ratio {args.ratio}, {args.mode}), d={cfg.hidden_size}, H={cfg.num_attention_heads}, "
        f"D={cfg.head_dim}, W={cfg.sliding_window}, top-k={cfg.index_topk}, chunk={cfg.attention_chunk_size}; "
        f"forward+backward on {jax.default_backend()}")
  print(f"{'S':>7} {'temp MiB':>10} {'ms/step':>10}")
  temps = []
  for s in lengths:
    temp, seconds = measure(cfg, args.ratio, s, args.mode)
    temps.append(temp)
    print(f"{s:>7} {temp / 2**20:>10.1f} {seconds * 1e3:>10.1f}", flush=True)
  if len(lengths) > 1:
    exponent = np.polyfit(np.log(lengths), np.log(temps), 1)[0]
    print(f"memory growth exponent (log-log slope): {exponent:.2f}")


if __name__ == "__main__":
  main()
