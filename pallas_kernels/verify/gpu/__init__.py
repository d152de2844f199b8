"""Z3 proofs of the GPU (Triton) kernels' integer arithmetic: their grids and BlockSpec index maps (with
the engine of `pallas_kernels.verify.engine`), the in-kernel tile walks (`pallas_kernels.gpu.common`:
padding, tile starts, tile counts), and how they meet the shared layouts and index rules (slot tiles,
gathered rows, entry tiles and the causal tile skip, mHC model-dim tiles and mixes columns)."""

from __future__ import annotations


def properties():
  from pallas_kernels.verify.gpu import common, indexer, mhc, sparse_attention
  return common.properties() + sparse_attention.properties() + indexer.properties() + mhc.properties()
