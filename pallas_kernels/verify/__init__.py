"""Z3 proofs of the model's index rules (`pallas_kernels.index_rules`) and of the Pallas kernels' grids,
index maps and masks, TPU variants and GPU variants (`verify/gpu/`). `main()` backs `dsv4 verify-kernels`."""

from __future__ import annotations

import sys


def all_properties():
  """Every property of every kernel, as a list of engine.Result."""
  from pallas_kernels.verify import gpu, index_rules, indexer, mhc, sparse_attention
  return (index_rules.properties() + sparse_attention.properties() + indexer.properties() + mhc.properties()
          + gpu.properties())


def main(argv=None) -> int:
  """Prints each property with PROVED or a counterexample; returns 0 iff all are proved."""
  results = all_properties()
  for r in results:
    print(r.line())
  failed = [r for r in results if not r.proved]
  print(f"{len(results) - len(failed)}/{len(results)} properties proved"
        + (f"; {len(failed)} FAILED" if failed else ""))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
