"""The one place that chooses between a Pallas kernel (`pallas_kernels`) and its XLA reference (`dsv4_jax.ops`).

`kernels` is the ModelConfig field:
  "xla"     the pure-JAX references in dsv4_jax/ops;
  "pallas"  the Pallas kernels: the TPU variant (pallas_kernels.*, Mosaic) on TPU, the GPU variant
            (pallas_kernels.gpu.*, Triton) on GPU, and on CPU the TPU variant in interpret mode;
  "auto"    Pallas on TPU and GPU (each its own variant), XLA on CPU.
Each function below returns an implementation; all choices take the same arguments and compute the
same function, so a layer calls `dispatch.<op>(cfg.kernels)(...)` and never looks at the backend.

The platform is `jax.default_backend()` at trace time. `kernel_platform("gpu")` (or "tpu") overrides it
for code traced inside the context: to lower for another platform from this host (e.g.
`jax.export(..., platforms=["cuda"])` on a CPU machine gives the Triton kernels), or, with
`interpret=True`, to run that variant in interpret mode on CPU (tests). Trace inside the context: a
function jitted and traced before it keeps the choice made then.
"""

from __future__ import annotations

import contextlib
import functools
import threading

import jax

from dsv4_jax.ops import hybrid_attention as hybrid
from dsv4_jax.ops import indexer as indexer_ref
from dsv4_jax.ops import mhc as mhc_ref
from dsv4_jax.ops import sparse_attention as sparse_ref

_state = threading.local()


@contextlib.contextmanager
def kernel_platform(platform: str, *, interpret: bool = False):
  """Within this context, pick kernels as if the default backend were `platform` ("tpu" | "gpu") and run
  the Pallas ones compiled (interpret=False) or interpreted (interpret=True)."""
  if platform not in ("tpu", "gpu"):
    raise ValueError(f"kernel_platform: platform must be 'tpu' or 'gpu', got {platform!r}")
  previous = getattr(_state, "target", None)
  _state.target = (platform, interpret)
  try:
    yield
  finally:
    _state.target = previous


def platform() -> str:
  """The platform kernels are chosen for: the kernel_platform override, else jax.default_backend()."""
  target = getattr(_state, "target", None)
  return target[0] if target is not None else jax.default_backend()


def variant(kernels: str) -> str | None:
  """Which implementation `kernels` selects here: "tpu" / "gpu" (a Pallas variant) or None (XLA)."""
  if kernels not in ("auto", "pallas", "xla"):
    raise ValueError(f"kernels: expected 'auto', 'pallas' or 'xla', got {kernels!r}")
  p = platform()
  if kernels == "xla" or (kernels == "auto" and p not in ("tpu", "gpu")):
    return None
  return "gpu" if p == "gpu" else "tpu"  # pallas on CPU: the TPU variant, interpreted


def use_pallas(kernels: str) -> bool:
  return variant(kernels) is not None


def _kernel(kernels: str, op: str):
  """The Pallas function `op` of the selected variant, or None for XLA."""
  v = variant(kernels)
  if v is None:
    return None
  if v == "gpu":
    from pallas_kernels.gpu import indexer, mhc, sparse_attention as attention
  else:
    from pallas_kernels import indexer, mhc, sparse_attention as attention
  fn = {"sparse_attention": attention.sparse_attention, "indexer_scores": indexer.indexer_scores,
        "mhc_pre": mhc.mhc_pre, "mhc_post": mhc.mhc_post}[op]
  target = getattr(_state, "target", None)
  return fn if target is None else functools.partial(fn, interpret=target[1])


def sparse_attention(kernels: str):
  """(q [B,S,H,D], kv [B,N,D], sink [H], idx [B,S,K], *, scale, chunk_size, return_lse) -> o (, lse)."""
  return _kernel(kernels, "sparse_attention") or sparse_ref.sparse_attention


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
  return _kernel(kernels, "indexer_scores") or _reference_indexer_scores


def _reference_indexer_scores(q, w, k, *, ratio, rows):
  del ratio, rows  # the reference leaves invisible entries unmasked (see indexer_scores)
  return indexer_ref.indexer_scores(q, w, k)


def mhc_pre(kernels: str):
  """(X [B,S,N,d], mixes [B,S,(2+N)·N], scale [3], base [(2+N)·N], *, iters, eps) -> (y, post, comb)."""
  return _kernel(kernels, "mhc_pre") or mhc_ref.mhc_pre


def mhc_post(kernels: str):
  """(y [B,S,d], X [B,S,N,d], post [B,S,N], comb [B,S,N,N]) -> [B,S,N,d]."""
  return _kernel(kernels, "mhc_post") or mhc_ref.mhc_post
