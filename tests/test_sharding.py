"""The forward under a (data 2, fsdp 2, tensor 2) mesh of 8 fake CPU devices equals the 1-device result."""

import subprocess
import sys
import textwrap

SCRIPT = textwrap.dedent("""
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np
    from flax import nnx
    from helpers import tiny_model
    from dsv4_jax.parallel import make_mesh, shard_model

    model = tiny_model(seed=0)
    ids = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (4, 160))
    graphdef, state = nnx.split(model)
    forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids).logits)
    expected = np.asarray(forward(state, ids))

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    with jax.set_mesh(mesh):
      shard_model(model, mesh)
      _, state = nnx.split(model)
      wq_b = state["layers"][1]["attn"]["wq_b"]["weight"].value
      assert wq_b.sharding.spec[0] == "tensor", wq_b.sharding
      experts = state["layers"][1]["ffn"]["experts"]["w1"].value
      assert experts.sharding.spec[2] == "fsdp", experts.sharding
      got = forward(state, ids)
      assert len(got.sharding.device_set) == 8
    rel = np.abs(np.asarray(got) - expected).max() / np.abs(expected).max()
    print("REL", rel)
    assert rel <= 1e-5, rel
""")


def test_sharded_forward_equals_single_device(tmp_path):
  tests_dir = __import__("os").path.dirname(__file__)
  result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=tests_dir, capture_output=True, text=True,
                          env={**__import__("os").environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "REL" in result.stdout
