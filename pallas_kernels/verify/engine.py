"""A small Z3 engine that proves properties of Pallas grids, BlockSpec index maps and masks.

A kernel is described by a `KernelContract`: its grid (symbolic Z3 sizes), which grid axes are
sequential, and its blocked operands, each with the *same* index-map function the kernel passes to
`pl.BlockSpec`. Scalar-prefetch arrays read by index maps or by the kernel body are `SymbolicRef`s:
Z3 uninterpreted functions of the position, constrained to a declared value domain, so two reads of
one position always agree. For every operand the engine proves

  * in bounds: for every grid point, every block the index map selects lies inside the array, and every
    scalar-prefetch read lies inside its array;
and for every output
  * written exactly once: the map is injective over the grid; or, for an output accumulated along the
    sequential axes, its block is constant along them, distinct across the parallel axes, and written
    back at exactly one sequential step;
  * covered: each block of the output is produced by some grid point (an explicit witness grid point,
    checked by Z3) and the blocks tile the array (the block size divides the dimension).

Each property is a claim `assumptions ⇒ claim`; `prove` checks that its negation is unsatisfiable and
otherwise reports a concrete counterexample from the Z3 model.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Sequence

import z3

TIMEOUT_MS = 30_000


@dataclasses.dataclass(frozen=True)
class Result:
  kernel: str
  prop: str
  proved: bool
  detail: str = ""

  def line(self) -> str:
    status = "PROVED" if self.proved else f"FAILED  {self.detail}"
    return f"{self.kernel:<28} {self.prop:<72} {status}"


class SymbolicRef:
  """A scalar-prefetch array seen by the verifier: reads return an uninterpreted function's value."""

  def __init__(self, name: str, shape: Sequence, domain: Callable[[z3.ArithRef], z3.BoolRef]):
    self.name, self.shape, self.domain = name, tuple(shape), domain
    self.fn = z3.Function(name, *([z3.IntSort()] * len(self.shape)), z3.IntSort())
    self.reads: list[tuple] = []

  def __getitem__(self, position):
    position = tuple(position) if isinstance(position, tuple) else (position,)
    if len(position) != len(self.shape):
      raise IndexError(f"{self.name}: expected {len(self.shape)} indices, got {len(position)}")
    self.reads.append(position)
    return self.fn(*position)

  def value_constraints(self) -> list:
    return [self.domain(self.fn(*p)) for p in self.reads]

  def bounds_claim(self) -> z3.BoolRef:
    return z3.And([z3.And(0 <= i, i < n) for p in self.reads for i, n in zip(p, self.shape)] or [True])


@dataclasses.dataclass
class Operand:
  """A blocked operand. block entries: None = squeezed (size 1, the map gives an element index)."""
  name: str
  shape: tuple
  block: tuple
  index_map: Callable
  output: bool = False
  write_when: Callable | None = None   # accumulators: the grid points at which the block is written
  cover: Callable | None = None        # outputs: block index -> a grid point that produces it


@dataclasses.dataclass
class KernelContract:
  name: str
  grid: tuple
  sequential: tuple              # one bool per grid axis
  operands: list
  refs: list                     # SymbolicRefs passed (in order) to every index map
  assumptions: list              # constraints on the symbolic sizes (positivity, divisibility)
  in_kernel_reads: Callable | None = None   # (grid point) -> None, performs the body's ref reads


def functions_under_proof(module, names: Sequence[str], overrides: dict) -> dict[str, Callable]:
  """{name: module.<name>} looked up now (so a patched function is the one proved), then `overrides`."""
  unknown = set(overrides) - set(names)
  if unknown:
    raise KeyError(f"unknown {module.__name__} functions to override: {sorted(unknown)}; known: {list(names)}")
  return {**{n: getattr(module, n) for n in names}, **overrides}


def functions_from(sources: Sequence[tuple], overrides: dict) -> dict[str, Callable]:
  """functions_under_proof over several modules: sources = [(module, names), ...] (e.g. a GPU kernel's
  own functions and the layout it shares with the TPU variant)."""
  known = [n for _, names in sources for n in names]
  unknown = set(overrides) - set(known)
  if unknown:
    raise KeyError(f"unknown functions to override: {sorted(unknown)}; known: {known}")
  return {**{n: getattr(m, n) for m, names in sources for n in names}, **overrides}


def prove(kernel: str, prop: str, claim, assumptions: Sequence, show: Sequence = ()) -> Result:
  solver = z3.Solver()
  solver.set("timeout", TIMEOUT_MS)
  solver.add(*assumptions)
  solver.add(z3.Not(claim))
  status = solver.check()
  if status == z3.unsat:
    return Result(kernel, prop, True)
  if status == z3.unknown:
    return Result(kernel, prop, False, f"unknown ({solver.reason_unknown()})")
  model = solver.model()
  values = ", ".join(f"{v}={model.eval(v, model_completion=True)}" for v in show)
  return Result(kernel, prop, False, f"counterexample: {values}")


def grid_point(contract: KernelContract, tag: str):
  point = tuple(z3.Int(f"g{a}{tag}") for a in range(len(contract.grid)))
  in_grid = [z3.And(0 <= g, g < n) for g, n in zip(point, contract.grid)]
  return point, in_grid


