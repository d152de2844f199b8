"""Bytes moved per collective kind: XLA's automatic partitioner vs the explicit expert / context parallel paths.

On 8 fake CPU devices (no accelerator needed: only the compiled programs are inspected), for one MoE layer
(forward + backward) on a (data 2, expert 4) mesh and one CSA attention layer on a (data 2, context 4) mesh,
at the tiny config's widths and at a small MoE config's:
  auto      the layer's single-device code with its parameters / inputs sharded: XLA partitions it;
  explicit  parallel/expert.py (all-to-all in waves) or parallel/context.py (halo ppermute + entry gather).
Bytes = Σ over the collectives of the compiled per-device program of their result size (a proxy for what each
device receives). Usage: python benchmarks/collectives.py [--seq 4096] [--tokens 4096]
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import os
import re
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)
import jax.numpy as jnp  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec as P  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import optax  # noqa: E402

from dsv4_jax.config import ModelConfig, TrainConfig  # noqa: E402
from dsv4_jax.config.shipped import resolve_config  # noqa: E402
from dsv4_jax.layers.attention import Attention  # noqa: E402
from dsv4_jax.layers.moe import MoE  # noqa: E402
from dsv4_jax.parallel import context, expert, make_mesh, shard_model  # noqa: E402
from dsv4_jax.train.compile_ahead import shapes_of  # noqa: E402
from dsv4_jax.train.loop import init_state  # noqa: E402

KINDS = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")
BYTES = {"f32": 4, "s32": 4, "u32": 4, "bf16": 2, "f16": 2, "pred": 1, "s8": 1, "u8": 1}
SMALL_MOE = dict(hidden_size=256, num_attention_heads=8, head_dim=64, q_lora_rank=128, o_lora_rank=64,
                 n_routed_experts=16, num_experts_per_tok=4, moe_intermediate_size=256, index_n_heads=8,
                 index_head_dim=32)


def collective_bytes(hlo: str) -> dict[str, int]:
  """{kind: bytes} summed over the collectives of a compiled HLO module (tuple results included)."""
  total = collections.Counter()
  for line in hlo.splitlines():
    found = re.search(r"= (.*?) (" + "|".join(KINDS) + r")(-start)?\(", line)
    if not found:
      continue
    for dtype, dims in re.findall(r"(\w+)\[([0-9,]*)\]", found.group(1)):
      size = 1
      for d in filter(None, dims.split(",")):
        size *= int(d)
      total[found.group(2)] += size * BYTES.get(dtype, 4)
  return dict(total)


@contextlib.contextmanager
def automatic_partitioner():
  """The layers' single-device code under the mesh: the explicit schemes see no expert / context axis."""
  saved = expert.expert_size, context.context_size
  expert.expert_size = context.context_size = lambda: 1
  try:
    yield
  finally:
    expert.expert_size, context.context_size = saved


