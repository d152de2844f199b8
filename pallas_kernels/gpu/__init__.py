"""GPU variants (Pallas Triton backend) of the Pallas kernels: sparse attention (forward with LSE,
backward), lightning-indexer scores, and the fused mHC pre (Sinkhorn in-kernel) / post. Same functions,
signatures and argument checks as the TPU variants in `pallas_kernels`; the same integer index rules
(`pallas_kernels.index_rules`) and slot / lane layouts; their own grids and tile walks are proved by
`pallas_kernels.verify.gpu`. Plumbing and Triton constraints: `pallas_kernels.gpu.common`."""
