"""The GPU kernels lower for CUDA through Triton, from this CPU-only machine (no GPU needed).

`jax.export(..., platforms=["cuda"])` runs the Pallas Triton lowering of every kernel (power-of-two block
checks, gather loads, atomic adds, loops, conds) and emits one `__gpu$xla.gpu.triton` custom call per
kernel call site, named after the kernel. Checked: each kernel's forward + backward at tiny and at
DeepSeek-V4-Flash shapes (abstract ShapeDtypeStructs: nothing is allocated), the dispatch choices, and a
whole train step of a small model (`kernels: auto` under `dispatch.kernel_platform("gpu")`), whose call
sites are counted from the model's structure.
"""

from __future__ import annotations

import collections
import re

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from dsv4_jax.config import TrainConfig
from dsv4_jax.layers.model import Transformer
from dsv4_jax.ops import dispatch
from dsv4_jax.ops import sparse_attention as sparse_ref
from dsv4_jax.optim import build_optimizer
from dsv4_jax.train.curriculum import StepKind
from dsv4_jax.train.step import TrainState, make_train_step, split_model
from pallas_kernels.gpu import indexer, mhc, sparse_attention

TRITON = "__gpu$xla.gpu.triton"
BF16 = jnp.bfloat16


def export_for_cuda(fn, *args):
  exported = jax.export.export(jax.jit(fn) if not hasattr(fn, "lower") else fn, platforms=["cuda"],
                               disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON)])(*args)
  return exported.mlir_module()


def triton_kernels(module: str) -> collections.Counter:
  """Kernel name -> number of Triton custom calls; asserts every custom call to a kernel is a Triton one."""
  calls = re.findall(r"stablehlo\.custom_call @([^(\s]+)\(", module)
  assert "mosaic" not in module.lower(), "a Mosaic (TPU / Mosaic GPU) kernel in a CUDA lowering"
  names = collections.Counter(re.findall(r'name = "([a-z_0-9]+_gpu)"', module))
  assert calls.count(TRITON) == sum(names.values()) > 0, (collections.Counter(calls), names)
  return names


def grad_all(fn, argnums):
  """Forward + backward: the sum of fn's (finite) outputs and its gradients (the value keeps every forward
  kernel live, also those whose outputs the backward does not need)."""
  def loss(*args):
    return sum(jnp.sum(jnp.where(jnp.isfinite(o), o, 0.0).astype(jnp.float32)) for o in jax.tree.leaves(fn(*args)))
  return jax.value_and_grad(loss, argnums=argnums)


def sds(shape, dtype=BF16):
  return jax.ShapeDtypeStruct(shape, dtype)


# (tokens, heads, head dim, kv rows, slots) / (tokens, index heads, index dim, entries) / (tokens, streams, d):
# tiny = helpers.TINY-like; flash = one 256-query chunk of a 4096-token sequence, and a 4096-token mHC.
SIZES = {"tiny": dict(attention=(6, 4, 32, 20, 11), indexer=(9, 16, 16, 5), mhc=(10, 4, 64)),
         "flash": dict(attention=(256, 64, 512, 5120, 640), indexer=(256, 64, 128, 1024), mhc=(4096, 4, 4096))}


# the second dtype (kv, k) differs from the queries' at the tiny size: the wrappers must give tl.dot equal types
SECOND_DTYPE = {"tiny": jnp.float32, "flash": BF16}


@pytest.mark.parametrize("size", sorted(SIZES))
def test_sparse_attention_lowers(size):
  s, h, d, n, k = SIZES[size]["attention"]
  fn = grad_all(lambda q, kv, sink, idx: sparse_attention.sparse_attention(
      q, kv, sink, idx, chunk_size=None, return_lse=True, interpret=False), (0, 1, 2))
  module = export_for_cuda(fn, sds((1, s, h, d)), sds((1, n, d), SECOND_DTYPE[size]), sds((h,), jnp.float32),
                           sds((1, s, k), jnp.int32))
  assert triton_kernels(module) == {"sparse_attention_fwd_gpu": 1, "sparse_attention_bwd_gpu": 1}


@pytest.mark.parametrize("size", sorted(SIZES))
def test_indexer_lowers(size):
  c, hi, di, n = SIZES[size]["indexer"]
  fn = grad_all(lambda q, w, k: indexer.indexer_scores(q, w, k, ratio=4, interpret=False), (0, 1, 2))
  module = export_for_cuda(fn, sds((1, c, hi, di)), sds((1, c, hi)), sds((1, n, di), SECOND_DTYPE[size]))
  assert triton_kernels(module) == {"indexer_scores_gpu": 1, "indexer_scores_dq_dw_gpu": 1, "indexer_scores_dk_gpu": 1}


