"""Z3 proofs of the GPU kernels' shared tile arithmetic (`pallas_kernels.gpu.common`).

A dimension of n elements is padded to P = padded(n, T) and walked in-kernel in tile_count(P, T) tiles
starting at tile_start(i, T); every GPU kernel's loops (slot tiles, entry / query tiles, model-dim
tiles) use these three functions, so proving them here once covers every loop: the tiles lie inside the
padded array, are pairwise disjoint, and together cover it.
"""

from __future__ import annotations

import z3

from pallas_kernels.gpu import common
from pallas_kernels.verify.engine import Result, functions_under_proof, prove

KERNEL = "gpu_tiles"
NAMES = ("padded", "tile_start", "tile_count")


def _fns(overrides):
  return functions_under_proof(common, NAMES, overrides)


def properties(**overrides) -> list[Result]:
  f = _fns(overrides)
  n, tile, i, i2, x = z3.Ints("n T i i2 x")
  hyp = [n >= 1, tile >= 1]
  p = f["padded"](n, tile)
  count = f["tile_count"](p, tile)
  start = lambda k: f["tile_start"](k, tile)
  in_tiles = lambda k: z3.And(0 <= k, k < count)
  return [
      prove(KERNEL, "padding: T | padded(n), n ≤ padded(n) < n + T", z3.And(p % tile == 0, n <= p, p < n + tile),
            hyp, [n, tile]),
      prove(KERNEL, "tile walk: tile_count(padded(n)) · T = padded(n)", count * tile == p, hyp, [n, tile]),
      prove(KERNEL, "tile walk: every tile [start, start + T) lies in [0, padded(n))",
            z3.And(0 <= start(i), start(i) + tile <= p), hyp + [in_tiles(i)], [n, tile, i]),
      prove(KERNEL, "tile walk: tiles are disjoint", z3.Implies(i < i2, start(i) + tile <= start(i2)),
            hyp + [in_tiles(i), in_tiles(i2)], [n, tile, i, i2]),
      prove(KERNEL, "tile walk: every element of [0, padded(n)) lies in a tile",
            z3.And(in_tiles(x / tile), start(x / tile) <= x, x < start(x / tile) + tile),
            hyp + [0 <= x, x < p], [n, tile, x]),
  ]
