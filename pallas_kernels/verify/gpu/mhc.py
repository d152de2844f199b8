"""Z3 contracts of the GPU mHC kernels (pre, pre-grad, post, post-grad) and of their model-dim tiles.

Symbolic sizes: N streams, dp padded model dim, bt token tile, TT tiles (tokens padded to TP = TT·bt).
[TP, lanes] operands come in (bt, lanes) blocks, [TP, N, dp] stream operands in (bt, N, dp) blocks, the
[M] parameter vectors whole. The mixes columns (`pre_cols`, `post_cols`, `comb_cols`, `comb_col`,
`mix_count`) are the TPU variant's lane layout, shared and proved in verify/mhc.py; this module proves
the GPU grid and index maps, the d-tile walk, and that the gradient kernel's dz column writes are a
bijection onto the M mixes columns.
"""

from __future__ import annotations

import z3

from pallas_kernels import mhc as shared
from pallas_kernels.gpu import common
from pallas_kernels.gpu import mhc
from pallas_kernels.verify.engine import KernelContract, Operand, Result, check, functions_from, prove

KERNEL = "gpu_mhc"
NAMES = ("grid", "token_index_map", "stream_index_map", "param_index_map")
SHARED = ("pre_cols", "post_cols", "comb_cols", "comb_col", "mix_count")
TILES = ("padded", "tile_start", "tile_count")


def _fns(overrides):
  return functions_from([(mhc, NAMES), (shared, SHARED), (common, TILES)], overrides)


def contracts(f) -> list[KernelContract]:
  n, dp, bt, tt = z3.Ints("N dp bt TT")
  assumptions = [x >= 1 for x in (n, dp, bt, tt)]
  tp, m = tt * bt, f["mix_count"](n)
  lanes = {"mixes": m, "y": dp, "post": n, "comb": n * n, "dz": m, "dy": dp, "dpost": n, "dcomb": n * n}

  def op(name, output=False):
    if name in lanes:
      return Operand(name, (tp, lanes[name]), (bt, lanes[name]), f["token_index_map"], output=output,
                     cover=lambda ti, _l: (ti,))
    return Operand(name, (tp, n, dp), (bt, n, dp), f["stream_index_map"], output=output,
                   cover=lambda ti, _n, _d: (ti,))

  params = [Operand(p, (m,), (m,), f["param_index_map"]) for p in ("scale_vec", "base")]
  kernels = {
      "mhc_pre": [op("mixes"), *params, op("x"), op("y", True), op("post", True), op("comb", True)],
      "mhc_pre_grad": [op("mixes"), *params, op("x"), op("dy"), op("dpost"), op("dcomb"), op("dz", True),
                       op("dx", True)],
      "mhc_post": [op("y"), op("x"), op("post"), op("comb"), op("out", True)],
      "mhc_post_grad": [op("y"), op("x"), op("post"), op("comb"), op("dout"), op("dy", True), op("dx", True),
                        op("dpost", True), op("dcomb", True)],
  }
  grid = tuple(f["grid"](tp, bt))
  return [KernelContract(f"{KERNEL}_{name[4:]}", grid, (False,), ops, [], assumptions) for name, ops in kernels.items()]


def tile_properties(f) -> list[Result]:
  n, d, bd, i, j, i2, j2 = z3.Ints("N d bd i j i2 j2")
  dp = f["padded"](d, bd)
  hyp = [n >= 1, d >= 1, bd >= 1]
  in_n = lambda x: z3.And(0 <= x, x < n)
  pre, post, comb = f["pre_cols"](n)[0], f["post_cols"](n)[0], f["comb_cols"](n)[0]
  # the columns the pre-grad kernel writes: kind 0 (pre i), 1 (post i), 2 (comb i, j)
  col = lambda kind, a, b: z3.If(kind == 0, pre + a, z3.If(kind == 1, post + a, comb + f["comb_col"](a, b, n)))
  k1, k2 = z3.Ints("kind1 kind2")
  written = lambda k, a, b: z3.And(0 <= k, k <= 2, in_n(a), z3.If(k == 2, in_n(b), b == 0))
  return [
      prove(KERNEL, "d tiles: tile_count(dp) tiles of bd cover dp = padded(d) ≥ d",
            z3.And(f["tile_count"](dp, bd) * bd == dp, dp >= d), hyp, [d, bd]),
      prove(KERNEL, "dz writes: N + N + N² columns, each in [0, M)",
            z3.And(0 <= col(k1, i, j), col(k1, i, j) < f["mix_count"](n), 2 * n + n * n == f["mix_count"](n)),
            hyp + [written(k1, i, j)], [n, k1, i, j]),
      prove(KERNEL, "dz writes: no column is written twice",
            z3.Implies(col(k1, i, j) == col(k2, i2, j2), z3.And(k1 == k2, i == i2, j == j2)),
            hyp + [written(k1, i, j), written(k2, i2, j2)], [n, k1, i, j, k2, i2, j2]),
  ]


def properties(**overrides) -> list[Result]:
  f = _fns(overrides)
  return [result for contract in contracts(f) for result in check(contract)] + tile_properties(f)
