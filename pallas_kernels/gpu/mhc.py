"""Pallas mHC kernels, GPU variant (Triton): mixes -> (pre, post, comb) with Sinkhorn in-kernel, fused with
y = Σ pre_i X_i; and mhc_post. Forward and backward.

Same functions, signatures, argument checks and math as `pallas_kernels.mhc` (the TPU variant) and the XLA
reference `dsv4_jax.ops.mhc`. Per token (N streams, M = (2+N)·N mixes, z = mixes · scale_vec + base, fp32):
  pre_i  = sigmoid(z_i) + eps,   post_i = 2 · sigmoid(z_{N+i}),
  comb   = Sinkhorn(z_{2N + i·N + j}): softmax over j, + eps, columns / (col sum + eps), then
           (iters − 1) rounds of rows / (row sum + eps), columns / (col sum + eps)
  y      = Σ_i pre_i · X_i                                               (mhc_pre)
  Y_j    = post_j · y + Σ_i comb[i, j] · X_i                             (mhc_post)
Shapes: X [B, S, N, d], mixes [B, S, M], scale [3], base [M]; y [B, S, d], post [B, S, N],
comb [B, S, N, N].

Kernel layout. Tokens are flattened and padded to TP (a multiple of the token tile bt); X is viewed as
[TP, N, dp] with d padded to dp, a multiple of the model-dim tile bd (powers of two: Triton). Grid
(TP / bt,): one program owns a tile of tokens. It reads the mixes column by column (the TPU variant's
lane layout: `pre_cols`, `post_cols`, `comb_cols`, `comb_col`), keeps the per-token gates and the N×N
Sinkhorn matrix as lists of [bt] vectors (any N, no in-kernel slicing), runs all Sinkhorn iterations in
an in-kernel loop, then walks d in tiles of bd for the stream sums: X is read from HBM once and a token
tile's gates never leave the chip between mixes and y.

Backward: the pre-gradient kernel recomputes its tile's gates, accumulates dpre_i = Σ_d dy · X_i over the
d tiles (writing dX_i = pre_i · dy as it goes), pulls dpre / dpost back through the gates with `jax.vjp`
and dcomb through Sinkhorn by recomputation (for round k, last to first, replay rounds 0..k−1 and apply
the vjp of round k: O(iters²) tiny rounds, O(1) memory), and returns dz [tokens, M]; XLA reduces it to
d mixes / d scale / d base. The post-gradient kernel accumulates dpost_j = Σ_d dY_j · y and
dcomb[i, j] = Σ_d dY_j · X_i over the d tiles and writes dy = Σ_j post_j dY_j, dX_i = Σ_j comb[i, j] dY_j.

Blocks: bt = TOKEN_TILE, bd = MODEL_TILE, NUM_WARPS / NUM_STAGES; chosen for d = 4096, N = 4 (Flash) on an
H200, not tuned on hardware. Integer arithmetic: the lane layout is the TPU variant's (shared); the grid,
the index maps and the d-tile walk (`common.tile_start`) are proved by `pallas_kernels.verify.gpu.mhc`.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels import mhc as layout
from pallas_kernels.common import resolve_interpret
from pallas_kernels.gpu import common
from pallas_kernels.gpu.common import pad_axis
from pallas_kernels.intmath import floordiv
from pallas_kernels.mhc import check_post_arguments, check_pre_arguments

TOKEN_TILE = 16
MODEL_TILE = 512
NUM_WARPS = 4
NUM_STAGES = 2


# ---- integer index arithmetic (proved by pallas_kernels.verify.gpu.mhc) ----

def grid(tokens_padded, bt):
  return (floordiv(tokens_padded, bt),)


def token_index_map(ti):
  """[TP, lanes] operands (mixes, y, post, comb and their gradients) in blocks (bt, lanes)."""
  return (ti, 0)


def stream_index_map(ti):
  """[TP, N, dp] operands (X, Y and their gradients) in blocks (bt, N, dp)."""
  return (ti, 0, 0)


def param_index_map(ti):
  """The [M] parameter vectors (scale_vec, base): one block for every tile."""
  return (0,)


# ---- per-tile math on lists of [bt] vectors (fp32) ----

def _z(mix_ref, scale_ref, base_ref, span):
  """Columns [start, stop) of z = mixes · scale_vec + base, as a list of [bt] vectors."""
  return [mix_ref[:, c] * scale_ref[c] + base_ref[c] for c in range(*span)]


def _gates(z_pre, z_post, eps):
  return [jax.nn.sigmoid(v) + eps for v in z_pre], [2.0 * jax.nn.sigmoid(v) for v in z_post]


def _comb_logits(mix_ref, scale_ref, base_ref, n):
  z = _z(mix_ref, scale_ref, base_ref, layout.comb_cols(n))
  return [[z[layout.comb_col(i, j, n)] for j in range(n)] for i in range(n)]


def _normalise_cols(c, eps):
  n = len(c)
  sums = [sum(c[i][j] for i in range(n)) + eps for j in range(n)]
  return [[c[i][j] / sums[j] for j in range(n)] for i in range(n)]


def _sinkhorn_init(logits, eps):
  """Softmax over j, + eps, then the first column normalisation."""
  rows = []
  for row in logits:
    m = jax.lax.stop_gradient(functools.reduce(jnp.maximum, row))
    e = [jnp.exp(v - m) for v in row]
    total = sum(e)
    rows.append([v / total + eps for v in e])
  return _normalise_cols(rows, eps)


def _sinkhorn_round(c, eps):
  """One row normalisation then one column normalisation."""
  rows = []
  for row in c:
    total = sum(row) + eps
    rows.append([v / total for v in row])
  return _normalise_cols(rows, eps)


def _flat(c):
  return tuple(v for row in c for v in row)


def _square(flat, n):
  return [list(flat[i * n:(i + 1) * n]) for i in range(n)]


def _sinkhorn(logits, iters, eps):
  n = len(logits)
  body = lambda _, c: _flat(_sinkhorn_round(_square(c, n), eps))
  return _square(jax.lax.fori_loop(0, iters - 1, body, _flat(_sinkhorn_init(logits, eps))), n)


def _sinkhorn_vjp(logits, dcomb, iters, eps):
  """d logits of Sinkhorn by recomputation (see the module docstring)."""
  n = len(logits)
  c0 = _flat(_sinkhorn_init(logits, eps))
  round_flat = lambda c: _flat(_sinkhorn_round(_square(c, n), eps))

  def back(r, g):
    c_k = jax.lax.fori_loop(0, iters - 2 - r, lambda _, c: round_flat(c), c0)
    return jax.vjp(round_flat, c_k)[1](g)[0]

  g0 = jax.lax.fori_loop(0, iters - 1, back, _flat(dcomb))
  init_flat = lambda lg: _flat(_sinkhorn_init(_square(lg, n), eps))
  return _square(jax.vjp(init_flat, _flat(logits))[1](g0)[0], n)


def _d_tiles(fn, init, d_padded, bd):
  """fori over the model-dim tiles: fn(cols, carry) -> carry, cols = pl.ds of tile dj."""
  body = lambda dj, carry: fn(pl.ds(common.tile_start(dj, bd), bd), carry)
  return jax.lax.fori_loop(0, common.tile_count(d_padded, bd), body, init)


# ---- kernels ----

def _pre_kernel(mix_ref, scale_ref, base_ref, x_ref, y_ref, post_ref, comb_ref, *, n, iters, eps, bd):
  pre, post = _gates(_z(mix_ref, scale_ref, base_ref, layout.pre_cols(n)),
                     _z(mix_ref, scale_ref, base_ref, layout.post_cols(n)), eps)
  for i in range(n):
    post_ref[:, i] = post[i]
  comb = _sinkhorn(_comb_logits(mix_ref, scale_ref, base_ref, n), iters, eps)
  for i in range(n):
    for j in range(n):
      comb_ref[:, layout.comb_col(i, j, n)] = comb[i][j]

  def tile(cols, carry):
    y = sum(pre[i][:, None] * x_ref[:, i, cols].astype(jnp.float32) for i in range(n))
    y_ref[:, cols] = y.astype(y_ref.dtype)
    return carry

  _d_tiles(tile, 0, y_ref.shape[1], bd)


def _pre_grad_kernel(mix_ref, scale_ref, base_ref, x_ref, dy_ref, dpost_ref, dcomb_ref, dz_ref, dx_ref, *,
                     n, iters, eps, bd):
  z_pre = _z(mix_ref, scale_ref, base_ref, layout.pre_cols(n))
  z_post = _z(mix_ref, scale_ref, base_ref, layout.post_cols(n))
  (pre, _), gates_vjp = jax.vjp(lambda a, b: _gates(a, b, eps), z_pre, z_post)

  def tile(cols, dpre):
    dy = dy_ref[:, cols].astype(jnp.float32)
    for i in range(n):
      dx_ref[:, i, cols] = pre[i][:, None] * dy
    return tuple(dpre[i] + jnp.sum(dy * x_ref[:, i, cols].astype(jnp.float32), axis=1) for i in range(n))

  dpre = _d_tiles(tile, tuple(jnp.zeros_like(v) for v in pre), dy_ref.shape[1], bd)
  dz_pre, dz_post = gates_vjp((list(dpre), [dpost_ref[:, i] for i in range(n)]))
  dcomb = [[dcomb_ref[:, layout.comb_col(i, j, n)] for j in range(n)] for i in range(n)]
  dlogits = _sinkhorn_vjp(_comb_logits(mix_ref, scale_ref, base_ref, n), dcomb, iters, eps)
  for i in range(n):
    dz_ref[:, layout.pre_cols(n)[0] + i] = dz_pre[i]
    dz_ref[:, layout.post_cols(n)[0] + i] = dz_post[i]
    for j in range(n):
      dz_ref[:, layout.comb_cols(n)[0] + layout.comb_col(i, j, n)] = dlogits[i][j]


def _post_kernel(y_ref, x_ref, post_ref, comb_ref, out_ref, *, n, bd):
  post = [post_ref[:, j][:, None] for j in range(n)]
  comb = [[comb_ref[:, layout.comb_col(i, j, n)][:, None] for j in range(n)] for i in range(n)]

  def tile(cols, carry):
    y = y_ref[:, cols].astype(jnp.float32)
    x = [x_ref[:, i, cols].astype(jnp.float32) for i in range(n)]
    for j in range(n):
      out = post[j] * y + sum(comb[i][j] * x[i] for i in range(n))
      out_ref[:, j, cols] = out.astype(out_ref.dtype)
    return carry

  _d_tiles(tile, 0, y_ref.shape[1], bd)


def _post_grad_kernel(y_ref, x_ref, post_ref, comb_ref, dout_ref, dy_ref, dx_ref, dpost_ref, dcomb_ref, *, n, bd):
  post = [post_ref[:, j][:, None] for j in range(n)]
  comb = [[comb_ref[:, layout.comb_col(i, j, n)][:, None] for j in range(n)] for i in range(n)]

  def tile(cols, carry):
    dpost, dcomb = carry
    y = y_ref[:, cols].astype(jnp.float32)
    x = [x_ref[:, i, cols].astype(jnp.float32) for i in range(n)]
    dout = [dout_ref[:, j, cols].astype(jnp.float32) for j in range(n)]
    dy_ref[:, cols] = sum(post[j] * dout[j] for j in range(n))
    for i in range(n):
      dx_ref[:, i, cols] = sum(comb[i][j] * dout[j] for j in range(n))
    dpost = tuple(dpost[j] + jnp.sum(dout[j] * y, axis=1) for j in range(n))
    dcomb = tuple(dcomb[layout.comb_col(i, j, n)] + jnp.sum(dout[j] * x[i], axis=1)
                  for i in range(n) for j in range(n))
    return dpost, dcomb

  zeros = jnp.zeros(post_ref.shape[:1], jnp.float32)
  dpost, dcomb = _d_tiles(tile, ((zeros,) * n, (zeros,) * (n * n)), y_ref.shape[1], bd)
  for j in range(n):
    dpost_ref[:, j] = dpost[j]
  for c in range(n * n):
    dcomb_ref[:, c] = dcomb[c]


# ---- wrappers ----

def _tiles(tokens, d):
  bt = common.block_size(tokens, 1, TOKEN_TILE)
  bd = common.block_size(d, 1, MODEL_TILE)
  return bt, common.padded(tokens, bt), bd, common.padded(d, bd)


def _rows(a, tokens_padded, lanes_padded=None):
  """[B, S, ...] -> [TP, ...] (zero padded; the last axis to lanes_padded when given)."""
  flat = a.reshape((a.shape[0] * a.shape[1],) + a.shape[2:])
  if lanes_padded is not None:
    flat = pad_axis(flat, flat.ndim - 1, lanes_padded)
  return pad_axis(flat, 0, tokens_padded)


def _call(kernel, name, inputs, outputs, tokens_padded, bt, interpret):
  """inputs: [TP, lanes] / [TP, N, dp] arrays, or 1-D [M] parameter vectors; outputs: (shape tail, dtype)."""
  def spec(shape):
    if len(shape) == 1:
      return pl.BlockSpec(shape, param_index_map)
    if len(shape) == 2:
      return pl.BlockSpec((bt, shape[1]), token_index_map)
    return pl.BlockSpec((bt,) + tuple(shape[1:]), stream_index_map)

  return common.triton_call(
      kernel, grid=grid(tokens_padded, bt), in_specs=[spec(a.shape) for a in inputs],
      out_specs=[spec((tokens_padded,) + tail) for tail, _ in outputs],
      out_shape=[jax.ShapeDtypeStruct((tokens_padded,) + tail, dt) for tail, dt in outputs],
      num_warps=NUM_WARPS, num_stages=NUM_STAGES, interpret=interpret, name=name)(*inputs)


def _scale_vec(scale, n):
  return jnp.concatenate([jnp.full((n,), scale[0]), jnp.full((n,), scale[1]),
                          jnp.full((n * n,), scale[2])]).astype(jnp.float32)


def _pre_fwd_call(x, mixes, scale, base, iters, eps, interpret):
  b, s, n, d = x.shape
  bt, tp, bd, dp = _tiles(b * s, d)
  y, post, comb = _call(
      functools.partial(_pre_kernel, n=n, iters=iters, eps=eps, bd=bd), "mhc_pre_gpu",
      [_rows(mixes.astype(jnp.float32), tp), _scale_vec(scale, n), base.astype(jnp.float32), _rows(x, tp, dp)],
      [((dp,), x.dtype), ((n,), jnp.float32), ((n * n,), jnp.float32)], tp, bt, interpret)
  t = b * s
  return y[:t, :d].reshape(b, s, d), post[:t].reshape(b, s, n), comb[:t].reshape(b, s, n, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _mhc_pre(x, mixes, scale, base, iters, eps, interpret):
  return _pre_fwd_call(x, mixes, scale, base, iters, eps, interpret)


def _mhc_pre_fwd(x, mixes, scale, base, iters, eps, interpret):
  return _pre_fwd_call(x, mixes, scale, base, iters, eps, interpret), (x, mixes, scale, base)


def _mhc_pre_bwd(iters, eps, interpret, residuals, cotangents):
  x, mixes, scale, base = residuals
  dy, dpost, dcomb = cotangents
  b, s, n, d = x.shape
  bt, tp, bd, dp = _tiles(b * s, d)
  scale_vec = _scale_vec(scale, n)
  mixes_rows = _rows(mixes.astype(jnp.float32), tp)
  dz, dx = _call(
      functools.partial(_pre_grad_kernel, n=n, iters=iters, eps=eps, bd=bd), "mhc_pre_grad_gpu",
      [mixes_rows, scale_vec, base.astype(jnp.float32), _rows(x, tp, dp), _rows(dy, tp, dp),
       _rows(dpost.astype(jnp.float32), tp), _rows(dcomb.astype(jnp.float32).reshape(b, s, n * n), tp)],
      [((layout.mix_count(n),), jnp.float32), ((n, dp), jnp.float32)], tp, bt, interpret)
  t = b * s
  dz = dz[:t]  # padding tokens are cut before the parameter reductions
  dscale_vec = jnp.sum(dz * mixes_rows[:t], axis=0)
  dscale = jnp.stack([jnp.sum(dscale_vec[:n]), jnp.sum(dscale_vec[n:2 * n]), jnp.sum(dscale_vec[2 * n:])])
  return (dx[:t, :, :d].reshape(x.shape).astype(x.dtype), (dz * scale_vec).reshape(mixes.shape).astype(mixes.dtype),
          dscale.astype(scale.dtype), jnp.sum(dz, axis=0).astype(base.dtype))


_mhc_pre.defvjp(_mhc_pre_fwd, _mhc_pre_bwd)


def _post_fwd_call(y, residual, post, comb, interpret):
  b, s, n, d = residual.shape
  bt, tp, bd, dp = _tiles(b * s, d)
  (out,) = _call(functools.partial(_post_kernel, n=n, bd=bd), "mhc_post_gpu",
                 [_rows(y, tp, dp), _rows(residual, tp, dp), _rows(post.astype(jnp.float32), tp),
                  _rows(comb.astype(jnp.float32).reshape(b, s, n * n), tp)], [((n, dp), y.dtype)], tp, bt, interpret)
  return out[:b * s, :, :d].reshape(b, s, n, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _mhc_post(y, residual, post, comb, interpret):
  return _post_fwd_call(y, residual, post, comb, interpret)


def _mhc_post_fwd(y, residual, post, comb, interpret):
  return _post_fwd_call(y, residual, post, comb, interpret), (y, residual, post, comb)


def _mhc_post_bwd(interpret, residuals, dout):
  y, residual, post, comb = residuals
  b, s, n, d = residual.shape
  bt, tp, bd, dp = _tiles(b * s, d)
  dy, dx, dpost, dcomb = _call(
      functools.partial(_post_grad_kernel, n=n, bd=bd), "mhc_post_grad_gpu",
      [_rows(y, tp, dp), _rows(residual, tp, dp), _rows(post.astype(jnp.float32), tp),
       _rows(comb.astype(jnp.float32).reshape(b, s, n * n), tp), _rows(dout, tp, dp)],
      [((dp,), jnp.float32), ((n, dp), jnp.float32), ((n,), jnp.float32), ((n * n,), jnp.float32)],
      tp, bt, interpret)
  t = b * s
  return (dy[:t, :d].reshape(y.shape).astype(y.dtype), dx[:t, :, :d].reshape(residual.shape).astype(residual.dtype),
          dpost[:t].reshape(post.shape).astype(post.dtype), dcomb[:t].reshape(comb.shape).astype(comb.dtype))


_mhc_post.defvjp(_mhc_post_fwd, _mhc_post_bwd)


def mhc_pre(x: jax.Array, mixes: jax.Array, scale: jax.Array, base: jax.Array, *, iters: int, eps: float,
            interpret=None):
  """X [B, S, N, d], mixes [B, S, (2+N)·N], scale [3], base [(2+N)·N] ->
  (y [B, S, d] in X's dtype, post [B, S, N], comb [B, S, N, N]) (fp32 mixing), differentiable in all.
  interpret: None = interpret on CPU, Triton on GPU."""
  check_pre_arguments(x, mixes, scale, base, iters)
  return _mhc_pre(x, mixes, scale, base, int(iters), float(eps),
                  resolve_interpret(interpret, "pallas_kernels.gpu.mhc_pre", variant="gpu"))


def mhc_post(y: jax.Array, residual: jax.Array, post: jax.Array, comb: jax.Array, *, interpret=None):
  """Y_j = post_j · y + Σ_i comb[i, j] · X_i.  y [B, S, d], residual X [B, S, N, d] -> [B, S, N, d]."""
  check_post_arguments(y, residual, post, comb)
  return _mhc_post(y, residual, post, comb, resolve_interpret(interpret, "pallas_kernels.gpu.mhc_post", variant="gpu"))
