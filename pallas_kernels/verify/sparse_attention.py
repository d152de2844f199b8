"""Z3 contracts of the sparse-attention kernels (forward, backward) and of the slot mask / tile layout.

Symbolic sizes: B batch, S tokens, H heads, D head dim, N kv rows, T rows per tile, KT tiles; the idx
array is padded to Kp = KT·T slots (the wrapper's `padded_slots`, proved below) and holds values in
{−1} ∪ [0, N). Every function is taken from `pallas_kernels.sparse_attention` unless a caller
overrides it (the mutation tests do). The rules that build idx (window rows, compressed rows, top-k
slots) are `pallas_kernels.index_rules`, proved in `verify/index_rules.py`.
"""

from __future__ import annotations

import z3

from pallas_kernels import sparse_attention as sa
from pallas_kernels.intmath import floordiv
from pallas_kernels.verify.engine import (KernelContract, Operand, Result, SymbolicRef,
                                         check, functions_under_proof, prove)

KERNEL = "sparse_attention"


NAMES = ("grid", "padded_slots", "slot", "slot_valid", "kv_row_block", "kv_row_index_map",
           "token_index_map", "sink_index_map", "drows_index_map", "is_first_tile", "is_last_tile")


def _fns(overrides):
  return functions_under_proof(sa, NAMES, overrides)


def _sizes():
  b, s, h, d, n, t, kt = z3.Ints("B S H D N T KT")
  j = z3.Int("j")  # which of the T row operands
  positive = [x >= 1 for x in (b, s, h, d, n, t, kt)] + [0 <= j, j < t]
  return b, s, h, d, n, t, kt, j, positive


def _contract(fns, backward: bool) -> KernelContract:
  b, s, h, d, n, t, kt, j, assumptions = _sizes()
  kp = kt * t
  grid = tuple(fns["grid"](b, s, kp, t))
  idx = SymbolicRef("idx", (b, s, kp), lambda v: z3.And(-1 <= v, v < n))
  tok, tok_col = (b, s, h, d), (b, s, h, 1)
  last = lambda bi, si, k: fns["is_last_tile"](k, grid[2])
  cover = lambda bi, si, _h, _d: (bi, si, grid[2] - 1)
  rows = Operand("kv row operand j", (b, n, d), (None, None, d), fns["kv_row_index_map"](j, t))
  reads = lambda bi, si, k, ref: ref[bi, si, fns["slot"](k, j, t)]
  if not backward:
    operands = [
        Operand("q", tok, (None, None, h, d), fns["token_index_map"]),
        Operand("sink", (h, 1), (h, 1), fns["sink_index_map"]),
        rows,
        Operand("o", tok, (None, None, h, d), fns["token_index_map"], output=True, write_when=last, cover=cover),
        Operand("lse", tok_col, (None, None, h, 1), fns["token_index_map"], output=True, write_when=last,
                cover=cover),
    ]
    name = f"{KERNEL}_fwd"
  else:
    operands = [Operand(x, tok, (None, None, h, d), fns["token_index_map"]) for x in ("q", "do")]
    operands += [Operand(x, tok_col, (None, None, h, 1), fns["token_index_map"]) for x in ("lse", "delta", "glse")]
    operands += [
        rows,
        Operand("dq", tok, (None, None, h, d), fns["token_index_map"], output=True, write_when=last, cover=cover),
        Operand("drows", (b, s, kp, d), (None, None, t, d), fns["drows_index_map"], output=True,
                cover=lambda bi, si, k, _d: (bi, si, k)),
    ]
    name = f"{KERNEL}_bwd"
  return KernelContract(name, grid, (False, False, True), operands, [idx], assumptions, reads)


def _mask_properties(fns) -> list[Result]:
  b, s, h, d, n, t, kt, j, assumptions = _sizes()
  results = []
  k = z3.Int("K")
  kp = fns["padded_slots"](k, t)
  results.append(prove(KERNEL, "slots padded to whole tiles: T | Kp, K ≤ Kp < K+T, grid·T = Kp",
                       z3.And(kp % t == 0, k <= kp, kp < k + t, fns["grid"](b, s, kp, t)[2] * t == kp),
                       assumptions + [k >= 1], [k, t]))
  # every slot of a token is visited by exactly one (tile, operand) pair
  k1, j1, k2, j2, slot_ = z3.Ints("kt1 j1 kt2 j2 slot")
  in_tiles = lambda a, c: z3.And(0 <= a, a < kt, 0 <= c, c < t)
  results.append(prove(KERNEL, "(tile, operand) -> slot is injective",
                       z3.Implies(fns["slot"](k1, j1, t) == fns["slot"](k2, j2, t), z3.And(k1 == k2, j1 == j2)),
                       assumptions + [in_tiles(k1, j1), in_tiles(k2, j2)], [t, k1, j1, k2, j2]))
  wk, wj = floordiv(slot_, t), slot_ - floordiv(slot_, t) * t
  results.append(prove(KERNEL, "every slot in [0, Kp) is visited",
                       z3.And(in_tiles(wk, wj), fns["slot"](wk, wj, t) == slot_),
                       assumptions + [0 <= slot_, slot_ < kt * t], [t, kt, slot_]))
  # −1 is never dereferenced: valid ⇔ v ≥ 0, and a valid slot fetches exactly row v
  v, bi = z3.Ints("idx_value bi")
  domain = assumptions + [-1 <= v, v < n, 0 <= bi, bi < b]
  results.append(prove(KERNEL, "slot mask: valid iff idx != -1", fns["slot_valid"](v) == (v != -1), domain, [v]))
  results.append(prove(KERNEL, "valid slot fetches exactly kv row idx",
                       z3.Implies(fns["slot_valid"](v), fns["kv_row_block"](bi, v)[1] == v), domain, [v]))
  kk = z3.Int("kt")
  results.append(prove(KERNEL, "online-softmax state initialised at tile 0 only",
                       fns["is_first_tile"](kk) == (kk == 0), assumptions + [0 <= kk, kk < kt], [kk]))
  return results


def properties(**overrides) -> list[Result]:
  fns = _fns(overrides)
  return check(_contract(fns, backward=False)) + check(_contract(fns, backward=True)) + _mask_properties(fns)
