"""Pallas kernels for DeepSeek-V4 (sparse attention, lightning indexer, mHC) and Z3 proofs of their
index arithmetic (`pallas_kernels.verify`). Independent of dsv4_jax: dsv4_jax/ops imports these."""
