"""Context parallelism (parallel/context.py) on fake CPU devices: the sequence split over `context` gives the
unsharded model's logits and gradients; at 8K tokens a CSA layer's per-device temporary memory falls to a
quarter over 4 shards, and no collective moves a full-length array (only the halos and the S/4 entries)."""

import os
import subprocess
import sys
import textwrap

TESTS = os.path.dirname(os.path.abspath(__file__))

EQUALITY = textwrap.dedent("""
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from helpers import tiny_model
    from dsv4_jax.parallel import make_mesh

    model = tiny_model(seed=0)   # layers: window, CSA (indexer), HCA, CSA, window; MTP; W = 16
    b, s = 2, 512
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.cfg.vocab_size, (b, s)).astype(np.int32)
    seg = np.ones((b, s), np.int32)
    pos = np.tile(np.arange(s, dtype=np.int32), (b, 1))
    seg[0, 256:], pos[0, 256:] = 2, np.arange(s - 256)     # a second document starting on shard 2
    seg[0, 384:], pos[0, 384:] = 3, np.arange(s - 384)     # and a third exactly at a shard boundary
    seg[1, 500:], pos[1, 500:] = 0, 0                       # padding at the end of row 1
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(params):
      out = nnx.merge(graphdef, params, rest)(ids, segment_ids=seg, positions=pos, attention_mode="sparse")
      mask = jnp.asarray(seg != 0)[..., None]
      return (jnp.sum(jnp.where(mask, out.logits, 0.0) ** 2) * 1e-3 + jnp.sum(out.mtp_logits ** 2) * 1e-3
              + out.aux["indexer_loss"]), (out.logits, out.aux["indexer_loss"])

    step = jax.jit(jax.value_and_grad(loss, has_aux=True))
    (l0, (logits0, kl0)), g0 = step(params)
    with jax.set_mesh(make_mesh(data=2, context=4)):
      (l1, (logits1, kl1)), g1 = step(params)
    assert float(kl0) > 0, kl0                 # the indexer loss is exercised
    mask = seg != 0
    rel = np.abs(np.asarray(logits1) - np.asarray(logits0))[mask].max() / np.abs(np.asarray(logits0)).max()
    worst = max((np.abs(np.asarray(a) - np.asarray(c)).max() / np.abs(np.asarray(a)).max(), "/".join(map(str, p)))
                for (p, a), (_, c) in zip(nnx.to_flat_state(g0), nnx.to_flat_state(g1)) if np.abs(np.asarray(a)).max() > 0)
    print("LOSS", float(l0), float(l1), "LOGITS", rel, "GRAD", worst)
    assert abs(float(l1) - float(l0)) <= 1e-5 * abs(float(l0))
    assert rel <= 1e-5, rel
    assert worst[0] <= 1e-4, worst
""")

MEMORY = textwrap.dedent("""
    import re
    import jax
    jax.config.update("jax_num_cpu_devices", 4)
    import jax.numpy as jnp
    from flax import nnx
    from jax.sharding import NamedSharding, PartitionSpec as P
    from helpers import tiny_config
    from dsv4_jax.layers.attention import Attention
    from dsv4_jax.parallel import make_mesh

    S = 8192
    cfg = tiny_config(attention_chunk_size=256, sliding_window=128)
    graphdef, params, rest = nnx.split(Attention(cfg, 4, rngs=nnx.Rngs(0)), nnx.Param, ...)

    def loss(params, x, pos):
      out, aux, _ = nnx.merge(graphdef, params, rest)(x, pos, jnp.ones_like(pos), attention_mode="sparse")
      return jnp.sum(out ** 2) + aux["indexer_kl_sum"]

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    x, pos = jax.ShapeDtypeStruct((1, S, cfg.hidden_size), jnp.float32), jax.ShapeDtypeStruct((1, S), jnp.int32)
    single = grad.lower(params, x, pos).compile().memory_analysis().temp_size_in_bytes
    mesh = make_mesh(context=4)
    seq = NamedSharding(mesh, P(None, "context"))
    with jax.set_mesh(mesh):
      compiled = grad.lower(params, jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=seq),
                            jax.ShapeDtypeStruct(pos.shape, pos.dtype, sharding=seq)).compile()
    sharded = compiled.memory_analysis().temp_size_in_bytes
    print("TEMP MiB", single / 2**20, sharded / 2**20, "RATIO", sharded / single)
    assert sharded <= 0.35 * single, (single, sharded)
    collectives = re.findall(r"= \\S+\\[([0-9,]*)\\][^ ]* (all-gather|collective-permute)\\(", compiled.as_text())
    kinds = {kind for _, kind in collectives}
    assert kinds == {"all-gather", "collective-permute"}, collectives
    for dims, kind in collectives:
      rows = [int(d) for d in dims.split(",") if d]
      assert S not in rows and (kind != "all-gather" or max(rows) <= S // 4), (dims, kind)
""")


def _run(script):
  proc = subprocess.run([sys.executable, "-c", script], cwd=TESTS, capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=900)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
  return proc.stdout


def test_context_parallel_model_equals_unsharded():
  assert "LOGITS" in _run(EQUALITY)


def test_context_parallel_memory_and_collectives_at_8k():
  assert "RATIO" in _run(MEMORY)
