"""Z3 contracts of the GPU sparse-attention kernels (forward, backward) and of their slot tiles / gathers.

Symbolic sizes: B batch, S tokens, N kv rows, Dp head dim, hb head block, HG head blocks (Hp = HG·hb),
T rows per tile, KT tiles (Kp = KT·T slots: the shared `padded_slots`, proved in verify/sparse_attention.py);
idx values lie in {−1} ∪ [0, N). Functions come from `pallas_kernels.gpu.sparse_attention`, and the shared
slot layout (`padded_slots`, `slot`, `slot_valid`, `safe_row`) from `pallas_kernels.sparse_attention`,
unless a caller overrides them (the mutation tests do).
"""

from __future__ import annotations

import z3

from pallas_kernels import sparse_attention as shared
from pallas_kernels.gpu import common
from pallas_kernels.gpu import sparse_attention as sa
from pallas_kernels.verify.engine import KernelContract, Operand, Result, check, functions_from, prove

KERNEL = "gpu_sparse_attention"
NAMES = ("grid", "head_index_map", "head_column_index_map", "sink_index_map", "slots_index_map",
         "rows_index_map")
SHARED = ("padded_slots", "slot", "slot_valid", "safe_row")
TILES = ("padded", "tile_start", "tile_count")


def _fns(overrides):
  return functions_from([(sa, NAMES), (shared, SHARED), (common, TILES)], overrides)


def _sizes():
  b, s, n, dp, hb, hg, t, kt = z3.Ints("B S N Dp hb HG T KT")
  return b, s, n, dp, hb, hg * hb, t, kt * t, [x >= 1 for x in (b, s, n, dp, hb, hg, t, kt)]


def _contract(f, backward: bool) -> KernelContract:
  b, s, n, dp, hb, hp, t, kp, assumptions = _sizes()
  grid = tuple(f["grid"](b, s, hp, hb))
  heads, columns = (b, s, hp, dp), (b, s, hp)
  head_op = lambda name, output=False: Operand(name, heads, (None, None, hb, dp), f["head_index_map"], output=output,
                                               cover=lambda bi, si, hg, _d: (bi, si, hg))
  column_op = lambda name, output=False: Operand(name, columns, (None, None, hb), f["head_column_index_map"],
                                                 output=output, cover=lambda bi, si, hg: (bi, si, hg))
  slots = Operand("idx", (b, s, kp), (None, None, kp), f["slots_index_map"])
  rows = Operand("kv", (b, n, dp), (None, n, dp), f["rows_index_map"])
  if not backward:
    operands = [head_op("q"), Operand("sink", (hp,), (hb,), f["sink_index_map"]), slots, rows,
                head_op("o", True), column_op("lse", True)]
  else:
    operands = [head_op("q"), head_op("do"), column_op("lse"), column_op("delta"), column_op("glse"), slots, rows,
                head_op("dq", True), Operand("dkv (atomic adds)", (b, n, dp), (None, n, dp), f["rows_index_map"])]
  name = f"{KERNEL}_{'bwd' if backward else 'fwd'}"
  return KernelContract(name, grid, (False, False, False), operands, [], assumptions)


def slot_properties(f) -> list[Result]:
  b, s, n, dp, hb, hp, t, kp, assumptions = _sizes()
  k, kt, j, v, h = z3.Ints("K kt j idx_value H")
  padded_k = f["padded_slots"](k, t)
  n_tiles = f["tile_count"](padded_k, t)
  start = f["tile_start"](kt, t)
  return [
      prove(KERNEL, "head blocks: grid · hb = Hp, and padded(H, hb) ≥ H",
            z3.And(f["grid"](b, s, hp, hb)[2] * hb == hp,
                   f["padded"](h, hb) >= h), assumptions + [h >= 1], [hb, h]),
      prove(KERNEL, "slot tiles: tile_count(Kp) tiles of T cover Kp = padded_slots(K)",
            n_tiles * t == padded_k, assumptions + [k >= 1], [k, t]),
      prove(KERNEL, "slot tiles: element j of tile kt is the shared layout's slot(kt, j)",
            start + j == f["slot"](kt, j, t), assumptions + [0 <= kt, 0 <= j, j < t], [t, kt, j]),
      prove(KERNEL, "slot tiles: the idx slice [tile_start, +T) of every tile lies in [0, Kp)",
            z3.And(0 <= start, start + t <= padded_k), assumptions + [k >= 1, 0 <= kt, kt < n_tiles], [k, t, kt]),
      prove(KERNEL, "gather / atomic add: the row of an idx value lies in [0, N)",
            z3.And(0 <= f["safe_row"](v), f["safe_row"](v) < n), assumptions + [-1 <= v, v < n], [n, v]),
      prove(KERNEL, "gather: a valid slot reads (and adds its gradient to) row idx",
            z3.Implies(f["slot_valid"](v), f["safe_row"](v) == v), assumptions + [-1 <= v, v < n], [n, v]),
      prove(KERNEL, "gather: a slot is masked iff its idx is −1",
            z3.Not(f["slot_valid"](v)) == (v == -1), assumptions + [-1 <= v, v < n], [n, v]),
  ]


def properties(**overrides) -> list[Result]:
  f = _fns(overrides)
  return check(_contract(f, backward=False)) + check(_contract(f, backward=True)) + slot_properties(f)