@pytest.mark.parametrize("size", sorted(SIZES))
def test_mhc_lowers(size):
  s, n, d = SIZES[size]["mhc"]
  m = (2 + n) * n

  def both(x, mixes, scale, base):
    y, post, comb = mhc.mhc_pre(x, mixes, scale, base, iters=20, eps=1e-6, interpret=False)
    return mhc.mhc_post(y, x, post, comb, interpret=False)

  module = export_for_cuda(grad_all(both, (0, 1, 2, 3)), sds((1, s, n, d)), sds((1, s, m), jnp.float32),
                           sds((3,), jnp.float32), sds((m,), jnp.float32))
  assert triton_kernels(module) == {"mhc_pre_gpu": 1, "mhc_pre_grad_gpu": 1, "mhc_post_gpu": 1,
                                    "mhc_post_grad_gpu": 1}


def test_dispatch_picks_the_variant():
  from pallas_kernels import sparse_attention as tpu_attention
  assert dispatch.sparse_attention("pallas") is tpu_attention.sparse_attention  # CPU: the TPU variant, interpreted
  assert dispatch.sparse_attention("auto") is sparse_ref.sparse_attention and dispatch.variant("auto") is None
  with dispatch.kernel_platform("gpu"):
    for kernels in ("auto", "pallas"):
      assert dispatch.variant(kernels) == "gpu"
      chosen = dispatch.mhc_pre(kernels)
      assert chosen.func is mhc.mhc_pre and chosen.keywords == {"interpret": False}
    assert dispatch.sparse_attention("xla") is sparse_ref.sparse_attention
  with dispatch.kernel_platform("tpu", interpret=True):
    assert dispatch.variant("auto") == "tpu" and dispatch.indexer_scores("auto").keywords == {"interpret": True}
  assert dispatch.variant("auto") is None  # the override ends with the context
  with pytest.raises(ValueError, match="platform must be"):
    with dispatch.kernel_platform("cuda"):
      pass


RUN = {
    "model": dict(vocab_size=260, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=32,
                  q_lora_rank=16, o_groups=2, o_lora_rank=8, qk_rope_head_dim=8, sliding_window=16,
                  compress_ratios=[4, 128, 0], index_n_heads=4, index_head_dim=16, index_topk=4,
                  n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, num_hash_layers=0,
                  attention_chunk_size=128, kernels="auto", dtype="bfloat16"),
    "data": {"source": "stdlib"},
    "curriculum": [{"seq_len": 256, "steps": 2, "attention": "sparse", "train_indexer": True}],
    "optimizer": {"warmup_steps": 1},
    "train": {"tokens_per_batch": 256},
}


def test_train_step_lowers_for_cuda_with_every_kernel_in_triton():
  """A sparse train step with the indexer loss (forward, backward, optimizer) of a model with a CSA (ratio 4),
  an HCA (ratio 128) and a window-only MTP block, S = 256 in query chunks of 128; bf16 compute (so the
  kernels also meet mixed dtypes, e.g. bf16 indexer queries against fp32-pooled compressed keys)."""
  cfg = TrainConfig.from_dict(RUN)
  graphdef, params, extra = split_model(nnx.eval_shape(lambda: Transformer(cfg.model, rngs=nnx.Rngs(0))))
  tx = build_optimizer(cfg.optimizer, params)
  state = TrainState(sds((), jnp.int32), params, extra, jax.eval_shape(tx.init, params))
  step = make_train_step(graphdef, tx, cfg, cfg.optimizer.decay_start_step)
  batch = {key: sds((1, 256), jnp.float32 if key == "loss_mask" else jnp.int32)
           for key in ("input_ids", "targets", "loss_mask", "segment_ids", "target_bytes", "positions")}
  with dispatch.kernel_platform("gpu"):
    module = export_for_cuda(step, state, batch, StepKind("sparse", True, False))
  blocks = len(cfg.model.compress_ratios)  # 2 main blocks + 1 MTP block
  csa = list(cfg.model.compress_ratios).count(4)
  # Per block: 2 hyper-connections × (pre, post) forward and their gradient kernels; the attention kernel
  # forward, again when the checkpointed query chunks are rematerialised in the backward (S > chunk), and
  # its backward; per CSA layer the indexer scores likewise (forward twice, dq/dw, dk).
  expected = {"mhc_pre_gpu": 2 * blocks, "mhc_post_gpu": 2 * blocks, "mhc_pre_grad_gpu": 2 * blocks,
              "mhc_post_grad_gpu": 2 * blocks, "sparse_attention_fwd_gpu": 2 * blocks,
              "sparse_attention_bwd_gpu": blocks, "indexer_scores_gpu": 2 * csa, "indexer_scores_dq_dw_gpu": csa,
              "indexer_scores_dk_gpu": csa}
  assert triton_kernels(module) == expected
  assert sum(expected.values()) == 37
