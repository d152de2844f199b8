"""The one place that chooses between a Pallas kernel (`pallas_kernels`) and its XLA reference (`dsv4_jax.ops`).

`kernels` is the ModelConfig field:
  "xla"     the pure-JAX references in dsv4_jax/ops;
  "pallas"  the Pallas kernels (interpret mode on CPU, compiled on TPU);
  "auto"    Pallas on TPU, XLA elsewhere (the kernels gather rows with TPU scalar prefetch, which the
            GPU backends of Pallas cannot express, so GPU runs the references).
Each function below returns an implementation; both choices take the same arguments and compute the
same function, so a layer calls `dispatch.<op>(cfg.kernels)(...)` and never looks at the backend.
"""

from __future__ import annotations

import functools

import jax

from dsv4_jax.ops import hybrid_attention as hybrid
from dsv4_jax.ops import indexer as indexer_ref
from dsv4_jax.ops import mhc as mhc_ref
from dsv4_jax.ops import sparse_attention as sparse_ref


def use_pallas(kernels: str) -> bool:
  if kernels == "auto":
    return jax.default_backend() == "tpu"
  return kernels == "pallas"


def sparse_attention(kernels: str):
  """(q [B,S,H,D], kv [B,N,D], sink [H], idx [B,S,K], *, scale, chunk_size, return_lse) -> o (, lse)."""
  if use_pallas(kernels):
    from pallas_kernels.sparse_attention import sparse_attention as kernel
    return kernel
  return sparse_ref.sparse_attention


def hybrid_attention(kernels: str):
  """One query chunk over its window rows ∪ compressed rows (see ops/hybrid_attention.py).

  XLA: the window is read as a band of contiguous rows (dense matmuls); Pallas: every row is gathered
  by index inside the sparse-attention kernel.
  """
  if use_pallas(kernels):
    return functools.partial(hybrid.gathered_attention, sparse_attention=sparse_attention(kernels))
  return hybrid.banded_attention


def indexer_scores(kernels: str):
  """(q [B,C,Hi,Di], w [B,C,Hi], k [B,N,Di], *, ratio, rows [B,C]) -> fp32 scores [B,C,N].

  Equal wherever entry i is complete at query row rows[b, c] (`entry_visible`). Elsewhere the kernel
  writes −inf (and may skip the work) while the reference leaves the raw score: callers mask with the
  full visibility (segments included) before using them, as `ops.indexer.select_topk` does."""
  if use_pallas(kernels):
    from pallas_kernels.indexer import indexer_scores as kernel
    return kernel
  return _reference_indexer_scores


def _reference_indexer_scores(q, w, k, *, ratio, rows):
  del ratio, rows  # the reference leaves invisible entries unmasked (see indexer_scores)
  return indexer_ref.indexer_scores(q, w, k)


def mhc_pre(kernels: str):
  """(X [B,S,N,d], mixes [B,S,(2+N)·N], scale [3], base [(2+N)·N], *, iters, eps) -> (y, post, comb)."""
  if use_pallas(kernels):
    from pallas_kernels.mhc import mhc_pre as kernel
    return kernel
  return mhc_ref.mhc_pre


def mhc_post(kernels: str):
  """(y [B,S,d], X [B,S,N,d], post [B,S,N], comb [B,S,N,N]) -> [B,S,N,d]."""
  if use_pallas(kernels):
    from pallas_kernels.mhc import mhc_post as kernel
    return kernel
  return mhc_ref.mhc_post
