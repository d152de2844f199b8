"""Z3 contracts of the GPU indexer-score kernels (scores, dq/dw, dk), their tile walks and the causal skip.

Symbolic sizes: B batch, Hi heads, Dp head dim, bc query tile, bn entry tile, CT / NT tiles (Cp = CT·bc
query rows, Np = NT·bn entries). Functions come from `pallas_kernels.gpu.indexer`, the (tile, lane) ->
entry map `entry` from `pallas_kernels.indexer` (shared with the TPU variant), the visibility rule from
`pallas_kernels.index_rules` and the tile walk from `pallas_kernels.gpu.common`, unless overridden.
"""

from __future__ import annotations

import z3

from pallas_kernels import index_rules
from pallas_kernels import indexer as shared
from pallas_kernels.gpu import common
from pallas_kernels.gpu import indexer as ix
from pallas_kernels.verify.engine import KernelContract, Operand, Result, check, functions_from, prove

KERNEL = "gpu_indexer"
NAMES = ("grid", "grid_dq", "grid_dk", "tile_is_live", "q_tile_map", "w_tile_map", "rows_tile_map", "k_tile_map",
         "score_tile_map", "dq_head_map", "dq_w_map", "dq_rows_map", "dq_k_map", "dq_g_map", "dk_q_map", "dk_w_map",
         "dk_rows_map", "dk_k_map", "dk_g_map")
TILES = ("tile_start", "tile_count")


def _fns(overrides):
  return functions_from([(ix, NAMES), (shared, ("entry",)), (index_rules, ("entry_visible",)), (common, TILES)],
                        overrides)


def _sizes():
  b, hi, dp, bc, bn, ct, nt = z3.Ints("B Hi Dp bc bn CT NT")
  return b, hi, dp, bc, bn, ct * bc, nt * bn, [x >= 1 for x in (b, hi, dp, bc, bn, ct, nt)]


def contracts(f) -> list[KernelContract]:
  b, hi, dp, bc, bn, cp, np_, assumptions = _sizes()
  q_shape, w_shape, rows_shape, k_shape, g_shape = (b, hi, cp, dp), (b, hi, cp), (b, cp), (b, np_, dp), (b, cp, np_)
  scores = KernelContract(f"{KERNEL}_scores", tuple(f["grid"](b, cp, np_, bc, bn)), (False,) * 3, [
      Operand("q", q_shape, (None, hi, bc, dp), f["q_tile_map"]),
      Operand("w", w_shape, (None, hi, bc), f["w_tile_map"]),
      Operand("rows", rows_shape, (None, bc), f["rows_tile_map"]),
      Operand("k", k_shape, (None, bn, dp), f["k_tile_map"]),
      Operand("scores", g_shape, (None, bc, bn), f["score_tile_map"], output=True,
              cover=lambda bi, ci, ni: (bi, ci, ni)),
  ], [], assumptions)
  dq_dw = KernelContract(f"{KERNEL}_dq_dw", tuple(f["grid_dq"](b, cp, hi, bc)), (False,) * 3, [
      Operand("q", q_shape, (None, None, bc, dp), f["dq_head_map"]),
      Operand("w", w_shape, (None, None, bc), f["dq_w_map"]),
      Operand("rows", rows_shape, (None, bc), f["dq_rows_map"]),
      Operand("k", k_shape, (None, np_, dp), f["dq_k_map"]),
      Operand("g (cotangent)", g_shape, (None, bc, np_), f["dq_g_map"]),
      Operand("dq", q_shape, (None, None, bc, dp), f["dq_head_map"], output=True,
              cover=lambda bi, h, ci, _d: (bi, ci, h)),
      Operand("dw", w_shape, (None, None, bc), f["dq_w_map"], output=True, cover=lambda bi, h, ci: (bi, ci, h)),
  ], [], assumptions)
  dk = KernelContract(f"{KERNEL}_dk", tuple(f["grid_dk"](b, np_, bn)), (False,) * 2, [
      Operand("q", q_shape, (None, hi, cp, dp), f["dk_q_map"]),
      Operand("w", w_shape, (None, hi, cp), f["dk_w_map"]),
      Operand("rows", rows_shape, (None, cp), f["dk_rows_map"]),
      Operand("k", k_shape, (None, bn, dp), f["dk_k_map"]),
      Operand("g (cotangent)", g_shape, (None, cp, bn), f["dk_g_map"]),
      Operand("dk", k_shape, (None, bn, dp), f["dk_k_map"], output=True, cover=lambda bi, ni, _d: (bi, ni)),
  ], [], assumptions)
  return [scores, dq_dw, dk]


def tile_properties(f) -> list[Result]:
  b, hi, dp, bc, bn, cp, np_, assumptions = _sizes()
  ni, ci, lane, t, t_max, r = z3.Ints("ni ci lane t t_max r")
  in_lane = [0 <= lane, lane < bn]
  entry = f["entry"](ni, lane, bn)
  return [
      prove(KERNEL, "loops: tile_count visits all NT entry tiles and all CT query tiles",
            z3.And(f["tile_count"](np_, bn) == np_ / bn, f["tile_count"](cp, bc) == cp / bc), assumptions, [bn, bc]),
      prove(KERNEL, "mask: lane l of entry tile ni is the entry loaded there (k block, tile)",
            z3.And(entry == f["k_tile_map"](0, 0, ni)[1] * bn + lane, entry == f["tile_start"](ni, bn) + lane),
            assumptions + in_lane + [0 <= ni], [bn, ni, lane]),
      prove(KERNEL, "mask: query tile ci's rows slice is the rows block of the tile",
            f["tile_start"](ci, bc) == f["rows_tile_map"](0, ci, 0)[1] * bc, assumptions + [0 <= ci], [bc, ci]),
      prove(KERNEL, "causal skip: a dead entry tile holds no entry visible to any t ≤ t_max",
            z3.Implies(z3.Not(f["tile_is_live"](t_max, ni, bn, r)), z3.Not(f["entry_visible"](t, entry, r))),
            assumptions + in_lane + [0 <= ni, r >= 1, t >= -1, t <= t_max], [bn, r, ni, lane, t, t_max]),
  ]


def properties(**overrides) -> list[Result]:
  f = _fns(overrides)
  return [result for contract in contracts(f) for result in check(contract)] + tile_properties(f)
