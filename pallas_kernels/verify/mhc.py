"""Z3 contracts of the mHC kernels (pre, pre-grad, post, post-grad) and of their lane arithmetic.

Symbolic sizes: N streams, d model dim, bt token tile, TT tiles (tokens padded to TP = TT·bt by the
wrapper's `padded`). Every operand is a [tokens, lanes] array in (bt, lanes) blocks, except the
[1, M] parameter rows shared by all tiles.
"""

from __future__ import annotations

import z3

from pallas_kernels import mhc
from pallas_kernels.verify.engine import KernelContract, Operand, Result, check, functions_under_proof, prove

KERNEL = "mhc"


NAMES = ("grid", "padded", "token_index_map", "param_index_map", "stream_cols", "pre_cols", "post_cols",
           "comb_cols", "comb_col", "mix_count")


def _fns(overrides):
  return functions_under_proof(mhc, NAMES, overrides)


def contracts(fns) -> list[KernelContract]:
  n, d, bt, tt = z3.Ints("N d bt TT")
  assumptions = [x >= 1 for x in (n, d, bt, tt)]
  tp, m = tt * bt, fns["mix_count"](n)
  grid = tuple(fns["grid"](tp, bt))
  lanes = {"mixes": m, "x": n * d, "y": d, "post": n, "comb": n * n, "dz": m, "dx": n * d, "dy": d,
           "dpost": n, "dcomb": n * n, "dout": n * d, "out": n * d}

  def tokens(name, output=False):
    return Operand(name, (tp, lanes[name]), (bt, lanes[name]), fns["token_index_map"], output=output,
                   cover=lambda ti, _l: (ti,))

  params = [Operand(p, (1, m), (1, m), fns["param_index_map"]) for p in ("scale_vec", "base")]
  kernels = {
      "mhc_pre": [tokens("mixes"), *params, tokens("x"), tokens("y", True), tokens("post", True),
                  tokens("comb", True)],
      "mhc_pre_grad": [tokens("mixes"), *params, tokens("x"), tokens("dy"), tokens("dpost"), tokens("dcomb"),
                       tokens("dz", True), tokens("dx", True)],
      "mhc_post": [tokens("y"), tokens("x"), tokens("post"), tokens("comb"), tokens("out", True)],
      "mhc_post_grad": [tokens("y"), tokens("x"), tokens("post"), tokens("comb"), tokens("dout"),
                        tokens("dy", True), tokens("dx", True), tokens("dpost", True), tokens("dcomb", True)],
  }
  return [KernelContract(name, grid, (False,), ops, [], assumptions) for name, ops in kernels.items()]


def lane_properties(fns) -> list[Result]:
  n, d, i, i2, c, j, j2, tokens, tile = z3.Ints("N d i i2 c j j2 tokens tile")
  hyp = [n >= 1, d >= 1]
  stream = fns["stream_cols"]
  in_n = lambda x: z3.And(0 <= x, x < n)
  out = [
      prove(KERNEL, "padding: tile | padded(tokens), tokens ≤ padded < tokens + tile",
            z3.And(fns["padded"](tokens, tile) % tile == 0, tokens <= fns["padded"](tokens, tile),
                   fns["padded"](tokens, tile) < tokens + tile), [tokens >= 1, tile >= 1], [tokens, tile]),
      prove(KERNEL, "stream i lanes lie in [0, N·d) and span d",
            z3.And(0 <= stream(i, d)[0], stream(i, d)[1] <= n * d, stream(i, d)[1] - stream(i, d)[0] == d),
            hyp + [in_n(i)], [n, d, i]),
      prove(KERNEL, "streams are disjoint",
            z3.Implies(z3.And(stream(i, d)[0] < stream(i2, d)[1], stream(i2, d)[0] < stream(i, d)[1]), i == i2),
            hyp + [in_n(i), in_n(i2)], [n, d, i, i2]),
      prove(KERNEL, "every lane of X belongs to the stream c // d",
            z3.And(in_n(c / d), stream(c / d, d)[0] <= c, c < stream(c / d, d)[1]),
            hyp + [0 <= c, c < n * d], [n, d, c]),
  ]
  pre, post, comb, m = fns["pre_cols"](n), fns["post_cols"](n), fns["comb_cols"](n), fns["mix_count"](n)
  out.append(prove(KERNEL, "mixes columns: pre | post | comb partition [0, (2+N)·N), widths N, N, N²",
                   z3.And(pre[0] == 0, pre[1] == post[0], post[1] == comb[0], comb[1] == m,
                          pre[1] - pre[0] == n, post[1] - post[0] == n, comb[1] - comb[0] == n * n), hyp, [n]))
  cc = fns["comb_col"]
  out.append(prove(KERNEL, "comb (i, j) -> column is injective into [0, N²)",
                   z3.And(0 <= cc(i, j, n), cc(i, j, n) < n * n,
                          z3.Implies(cc(i, j, n) == cc(i2, j2, n), z3.And(i == i2, j == j2))),
                   hyp + [in_n(i), in_n(j), in_n(i2), in_n(j2)], [n, i, j, i2, j2]))
  out.append(prove(KERNEL, "every comb column has its (i, j) (row-major reshape)",
                   z3.And(in_n(c / n), in_n(c % n), cc(c / n, c % n, n) == c), hyp + [0 <= c, c < n * n], [n, c]))
  return out


def properties(**overrides) -> list[Result]:
  fns = _fns(overrides)
  return [result for contract in contracts(fns) for result in check(contract)] + lane_properties(fns)
