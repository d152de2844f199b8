"""Expert parallelism (parallel/expert.py) on 8 fake CPU devices: all-to-all dispatch in waves equals the
single-device routed experts (outputs; gradients on the (expert 8) mesh) when no copy is dropped; the program moves token copies
by all-to-all only (3 per wave: rows, their expert ids, outputs); with a short capacity the dropped copies
are exactly those beyond each (device, destination) pair's slots, and the output is the experts' sum over the
copies that were kept."""

import os
import subprocess
import sys
import textwrap

TESTS = os.path.dirname(os.path.abspath(__file__))

SCRIPT = textwrap.dedent("""
    import re
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx
    from helpers import randomize, tiny_config, tiny_model
    from dsv4_jax.layers.moe import RoutedExperts, swiglu
    from dsv4_jax.parallel import make_mesh
    from dsv4_jax.parallel.expert import capacity, routed_experts

    cfg = tiny_config()
    experts = randomize(RoutedExperts(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    t, k, e = 64, cfg.num_experts_per_tok, cfg.n_routed_experts
    x = jnp.asarray(rng.standard_normal((t, cfg.hidden_size)), jnp.float32)
    ids = np.stack([rng.choice(e, k, replace=False) for _ in range(t)]).astype(np.int32)
    ids[: t // 4] = [0, 1]            # device 0's tokens all go to the first experts: a skewed load
    weights = jnp.asarray(rng.random((t, k)), jnp.float32)
    w = (experts.w1[...], experts.w2[...], experts.w3[...])

    def single(x, weights, w1, w2, w3, kept=1.0):   # called outside any mesh: one device
      m = RoutedExperts(cfg, rngs=nnx.Rngs(0))
      m.w1.value, m.w2.value, m.w3.value = w1, w2, w3
      return m(x, jnp.asarray(ids), weights * kept)[0]

    def parallel(x, weights, w1, w2, w3, waves, factor):
      return routed_experts(x, jnp.asarray(ids), weights, w1, w2, w3, swiglu=swiglu, limit=cfg.swiglu_limit,
                            dtype=jnp.float32, waves=waves, capacity_factor=factor)

    grads = lambda f: jax.jit(jax.grad(lambda *a: jnp.sum(f(*a) ** 2), argnums=(0, 1, 2, 3, 4)))
    y0, g0 = single(x, weights, *w), grads(single)(x, weights, *w)
    for sizes in (dict(expert=8), dict(expert=4, data=2)):
      p = sizes["expert"]
      # A short capacity: drops counted per (source device, destination device) pair, in token order. Tokens
      # are split over all 8 devices (every batch axis), experts over the P of `expert`.
      factor, short_waves = 0.5, 2
      cap = capacity(t // 8, k, p, short_waves, factor)
      dest = (ids // (e // p)).reshape(8, -1)                      # [source device, its copies]
      rank = np.zeros_like(dest)
      for src in range(8):
        for j, d in enumerate(dest[src]):
          rank[src, j] = np.sum(dest[src, :j] == d)
      kept = (rank < cap * short_waves).reshape(t, k)
      y_kept = single(x, weights, *w, kept=jnp.asarray(kept, jnp.float32))
      with jax.set_mesh(make_mesh(**sizes)):
        for waves in (1, 2, 4):
          run = jax.jit(parallel, static_argnums=(5, 6))
          y1, dropped = run(x, weights, *w, waves, float(p))   # factor P: no copy can be dropped
          assert int(dropped) == 0
          np.testing.assert_allclose(y1, y0, rtol=0, atol=2e-6 * float(jnp.abs(y0).max()))
          if p == 8:   # gradients on one mesh (the whole train step on others: test_mesh_training.py)
            g1 = grads(lambda *a: parallel(*a, waves, float(p))[0])(x, weights, *w)
            for a, b in zip(g0, g1):
              np.testing.assert_allclose(b, a, rtol=0, atol=2e-6 * float(jnp.abs(a).max()))
          hlo = run.lower(x, weights, *w, waves, float(p)).compile().as_text()
          assert len(re.findall(r" all-to-all\\(", hlo)) == 3 * waves, hlo.count("all-to-all")
          assert not re.search(r" all-gather\\(", hlo)
          assert all(shape == "s32[]" for shape in re.findall(r"= (\\S+) all-reduce\\(", hlo))  # the drop count

        y2, dropped = jax.jit(parallel, static_argnums=(5, 6))(x, weights, *w, short_waves, factor)
        assert int(dropped) == int((~kept).sum()) > 0, (int(dropped), int((~kept).sum()))
        np.testing.assert_allclose(y2, y_kept, rtol=0, atol=2e-6 * float(jnp.abs(y0).max()))
      print("OK", sizes, int(dropped))

    # The whole model (hash-routed and score-routed layers, MTP): a forward issues 3 all-to-alls per MoE layer
    # and wave (its loss and gradients equal one device's in tests/test_mesh_training.py).
    model = tiny_model(seed=0, moe_capacity_factor=8.0, moe_waves=2)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    tokens = rng.integers(0, model.cfg.vocab_size, (2, 64)).astype(np.int32)
    with jax.set_mesh(make_mesh(expert=8)):   # before XLA's partitioner adds its own collectives
      out = lambda p: (lambda o: (o.logits, o.mtp_logits))(nnx.merge(graphdef, p, rest)(tokens))
      lowered = jax.jit(out).lower(params).as_text()
    moe_layers = model.cfg.num_hidden_layers + model.cfg.num_nextn_predict_layers
    assert lowered.count("all_to_all") == 3 * 2 * moe_layers, (lowered.count("all_to_all"), moe_layers)
    print("MODEL", moe_layers)
""")


def test_expert_parallel_equals_single_device_and_counts_drops():
  proc = subprocess.run([sys.executable, "-c", SCRIPT], cwd=TESTS, capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=900)
  assert proc.returncode == 0, proc.stdout + proc.stderr[-5000:]
  assert proc.stdout.count("OK") == 2 and "MODEL" in proc.stdout, proc.stdout
