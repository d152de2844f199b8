"""Integer arithmetic shared by the kernels and the Z3 verifier.

Every grid, index map, in-kernel slot computation and mask in `pallas_kernels` is a plain Python
function of integers built only from +, −, ·, comparisons and the helpers below. The same function is
called with Python ints / traced jnp int32 scalars or vectors inside a kernel, and with Z3 integer terms
by `pallas_kernels.verify`, so what is proved is exactly what runs.

Helpers dispatch on the argument type: Z3 terms get z3.If / z3.And / integer division and remainder
(SMT-LIB `div` / `mod`, which equal floor division / floor modulo for the positive divisors used here,
for negative dividends too); everything else goes to jnp (or to plain Python for Python ints). z3 is
never imported here: a Z3 term can only exist if the verifier already imported it.
"""

from __future__ import annotations

import functools
import operator
import sys

import jax.numpy as jnp


def _z3():
  return sys.modules.get("z3")


def is_symbolic(*xs) -> bool:
  z3 = _z3()
  return z3 is not None and any(isinstance(x, z3.ExprRef) for x in xs)


def _all_python(*xs) -> bool:
  return all(isinstance(x, (bool, int)) for x in xs)


def select(cond, if_true, if_false):
  """cond ? if_true : if_false (elementwise for arrays)."""
  if is_symbolic(cond, if_true, if_false):
    return _z3().If(cond, if_true, if_false)
  if _all_python(cond, if_true, if_false):
    return if_true if cond else if_false
  return jnp.where(cond, if_true, if_false)


def land(*conds):
  """Logical and of booleans (elementwise for arrays)."""
  if is_symbolic(*conds):
    return _z3().And(*conds)
  if _all_python(*conds):
    return all(conds)
  return functools.reduce(operator.and_, conds)


def floordiv(a, b):
  """⌊a / b⌋ for b > 0 (the only case the kernels use)."""
  if is_symbolic(a, b):
    return a / b  # SMT-LIB integer div: floor for positive divisors
  return a // b


def mod(a, b):
  """a mod b ∈ [0, b) for b > 0 (floor modulo, also for negative a): a = b·floordiv(a, b) + mod(a, b)."""
  # Z3: SMT-LIB `mod` (z3's `%` on Int terms), non-negative for b ≠ 0; Python ints and jnp arrays
  # (jnp.remainder): floor modulo, with the sign of the (positive) divisor. Same value for b > 0.
  return a % b


def cdiv(a, b):
  """⌈a / b⌉ for a ≥ 0, b > 0."""
  return floordiv(a + b - 1, b)


def maximum(a, b):
  if is_symbolic(a, b):
    return _z3().If(a >= b, a, b)
  if _all_python(a, b):
    return max(a, b)
  return jnp.maximum(a, b)


def minimum(a, b):
  if is_symbolic(a, b):
    return _z3().If(a <= b, a, b)
  if _all_python(a, b):
    return min(a, b)
  return jnp.minimum(a, b)
