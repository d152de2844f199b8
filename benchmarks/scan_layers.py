"""Compile time and activation memory of a train-step-like program, layers unrolled vs scanned, by remat policy.

The model has Flash's layer pattern (configs/flash.yaml: 43 layers, compress_ratios 0, 0, 4, then 128, 4
alternating, 3 hash-routed layers, one MTP layer) at the widths of configs/tiny.yaml, so that it compiles
on a CPU. The program is `jax.value_and_grad` of the training loss (train/losses.py) of one forward,
with respect to the parameters, lowered for abstract inputs (nothing is allocated or run). Per case it
prints the trace + lowering time, XLA's compile time and `compiled.memory_analysis()`: temp bytes
(activations and other scratch of one step), argument and output bytes. Usage:
  python benchmarks/scan_layers.py [--seq_len 512] [--batch 1] [--cases unrolled:none,scanned:full,...]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4_jax.config import ModelConfig
from dsv4_jax.config.shipped import shipped_config
from dsv4_jax.layers.layer_groups import plan_layer_groups
from dsv4_jax.layers.model import Transformer
from dsv4_jax.train.losses import training_losses

CASES = "unrolled:none,unrolled:full,scanned:none,scanned:full,scanned:save_dots"


def flash_pattern_config() -> ModelConfig:
  """configs/tiny.yaml's widths with configs/flash.yaml's layers (count, ratios, hash layers)."""
  tiny, flash = ModelConfig.from_yaml(shipped_config("tiny")), ModelConfig.from_yaml(shipped_config("flash"))
  return tiny.replace(num_hidden_layers=flash.num_hidden_layers, compress_ratios=flash.compress_ratios,
                      num_hash_layers=flash.num_hash_layers)


def compile_step(cfg: ModelConfig, batch: int, seq_len: int) -> dict:
  """Traces, lowers and compiles value_and_grad of the loss for cfg -> times (s) and memory (bytes)."""
  graphdef, params, extra = nnx.split(nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0))), nnx.Param, ...)
  tokens = jax.ShapeDtypeStruct((batch, seq_len), jnp.int32)
  data = {"targets": tokens, "segment_ids": tokens, "loss_mask": jax.ShapeDtypeStruct((batch, seq_len), jnp.float32)}

  def loss(params, extra, input_ids, data):
    out = nnx.merge(graphdef, params, extra)(input_ids, segment_ids=data["segment_ids"])
    return training_losses(out, data, mtp_weight=0.3, balance_weight=1e-4, indexer_weight=1.0)["total"]

  t0 = time.perf_counter()
  lowered = jax.jit(jax.value_and_grad(loss)).trace(params, extra, tokens, data).lower()
  t1 = time.perf_counter()
  compiled = lowered.compile()
  t2 = time.perf_counter()
  memory = compiled.memory_analysis()
  return {"lower_s": t1 - t0, "compile_s": t2 - t1, "temp": memory.temp_size_in_bytes,
          "args": memory.argument_size_in_bytes, "outputs": memory.output_size_in_bytes}


def main():
  parser = argparse.ArgumentParser(description=__doc__)
  parser.add_argument("--seq_len", type=int, default=512)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--cases", default=CASES, help="comma-separated layout:remat pairs (layout unrolled|scanned)")
  args = parser.parse_args()
  cfg = flash_pattern_config()
  groups = [f"{g.first}-{g.layers.stop - 1}" + (f" ({g.period}x{g.repeats})" if g.scanned else "")
            for g in plan_layer_groups(cfg)]
  print(f"{cfg.num_hidden_layers} layers (Flash pattern, tiny widths: d {cfg.hidden_size}, {cfg.n_routed_experts} "
        f"experts), batch {args.batch} x seq_len {args.seq_len}, backend {jax.default_backend()}")
  print(f"scanned groups: {', '.join(groups)}")
  print(f"{'layers':<9} {'remat':<10} {'trace+lower s':>13} {'compile s':>10} {'temp MiB':>9} {'args MiB':>9} "
        f"{'outputs MiB':>11}")
  for case in args.cases.split(","):
    layout, remat = case.split(":")
    result = compile_step(cfg.replace(scan_layers=layout == "scanned", remat=remat), args.batch, args.seq_len)
    mib = 1 << 20
    print(f"{layout:<9} {remat:<10} {result['lower_s']:>13.1f} {result['compile_s']:>10.1f} "
          f"{result['temp'] / mib:>9.1f} {result['args'] / mib:>9.1f} {result['outputs'] / mib:>11.1f}", flush=True)


if __name__ == "__main__":
  main()
