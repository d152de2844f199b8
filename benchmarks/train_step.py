"""Training throughput of a config on this machine, and its FLOPs per token.

Prints tokens/s of the jitted train step (forward, backward, Muon/AdamW update, router-bias update),
the analytic model FLOPs per token, and the check of the analytic count against XLA's cost analysis
of the compiled forward (must agree within 10%). Usage:
  python benchmarks/train_step.py [--config configs/tiny.yaml] [--seq_len 256] [--batch 16] [--steps 5]
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from dsv4_jax.config import TrainConfig
from dsv4_jax.train.curriculum import StepKind
from dsv4_jax.train.flops import forward_flops_per_token
from dsv4_jax.train.loop import init_state
from dsv4_jax.train.step import make_train_step


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--config", default="configs/tiny.yaml")
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--batch", type=int, default=16)
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--attention", default="sparse", choices=["sparse", "dense"])
  args = parser.parse_args()
  cfg = TrainConfig.from_yaml(args.config)
  mcfg = cfg.model
  b, s = args.batch, args.seq_len
  rng = np.random.default_rng(0)
  batch = {"input_ids": rng.integers(0, mcfg.vocab_size, (b, s)), "targets": rng.integers(0, mcfg.vocab_size, (b, s)),
           "loss_mask": np.ones((b, s), np.float32), "segment_ids": np.ones((b, s), np.int32),
           "positions": np.broadcast_to(np.arange(s), (b, s)), "target_bytes": np.ones((b, s), np.int32)}
  batch = {k: jnp.asarray(v) for k, v in batch.items()}

  graphdef, state, tx = init_state(cfg)
  kind = StepKind(args.attention, args.attention == "sparse", False)

  # XLA's count of the compiled forward vs the analytic one. XLA's cost analysis counts a loop body
  # once, so the check uses one query chunk (no loop); the step below uses the configured chunks.
  one_chunk = mcfg.replace(attention_chunk_size=s)
  check_graphdef, check_state, _ = init_state(dataclasses.replace(cfg, model=one_chunk))

  def forward(params, extra, ids):  # return both heads, or XLA drops the MTP block as dead code
    out = nnx.merge(check_graphdef, params, extra)(ids, attention_mode=args.attention, with_indexer_loss=False)
    return out.logits, out.mtp_logits

  compiled = jax.jit(forward).lower(check_state.params, check_state.extra, batch["input_ids"]).compile()
  xla_flops = compiled.cost_analysis()["flops"] / (b * s)
  model = forward_flops_per_token(mcfg, s, attention=args.attention)
  executed = forward_flops_per_token(one_chunk, s, attention=args.attention, executed=True)

  step = make_train_step(graphdef, tx, cfg, cfg.optimizer.decay_start_step)
  t0 = time.perf_counter()
  state, _ = step(state, batch, kind)
  jax.block_until_ready(state.step)
  compile_s = time.perf_counter() - t0
  times = []
  for _ in range(args.steps):
    t0 = time.perf_counter()
    state, metrics = step(state, batch, kind)
    jax.block_until_ready(metrics["total"])
    times.append(time.perf_counter() - t0)
  seconds = float(np.median(times))
  print(f"config {args.config}: batch {b} x seq_len {s}, {args.attention} attention, backend {jax.default_backend()}, "
        f"{jax.device_count()} device(s)")
  print(f"train step: {seconds * 1e3:.0f} ms median of {args.steps} (compile + first step {compile_s:.1f} s), "
        f"{b * s / seconds:,.0f} tokens/s")
  print(f"model forward FLOPs/token (k={mcfg.num_experts_per_tok} routed experts): {model / 1e6:.3f} M; "
        f"training ≈ 3x = {3 * model / 1e6:.3f} M")
  print(f"as the XLA path executes it (one chunk, dense ragged_dot over E={mcfg.n_routed_experts}): "
        f"{executed / 1e6:.3f} M; "
        f"XLA cost analysis of the compiled forward: {xla_flops / 1e6:.3f} M "
        f"(analytic/XLA = {executed / xla_flops:.3f})")
  print(f"achieved model FLOP/s (training, 3x forward): {3 * model * b * s / seconds / 1e9:.2f} GFLOP/s")


if __name__ == "__main__":
  main()
