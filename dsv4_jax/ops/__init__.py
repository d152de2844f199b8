"""Pure-JAX reference ops, and the dispatch point that picks a Pallas kernel or the reference.

`index_rules` is `pallas_kernels.index_rules`, the integer index rules (window rows, compressed-entry
visibility, top-k slot layout, decode ring) that the references, the kernels, decoding and the Z3 proofs
all call; the layers reach it through this package (`from dsv4_jax.ops import index_rules`).
"""

from pallas_kernels import index_rules

__all__ = ["index_rules"]
