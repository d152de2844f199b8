"""Step time with anticipatory routing off and on, measured side by side in one process.

off: the train step as the loop runs it (routing indices all −1: the routers choose).
on:  what each step of an active period costs: the routing-only forward of the batch Δt steps ahead
     (Transformer.route, no gradients, stopping after the last MoE router) plus the same train step
     given the indices stored Δt steps earlier (dsv4_jax/train/anticipatory.py drives both).
Rounds of `--steps` steps alternate off / on, so that the machine's load affects both alike; the
script prints the median ms per step of each, their ratio, and the routing-only forward alone.
  python benchmarks/anticipatory.py [--config configs/tiny.yaml] [--seq_len 256] [--batch 8]
                                    [--steps 10] [--rounds 6] [--delay 2] [--attention dense|sparse]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.config import TrainConfig
from dsv4_jax.train.anticipatory import AnticipatoryRouting, make_route_fn
from dsv4_jax.train.curriculum import StepKind
from dsv4_jax.train.loop import init_state
from dsv4_jax.train.step import make_train_step, own_routing


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--config", default="configs/tiny.yaml")
  parser.add_argument("--seq_len", type=int, default=256)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--steps", type=int, default=10, help="steps per round")
  parser.add_argument("--rounds", type=int, default=6, help="rounds per mode (alternating)")
  parser.add_argument("--delay", type=int, default=2, help="Δt")
  parser.add_argument("--attention", default="dense", choices=["dense", "sparse"])
  args = parser.parse_args()
  cfg = TrainConfig.from_yaml(args.config)
  mcfg = cfg.model
  b, s = args.batch, args.seq_len
  rng = np.random.default_rng(0)

  def batch():
    ids = rng.integers(1, mcfg.vocab_size, (b, s)).astype(np.int32)
    return {"input_ids": ids, "targets": np.roll(ids, -1, 1), "loss_mask": np.ones((b, s), np.float32),
            "segment_ids": np.ones((b, s), np.int32), "target_bytes": np.ones((b, s), np.int32),
            "positions": np.broadcast_to(np.arange(s, dtype=np.int32), (b, s))}

  n = args.steps * args.rounds * 2 + args.delay + 2
  batches = [{k: jnp.asarray(v) for k, v in batch().items()} for _ in range(n)]
  graphdef, state, tx = init_state(cfg)
  state = jax.tree.map(jnp.asarray, state)
  kind = StepKind(args.attention, args.attention == "sparse", False)
  step_fn = make_train_step(graphdef, tx, cfg, cfg.optimizer.decay_start_step)
  route_fn = make_route_fn(graphdef)
  own = own_routing(mcfg, b, s)
  routing = AnticipatoryRouting(route_fn, args.delay, lambda _: kind)

  t = time.perf_counter()
  state, m = step_fn(state, batches[0], kind, own)
  float(m["loss"])
  compile_step = time.perf_counter() - t
  t = time.perf_counter()
  jax.block_until_ready(route_fn(state.params, state.extra, batches[1], kind.attention))
  compile_route = time.perf_counter() - t
  print(f"{args.config}: batch {b} x seq {s}, {kind.attention} attention, delay {args.delay}, "
        f"{len(range(mcfg.num_hash_layers, mcfg.num_hidden_layers))} score-routed layers "
        f"(compiling: step {compile_step:.1f} s, routing-only forward {compile_route:.1f} s)")

  times = {"off": [], "on": [], "route": []}
  step = 1
  routing.activate(step, n)
  for _ in range(args.rounds):
    for mode in ("off", "on"):
      for _ in range(args.steps):
        t = time.perf_counter()
        if mode == "on":
          ids = routing.routing_for(step, state, lambda ahead: batches[step + ahead], n)
        else:   # the indices this step would have used stay stored; the next "on" step recomputes
          routing.stored.pop(step, None)
          ids = own
        state, m = step_fn(state, batches[step], kind, ids)
        float(m["loss"])   # the loop reads the loss of every step
        times[mode].append(time.perf_counter() - t)
        routing.done(step)
        step += 1
  for i in range(args.steps * 2):
    t = time.perf_counter()
    jax.block_until_ready(route_fn(state.params, state.extra, batches[i], kind.attention))
    times["route"].append(time.perf_counter() - t)

  off, on, route = (1e3 * float(np.median(times[k])) for k in ("off", "on", "route"))
  print(f"off: {off:8.1f} ms/step   (median of {len(times['off'])} steps)")
  print(f"on:  {on:8.1f} ms/step   (median of {len(times['on'])} steps)")
  print(f"on / off: {on / off:.3f}  (+{100 * (on / off - 1):.1f}% while anticipatory routing is active)")
  print(f"routing-only forward alone: {route:.1f} ms ({100 * route / off:.1f}% of a step)")


if __name__ == "__main__":
  main()
