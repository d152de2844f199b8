"""Decode speed vs context length: prefill N tokens, then time cached single-token decode steps.

For each context N the cache is sized for N + steps tokens; the first decode step (compilation) is not
timed. Per-token cost is a constant (projections, MoE, window of W rows, HCA's N/128 entries are few)
plus the CSA indexer's scoring of N/4 compressed keys, so ms/token grows far slower than N.
Usage:
  python benchmarks/decode.py [--config configs/tiny.yaml] [--contexts 1024,2048,...,32768] [--steps 32]
"""

from __future__ import annotations

import argparse
import time

import jax
import numpy as np
from flax import nnx

from dsv4_jax.config import ModelConfig
from dsv4_jax.inference import Engine
from dsv4_jax.layers.model import Transformer


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--config", default="configs/tiny.yaml")
  parser.add_argument("--contexts", default="1024,2048,4096,8192,16384,32768")
  parser.add_argument("--steps", type=int, default=32, help="timed decode steps per context")
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--storage", default=None, help="cache storage: float32, bf16 or mixed")
  args = parser.parse_args()
  cfg = ModelConfig.from_yaml(args.config)
  engine = Engine(Transformer(cfg, rngs=nnx.Rngs(0)))
  rng = np.random.default_rng(0)
  print(f"config {args.config}: {cfg.num_hidden_layers} layers, ratios {cfg.compress_ratios[:cfg.num_hidden_layers]}, "
        f"window {cfg.sliding_window}, index_topk {cfg.index_topk}; batch {args.batch}; "
        f"backend {jax.default_backend()}")
  print(f"{'context':>8s} {'prefill s*':>10s} {'ms/token':>9s} {'tokens/s':>9s} {'x context':>10s} {'x ms/token':>11s}")
  base = None
  for n in (int(c) for c in args.contexts.split(",")):
    ids = rng.integers(0, cfg.vocab_size, (args.batch, n)).astype(np.int32)
    start = time.perf_counter()
    logits, cache = engine.prefill(ids, n + args.steps + 1, storage=args.storage)
    jax.block_until_ready(logits)
    prefill_s = time.perf_counter() - start
    tokens = np.argmax(np.asarray(logits[:, -1:]), axis=-1).astype(np.int32)
    logits, cache = engine.decode(tokens, cache)  # compiles
    jax.block_until_ready(logits)
    start = time.perf_counter()
    for _ in range(args.steps):
      logits, cache = engine.decode(tokens, cache)
    jax.block_until_ready(logits)
    ms = (time.perf_counter() - start) / args.steps * 1e3
    base = base or (n, ms)
    print(f"{n:8d} {prefill_s:10.2f} {ms:9.2f} {args.batch * 1e3 / ms:9.1f} {n / base[0]:10.0f} "
          f"{ms / base[1]:11.2f}", flush=True)
  print("* prefill time includes its compilation (one per context length)")


if __name__ == "__main__":
  main()