def _block_ok(operand: Operand, block_index) -> z3.BoolRef:
  conds = []
  for e, bs, n in zip(block_index, operand.block, operand.shape):
    size = 1 if bs is None else bs
    conds.append(z3.And(0 <= e, (e + 1) * size <= n))
  return z3.And(conds)


def _sizes(contract: KernelContract) -> list:
  seen, out = set(), []
  for e in list(contract.grid) + [d for op in contract.operands for d in op.shape]:
    for v in z3.z3util.get_vars(e) if z3.is_expr(e) else ():
      if v.get_id() not in seen:
        seen.add(v.get_id())
        out.append(v)
  return out


def _call_map(contract: KernelContract, operand: Operand, point):
  for ref in contract.refs:
    ref.reads.clear()
  block = tuple(operand.index_map(*point, *contract.refs))
  if len(block) != len(operand.shape):
    raise ValueError(f"{contract.name}.{operand.name}: index map returned {len(block)} indices for "
                     f"a rank-{len(operand.shape)} array")
  return block


def _ref_constraints(contract):
  return [c for ref in contract.refs for c in ref.value_constraints()]


def _ref_bounds(contract):
  return z3.And([ref.bounds_claim() for ref in contract.refs] or [True])


def check(contract: KernelContract) -> list[Result]:
  name, sizes = contract.name, _sizes(contract)
  results = []
  p, in_grid = grid_point(contract, "")
  base = list(contract.assumptions) + in_grid
  show = list(sizes) + list(p)

  if contract.in_kernel_reads is not None:
    for ref in contract.refs:
      ref.reads.clear()
    contract.in_kernel_reads(*p, *contract.refs)
    results.append(prove(name, "kernel-body scalar reads in bounds", _ref_bounds(contract),
                         base + _ref_constraints(contract), show))

  for op in contract.operands:
    block = _call_map(contract, op, p)
    if any(ref.reads for ref in contract.refs):
      results.append(prove(name, f"{op.name}: index map's scalar reads in bounds", _ref_bounds(contract),
                           base + _ref_constraints(contract), show))
    results.append(prove(name, f"{op.name}: blocks in bounds", _block_ok(op, block),
                         base + _ref_constraints(contract), show))
    if op.output:
      results.extend(_check_output(contract, op, sizes))
  return results


def _check_output(contract: KernelContract, op: Operand, sizes) -> list[Result]:
  name = contract.name
  p1, g1 = grid_point(contract, "_1")
  p2, g2 = grid_point(contract, "_2")
  b1 = _call_map(contract, op, p1)
  c1 = _ref_constraints(contract)
  b2 = _call_map(contract, op, p2)
  c2 = _ref_constraints(contract)
  hyp = list(contract.assumptions) + g1 + g2 + c1 + c2
  show = list(sizes) + list(p1) + list(p2)
  same_block = z3.And([x == y for x, y in zip(b1, b2)])
  par = [a for a, s in enumerate(contract.sequential) if not s]
  seq = [a for a, s in enumerate(contract.sequential) if s]
  same_par = z3.And([p1[a] == p2[a] for a in par] or [True])
  results = []
  if op.write_when is None:
    results.append(prove(name, f"{op.name}: each block written by one grid point",
                         z3.Implies(same_block, z3.And([x == y for x, y in zip(p1, p2)])), hyp, show))
  else:
    results.append(prove(name, f"{op.name}: block constant along sequential axes {seq}",
                         z3.Implies(same_par, same_block), hyp, show))
    results.append(prove(name, f"{op.name}: distinct parallel points write distinct blocks",
                         z3.Implies(same_block, same_par), hyp, show))
    results.append(prove(name, f"{op.name}: written back at one sequential step",
                         z3.Implies(z3.And(same_par, op.write_when(*p1), op.write_when(*p2)),
                                    z3.And([p1[a] == p2[a] for a in seq] or [True])), hyp, show))
  # coverage: every block index in range is produced (and written) by the witness grid point
  bidx = tuple(z3.Int(f"blk{a}") for a in range(len(op.shape)))
  counts = [n if bs is None else n / bs for n, bs in zip(op.shape, op.block)]
  in_range = [z3.And(0 <= e, e < c) for e, c in zip(bidx, counts)]
  witness = tuple(op.cover(*bidx))
  produced = _call_map(contract, op, witness)
  wc = _ref_constraints(contract)
  claim = z3.And([z3.And(0 <= w, w < n) for w, n in zip(witness, contract.grid)]
                 + [x == y for x, y in zip(produced, bidx)]
                 + ([op.write_when(*witness)] if op.write_when is not None else []))
  results.append(prove(name, f"{op.name}: every block produced", claim,
                       list(contract.assumptions) + in_range + wc, list(sizes) + list(bidx)))
  divides = z3.And([n % bs == 0 for n, bs in zip(op.shape, op.block) if bs is not None] or [True])
  results.append(prove(name, f"{op.name}: block sizes divide the array", divides,
                       list(contract.assumptions), list(sizes)))
  return results
