"""The single point that chooses between a Pallas kernel and the XLA reference for each op.

`kernels` (a ModelConfig field): "xla" = the pure-JAX reference in dsv4_jax/ops; "pallas" = the
kernels in `pallas_kernels` (interpret mode on CPU); "auto" = Pallas on TPU, XLA elsewhere (the
sparse-attention row gather needs TPU scalar prefetch, which Pallas's GPU backends lack).
"""

from __future__ import annotations

import jax

from dsv4_jax.ops.sparse_attention import sparse_attention


def use_pallas(kernels: str) -> bool:
  if kernels == "auto":
    return jax.default_backend() == "tpu"
  return kernels == "pallas"


def sparse_attention_fn(kernels: str):
  """The sparse-attention implementation for `kernels` (same signature as ops.sparse_attention)."""
  if use_pallas(kernels):
    from pallas_kernels.sparse_attention import sparse_attention as pallas_sparse_attention
    return pallas_sparse_attention
  return sparse_attention
