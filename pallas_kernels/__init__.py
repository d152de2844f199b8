"""Pallas kernels for DeepSeek-V4 (sparse attention, lightning indexer, mHC) in two variants, TPU (this
package's modules, Mosaic) and GPU (`pallas_kernels.gpu`, Triton), the model's integer index rules
(`pallas_kernels.index_rules`: window, decode ring buffer, compressed entries, slot layout) and Z3 proofs
of both (`pallas_kernels.verify`). Independent of dsv4_jax: dsv4_jax/ops imports these."""
