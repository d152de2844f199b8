"""`dsv4 plan` (train/plan.py) against XLA's own accounting of the compiled train step.

On 8 fake CPU devices, for three small configs on three meshes (each with an expert axis: without one XLA does
not split the routed experts over the batch, see train/plan.py), the plan's per-chip bytes are compared with
`compiled.memory_analysis()` of the real train step (train/step.py, lowered as `dsv4 train` lowers it):
  state + batch   plan: parameters + optimizer state + other state + batch
                  XLA:  argument_size (the donated train state, the batch and the routing indices): within 1%
  peak            plan: the above + gradients + saved activations (remat "none")
                  XLA:  argument_size + temp_size (outputs alias the donated arguments): within 20%
"""

import os
import re
import subprocess
import sys
import textwrap

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
ENV.pop("DSV4_DEBUG", None)

SCRIPT = textwrap.dedent("""
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import jax.numpy as jnp
    from dsv4_jax.config import TrainConfig
    from dsv4_jax.parallel import make_mesh
    from dsv4_jax.train import plan
    from dsv4_jax.train.compile_ahead import shapes_of
    from dsv4_jax.train.curriculum import StepKind
    from dsv4_jax.train.loop import init_state
    from dsv4_jax.train.placement import Placement
    from dsv4_jax.train.step import make_train_step, routing_shape
    from dsv4_jax.data.packing import empty_row

    # One layer each: CSA (sparse attention, indexer loss), HCA and window-only (dense attention).
    MODEL = dict(vocab_size=260, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=32,
                 q_lora_rank=16, o_groups=2, o_lora_rank=8, qk_rope_head_dim=8, sliding_window=16,
                 num_nextn_predict_layers=0, index_n_heads=4, index_head_dim=16, index_topk=8, n_routed_experts=8,
                 num_experts_per_tok=2, moe_intermediate_size=32, num_hash_layers=0, attention_chunk_size=128)
    CASES = [([4], dict(expert=8), 8, 512, "sparse"),
             ([128], dict(fsdp=2, expert=4), 8, 1024, "dense"),
             ([0], dict(data=4, expert=2), 16, 256, "dense")]
    for ratios, mesh, rows, seq_len, attention in CASES:
      cfg = TrainConfig.from_dict({"model": dict(MODEL, compress_ratios=ratios), "data": {"source": "stdlib"},
                                   "optimizer": {"warmup_steps": 1},
                                   "curriculum": [{"seq_len": seq_len, "steps": 1, "attention": attention,
                                                   "batch_size": rows}], "mesh": mesh})
      sizes = cfg.mesh.axis_sizes(8, cfg.model.n_routed_experts)
      memory = plan.memory_per_chip(cfg, cfg.curriculum[0], rows, sizes)
      mesh = make_mesh(**sizes)
      graphdef, state, tx = init_state(cfg, mesh)
      placement = Placement.of(mesh, state.params, state.extra, tx)
      step = make_train_step(graphdef, tx, cfg, 100, placement.state)
      batch = {k: jax.ShapeDtypeStruct((rows, seq_len), v.dtype, sharding=placement.batch_sharding((rows, seq_len)))
               for k, v in empty_row(seq_len, 0).items()}
      shape = routing_shape(cfg.model, rows, seq_len)
      routing = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=placement.routing_sharding(shape))
      with jax.set_mesh(mesh):
        xla = step.lower(shapes_of(state), batch, StepKind(attention, attention == "sparse", False),
                         routing).compile().memory_analysis()
      held = sum(memory[k] for k in ("parameters", "optimizer", "other state", "batch"))
      print(f"CASE {mesh.shape} {rows}x{seq_len} ratio {ratios[0]}: state+batch plan {held:.0f} "
            f"xla {xla.argument_size_in_bytes} | peak plan {memory['peak']:.0f} "
            f"xla {xla.argument_size_in_bytes + xla.temp_size_in_bytes}")
    # The whole plan of the last case, as `dsv4 plan` prints it.
    print(plan.format_plan(plan.plan(cfg, "h100", 8), "h100", 8, 0.4, "window"))
    print(f"PEAK {memory['peak'] / 2**30:,.2f}")
""")


def test_plan_memory_is_within_20_percent_of_xla_on_three_meshes():
  result = subprocess.run([sys.executable, "-c", SCRIPT], cwd=TESTS, capture_output=True, text=True,
                          env={**ENV, "JAX_NUM_CPU_DEVICES": "8"}, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
  cases = re.findall(r"CASE (.*): state\+batch plan (\d+) xla (\d+) \| peak plan (\d+) xla (\d+)", result.stdout)
  assert len(cases) == 3, result.stdout
  for name, held, args, peak, total in cases:
    print(f"{name}: state + batch plan/XLA {int(held) / int(args):.4f}, peak plan/XLA {int(peak) / int(total):.3f}")
    assert abs(int(held) / int(args) - 1) <= 0.01, (name, held, args)
    assert abs(int(peak) / int(total) - 1) <= 0.20, (name, peak, total)
  table = result.stdout[result.stdout.index("plan window"):].splitlines()
  assert table[0] == ("plan window: 8 × H100 SXM (80 GB HBM = 74.5 GiB, 989 TFLOP/s bf16); mesh (data 4, expert 2); "
                      "MFU 40%")
  rows = {line[:28].strip(): line[28:].split() for line in table[2:] if line.startswith(" ") or line[:1].isalpha()}
  assert rows["seq_len × rows"] == ["256", "×", "16"] and rows["rows / chip"] == ["2.00"]
  assert rows["peak"] == [re.search(r"PEAK (\S+)", result.stdout).group(1)] and rows["fits in HBM"] == ["yes"]
  assert rows["tokens / step"] == ["4.10K"] and rows["fewest chips"] == ["8"]   # a mesh of fixed sizes


def _dsv4(*args):
  return subprocess.run([sys.executable, "-m", "dsv4_jax.cli", "plan", *args], capture_output=True, text=True,
                        env=ENV, cwd=REPO, timeout=180)


def test_bad_chip_and_a_mesh_that_does_not_fit_are_one_line_errors():
  for args, message in [
      (["--chip", "tpu9", "--chips", "8"], "--chip tpu9: expected one of v5p, v6e, h100, h200, b200"),
      (["--chip", "h100", "--chips", "8", "--set", "mesh.fsdp=3"],
       "mesh: the fixed axes {'fsdp': 3, 'expert': 1, 'tensor': 1, 'context': 1} use 3 devices, which does not "
       "divide the 8 devices available (the -1 axis 'data' takes the rest)")]:
    proc = _dsv4("--config", "configs/tiny.yaml", *args)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [f"dsv4 plan: error: {message}"]
