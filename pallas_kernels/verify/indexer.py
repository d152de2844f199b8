"""Z3 contracts of the indexer-score kernels (scores, dq/dw, dk) and of their entry-tile layout.

Symbolic sizes: B batch, Hi heads, Di head dim, bc query tile, bn entry tile, CT / NT tiles; the
padded arrays have Cp = CT·bc query rows and Np = NT·bn entries (the wrapper's `padded`, proved below).
The in-kernel causal mask tests `index_rules.entry_visible(t, entry(ni, lane, bn), r)`: the (tile, lane)
-> entry bijection is proved here, the rule itself in `verify/index_rules.py`.
"""

from __future__ import annotations

import z3

from pallas_kernels import indexer as ix
from pallas_kernels.verify.engine import KernelContract, Operand, Result, check, functions_under_proof, prove

KERNEL = "indexer"


NAMES = ("grid", "grid_dk", "padded", "entry", "q_index_map", "rows_index_map",
           "k_index_map", "score_index_map", "dk_q_index_map", "dk_rows_index_map", "dk_k_index_map",
           "dk_score_index_map", "is_first_tile", "is_last_tile")


def _fns(overrides):
  return functions_under_proof(ix, NAMES, overrides)


def _sizes():
  b, hi, di, bc, bn, ct, nt = z3.Ints("B Hi Di bc bn CT NT")
  return b, hi, di, bc, bn, ct * bc, nt * bn, [x >= 1 for x in (b, hi, di, bc, bn, ct, nt)]


def _inputs(fns, b, hi, di, bc, bn, cp, np_, dk_grid):
  p = "dk_" if dk_grid else ""
  return [Operand("q", (b, hi, cp, di), (None, hi, bc, di), fns[p + "q_index_map"]),
          Operand("w", (b, hi, cp, 1), (None, hi, bc, 1), fns[p + "q_index_map"]),
          Operand("rows", (b, cp, 1), (None, bc, 1), fns[p + "rows_index_map"]),
          Operand("k", (b, np_, di), (None, bn, di), fns[p + "k_index_map"])]


def contracts(fns) -> list[KernelContract]:
  b, hi, di, bc, bn, cp, np_, assumptions = _sizes()
  g = tuple(fns["grid"](b, cp, np_, bc, bn))
  gk = tuple(fns["grid_dk"](b, cp, np_, bc, bn))
  scores = Operand("scores", (b, cp, np_), (None, bc, bn), fns["score_index_map"], output=True,
                   cover=lambda bi, ci, ni: (bi, ci, ni))
  fwd = KernelContract(f"{KERNEL}_scores", g, (False, False, False),
                       _inputs(fns, b, hi, di, bc, bn, cp, np_, False) + [scores], [], assumptions)
  last_n = lambda bi, ci, ni: fns["is_last_tile"](ni, g[2])
  cover_dq = lambda bi, _h, ci, _d: (bi, ci, g[2] - 1)
  g_in = Operand("g (cotangent)", (b, cp, np_), (None, bc, bn), fns["score_index_map"])
  dq_dw = KernelContract(f"{KERNEL}_dq_dw", g, (False, False, True),
                         _inputs(fns, b, hi, di, bc, bn, cp, np_, False) + [g_in] + [
                             Operand("dq", (b, hi, cp, di), (None, hi, bc, di), fns["q_index_map"], output=True,
                                     write_when=last_n, cover=cover_dq),
                             Operand("dw", (b, hi, cp, 1), (None, hi, bc, 1), fns["q_index_map"], output=True,
                                     write_when=last_n, cover=cover_dq)], [], assumptions)
  g_in_dk = Operand("g (cotangent)", (b, cp, np_), (None, bc, bn), fns["dk_score_index_map"])
  dk = KernelContract(f"{KERNEL}_dk", gk, (False, False, True),
                      _inputs(fns, b, hi, di, bc, bn, cp, np_, True) + [g_in_dk] + [
                          Operand("dk", (b, np_, di), (None, bn, di), fns["dk_k_index_map"], output=True,
                                  write_when=lambda bi, ni, ci: fns["is_last_tile"](ci, gk[2]),
                                  cover=lambda bi, ni, _d: (bi, ni, gk[2] - 1))], [], assumptions)
  return [fwd, dq_dw, dk]


def mask_properties(fns) -> list[Result]:
  b, hi, di, bc, bn, cp, np_, assumptions = _sizes()
  n, c, tile = z3.Ints("N C tile")
  out = [prove(KERNEL, "padding: tile | padded(n), n ≤ padded(n) < n + tile",
               z3.And(fns["padded"](n, tile) % tile == 0, n <= fns["padded"](n, tile),
                      fns["padded"](n, tile) < n + tile), [n >= 1, tile >= 1], [n, tile])]
  ni, lane, ni2, lane2, e = z3.Ints("ni lane ni2 lane2 e")
  nt = np_ / bn
  in_tile = lambda a, l: z3.And(0 <= a, a < nt, 0 <= l, l < bn)
  out.append(prove(KERNEL, "(entry tile, lane) -> entry is injective",
                   z3.Implies(fns["entry"](ni, lane, bn) == fns["entry"](ni2, lane2, bn),
                              z3.And(ni == ni2, lane == lane2)),
                   assumptions + [in_tile(ni, lane), in_tile(ni2, lane2)], [bn, ni, lane, ni2, lane2]))
  out.append(prove(KERNEL, "every entry in [0, Np) has a (tile, lane)",
                   z3.And(in_tile(e / bn, e % bn), fns["entry"](e / bn, e % bn, bn) == e),
                   assumptions + [0 <= e, e < np_], [bn, e]))
  return out


def properties(**overrides) -> list[Result]:
  fns = _fns(overrides)
  return [result for contract in contracts(fns) for result in check(contract)] + mask_properties(fns)