def moe_program(cfg: ModelConfig, tokens: int, mesh) -> str:
  moe = MoE(cfg, hash_routed=False, rngs=nnx.Rngs(0))
  with jax.set_mesh(mesh):
    shard_model(moe, mesh)
    graphdef, params, rest = nnx.split(moe, nnx.Param, ...)
    batch = NamedSharding(mesh, P(("data", "expert")))  # the batch rule's order (parallel/mesh.py)
    x = jax.ShapeDtypeStruct((tokens // 512, 512, cfg.hidden_size), jnp.float32, sharding=batch)
    ids = jax.ShapeDtypeStruct((tokens // 512, 512), jnp.int32, sharding=batch)

    def loss(params, x, ids):
      y, _ = nnx.merge(graphdef, params, rest)(x, ids, ids >= 0)
      return jnp.sum(y ** 2)

    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x, ids).compile().as_text()


def attention_program(cfg: ModelConfig, seq: int, mesh) -> str:
  attn = Attention(cfg, 4, rngs=nnx.Rngs(0))
  with jax.set_mesh(mesh):
    shard_model(attn, mesh)
    graphdef, params, rest = nnx.split(attn, nnx.Param, ...)
    spec = NamedSharding(mesh, P("data", "context"))
    x = jax.ShapeDtypeStruct((2, seq, cfg.hidden_size), jnp.float32, sharding=spec)
    pos = jax.ShapeDtypeStruct((2, seq), jnp.int32, sharding=spec)

    def loss(params, x, pos):
      out, aux, _ = nnx.merge(graphdef, params, rest)(x, pos, jnp.ones_like(pos), attention_mode="sparse")
      return jnp.sum(out ** 2) + aux["indexer_kl_sum"]

    return jax.jit(jax.grad(loss, argnums=(0, 1))).lower(params, x, pos).compile().as_text()


def optimizer_program(mesh) -> tuple[str, int]:
  """The tiny config's optimizer update (clipping, Muon, AdamW) of the whole model, its state sharded as
  `dsv4 train` shards it on `mesh` -> (compiled HLO, parameter bytes)."""
  cfg = TrainConfig.from_yaml(resolve_config("tiny"))
  _, state, tx = init_state(cfg, mesh)
  shapes = shapes_of(state)

  def update(params, grads, opt_state):
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  with jax.set_mesh(mesh):
    hlo = jax.jit(update).lower(shapes.params, shapes.params, shapes.opt_state).compile().as_text()
  return hlo, sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(state.params))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--seq", type=int, default=4096, help="sequence length of the attention layer")
  parser.add_argument("--tokens", type=int, default=4096, help="tokens through the MoE layer")
  args = parser.parse_args()
  tiny = ModelConfig.from_yaml(resolve_config("tiny"))
  configs = {"tiny": tiny, "small MoE": ModelConfig(**{**tiny.__dict__, **SMALL_MOE, "moe_capacity_factor": 2.0})}
  rows = []
  for name, cfg in configs.items():
    cfg = ModelConfig(**{**cfg.__dict__, "sliding_window": 128})
    for layer, build, mesh, size in (("MoE", moe_program, make_mesh(data=2, expert=4), args.tokens),
                                     ("CSA attention", attention_program, make_mesh(data=2, context=4), args.seq)):
      with automatic_partitioner():
        auto = collective_bytes(build(cfg, size, mesh))
      explicit = collective_bytes(build(cfg, size, mesh))
      rows.append((name, layer, size, auto, explicit))
  print(f"{'config':10s} {'layer':14s} {'size':>6s} {'collective':19s} {'auto MiB':>10s} {'explicit MiB':>13s}")
  for name, layer, size, auto, explicit in rows:
    for kind in KINDS:
      a, e = auto.get(kind, 0) / 2**20, explicit.get(kind, 0) / 2**20
      if a or e:
        print(f"{name:10s} {layer:14s} {size:6d} {kind:19s} {a:10.2f} {e:13.2f}")
    print(f"{name:10s} {layer:14s} {size:6d} {'total':19s} {sum(auto.values()) / 2**20:10.2f} "
          f"{sum(explicit.values()) / 2**20:13.2f}")
  print("\noptimizer update of the whole tiny model (Muon's Newton-Schulz on sharded matrices, AdamW), the state "
        "sharded as dsv4 train shards it")
  for sizes in (dict(fsdp=8), dict(data=2, fsdp=2, tensor=2), dict(expert=4, fsdp=2)):
    hlo, param_bytes = optimizer_program(make_mesh(**sizes))
    moved = collective_bytes(hlo)
    kinds = ", ".join(f"{kind} {moved[kind] / 2**20:.2f}" for kind in KINDS if moved.get(kind))
    print(f"  {sizes}: parameters {param_bytes / 2**20:.2f} MiB; collectives MiB: {kinds or 'none'}")


if __name__ == "__main__":
  main()
