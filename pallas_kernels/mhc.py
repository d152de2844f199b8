"""Pallas mHC kernels: mixes -> (pre, post, comb) with Sinkhorn in-kernel, fused with y = Σ pre_i X_i;
and mhc_post. Forward and backward.

Per token (N streams, M = (2+N)·N mixes, z = mixes · scale_vec + base, all fp32):
  pre_i  = sigmoid(z_i) + eps,   post_i = 2 · sigmoid(z_{N+i}),
  comb   = Sinkhorn(z_{2N + i·N + j}): softmax over j, + eps, columns / (col sum + eps), then
           (iters − 1) rounds of rows / (row sum + eps), columns / (col sum + eps)
  y      = Σ_i pre_i · X_i                                               (mhc_pre)
  Y_j    = post_j · y + Σ_i comb[i, j] · X_i                             (mhc_post)
Shapes: X [B, S, N, d], mixes [B, S, M], scale [3], base [M]; y [B, S, d], post [B, S, N],
comb [B, S, N, N]. Same semantics as the XLA reference dsv4_jax.ops.mhc (mhc_pre, mhc_post).

Kernel layout: tokens flattened and tiled (grid (B·S / bt,), parallel), X as [tokens, N·d] so stream i
is the lane range `stream_cols(i, d)`; the comb logits are viewed as [bt, N, N] (row-major,
`comb_col`) and all Sinkhorn iterations run in an in-kernel loop on values in registers/VMEM, so a
token tile never leaves the chip between mixes and y.

Backward method: the backward kernels recompute the forward of their token tile. The gates and the
stream sums are differentiated with `jax.vjp` of the same per-tile functions inside the kernel. The
Sinkhorn backward is recomputation without stored intermediates: for round k (last to first) the
kernel replays rounds 0..k−1 from the initial normalisation and pulls the cotangent back through round
k with the vjp of that one round: O(iters²) rounds of N×N arithmetic per token (negligible next to
the X traffic) and O(1) memory. The pre kernel returns dz [tokens, M]; XLA turns it into
d mixes = dz·scale_vec, d base = Σ dz and d scale = Σ dz·mixes (grouped per scale entry).

Backends: interpret on CPU (default there); written for TPU Mosaic (lane dims N·d, N, N², M are full
array dims; d should be a multiple of 128 for aligned stream slices). The [bt, N²] -> [bt, N, N]
reshape of the comb logits is a lane-to-sublane relayout that Mosaic may reject (then the Sinkhorn
must be written on N² lane columns); untested on hardware. `interpret=None` refuses GPU, whose variant is
pallas_kernels/gpu/mhc.py (Triton).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from pallas_kernels.common import kernel_call, resolve_interpret
from pallas_kernels.intmath import cdiv, floordiv

TOKEN_TILE = 256
SUBLANES = 8


# ---- integer index arithmetic (used by the kernels and proved by pallas_kernels.verify) ----

def padded(n, tile):
  return cdiv(n, tile) * tile


def grid(tokens_padded, bt):
  return (floordiv(tokens_padded, bt),)


def token_index_map(ti):
  """Every operand is [tokens, lanes] with block (bt, lanes): the tile of tokens ti."""
  return (ti, 0)


def param_index_map(ti):
  """The [1, lanes] parameter rows (scale_vec, base) are the same block for every tile."""
  return (0, 0)


def stream_cols(i, d):
  """Lane range [start, stop) of stream i in X [tokens, N·d]."""
  return (i * d, (i + 1) * d)


def pre_cols(n):
  """Mixes columns [start, stop) of the pre logits."""
  return (0, n)


def post_cols(n):
  return (n, 2 * n)


def comb_cols(n):
  """Mixes columns of the N×N comb logits, row-major: logit (i, j) at comb_cols(n)[0] + comb_col(i, j, n)."""
  return (2 * n, 2 * n + n * n)


def comb_col(i, j, n):
  """Row-major position of comb[i, j] in an N² row (mixes comb logits and the comb output alike)."""
  return i * n + j


def mix_count(n):
  return (2 + n) * n


# ---- per-tile math (values, fp32) ----

def _cols(z, span):
  return z[:, span[0]:span[1]]


def _normalise_cols(c, eps):
  return c / (jnp.sum(c, axis=1, keepdims=True) + eps)


def _sinkhorn_init(logits, eps):
  """[bt, N, N] logits -> softmax over j, + eps, then the first column normalisation."""
  e = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, axis=2, keepdims=True)))
  return _normalise_cols(e / jnp.sum(e, axis=2, keepdims=True) + eps, eps)


def _sinkhorn_round(c, eps):
  """One row normalisation then one column normalisation."""
  return _normalise_cols(c / (jnp.sum(c, axis=2, keepdims=True) + eps), eps)


def _sinkhorn(logits, iters, eps):
  return jax.lax.fori_loop(0, iters - 1, lambda _, c: _sinkhorn_round(c, eps), _sinkhorn_init(logits, eps))


def _sinkhorn_vjp(logits, dcomb, iters, eps):
  """d logits of Sinkhorn by recomputation: for each round, replay the forward up to it (O(iters²)
  tiny rounds, no stored intermediates) and pull the cotangent back through that round."""
  c0 = _sinkhorn_init(logits, eps)

  def back(r, g):
    k = iters - 2 - r
    c_k = jax.lax.fori_loop(0, k, lambda _, c: _sinkhorn_round(c, eps), c0)
    return jax.vjp(lambda c: _sinkhorn_round(c, eps), c_k)[1](g)[0]

  g0 = jax.lax.fori_loop(0, iters - 1, back, dcomb)
  return jax.vjp(lambda lg: _sinkhorn_init(lg, eps), logits)[1](g0)[0]


def _stream(x, i, d):
  start, stop = stream_cols(i, d)
  return x[:, start:stop]


def _gates(z, x, n, d, eps):
  """pre/post gates and y = Σ_i pre_i X_i from z [bt, M] and X [bt, N·d] -> (y [bt, d], post [bt, N])."""
  pre = jax.nn.sigmoid(_cols(z, pre_cols(n))) + eps
  post = 2.0 * jax.nn.sigmoid(_cols(z, post_cols(n)))
  y = sum((pre[:, i:i + 1] * _stream(x, i, d) for i in range(1, n)), pre[:, 0:1] * _stream(x, 0, d))
  return y, post


def _comb_logits(z, n):
  return _cols(z, comb_cols(n)).reshape(z.shape[0], n, n)  # row-major: comb_col(i, j, n)


def _post_tile(y, x, post, comb, n, d):
  """-> out [bt, N·d] (fp32): stream j = post_j · y + Σ_i comb[i, j] · X_i."""
  outs = []
  for j in range(n):
    acc = post[:, j:j + 1] * y
    for i in range(n):
      acc = acc + comb[:, comb_col(i, j, n):comb_col(i, j, n) + 1] * _stream(x, i, d)
    outs.append(acc)
  return jnp.concatenate(outs, axis=1)


# ---- kernels ----

def _pre_kernel(mix_ref, scale_ref, base_ref, x_ref, y_ref, post_ref, comb_ref, *, n, d, iters, eps):
  z = mix_ref[...] * scale_ref[...] + base_ref[...]
  y, post = _gates(z, x_ref[...].astype(jnp.float32), n, d, eps)
  y_ref[...] = y.astype(y_ref.dtype)
  post_ref[...] = post
  comb_ref[...] = _sinkhorn(_comb_logits(z, n), iters, eps).reshape(z.shape[0], n * n)


def _pre_grad_kernel(mix_ref, scale_ref, base_ref, x_ref, dy_ref, dpost_ref, dcomb_ref, dz_ref, dx_ref, *,
                     n, d, iters, eps):
  z = mix_ref[...] * scale_ref[...] + base_ref[...]
  _, gates_vjp = jax.vjp(lambda z_, x_: _gates(z_, x_, n, d, eps), z, x_ref[...].astype(jnp.float32))
  dz_gates, dx = gates_vjp((dy_ref[...].astype(jnp.float32), dpost_ref[...]))
  dcomb = dcomb_ref[...].reshape(z.shape[0], n, n)
  dlogits = _sinkhorn_vjp(_comb_logits(z, n), dcomb, iters, eps).reshape(z.shape[0], n * n)
  start, stop = comb_cols(n)
  dz_ref[...] = dz_gates
  dz_ref[:, start:stop] += dlogits
  dx_ref[...] = dx


def _post_kernel(y_ref, x_ref, post_ref, comb_ref, out_ref, *, n, d):
  out = _post_tile(y_ref[...].astype(jnp.float32), x_ref[...].astype(jnp.float32), post_ref[...],
                   comb_ref[...], n, d)
  out_ref[...] = out.astype(out_ref.dtype)


def _post_grad_kernel(y_ref, x_ref, post_ref, comb_ref, dout_ref, dy_ref, dx_ref, dpost_ref, dcomb_ref, *,
                      n, d):
  args = (y_ref[...].astype(jnp.float32), x_ref[...].astype(jnp.float32), post_ref[...], comb_ref[...])
  _, vjp = jax.vjp(lambda *a: _post_tile(*a, n, d), *args)
  dy, dx, dpost, dcomb = vjp(dout_ref[...].astype(jnp.float32))
  dy_ref[...], dx_ref[...], dpost_ref[...], dcomb_ref[...] = dy, dx, dpost, dcomb


def _token_tiles(tokens):
  bt = min(TOKEN_TILE, padded(tokens, SUBLANES))
  return bt, padded(tokens, bt)


def _rows(a, tokens_padded):
  """[B, S, ...] -> [tokens_padded, prod(...)] (zero padded)."""
  flat = a.reshape(a.shape[0] * a.shape[1], -1)
  return jnp.pad(flat, [(0, tokens_padded - flat.shape[0]), (0, 0)])


def _call(kernel, name, inputs, outputs, tokens_padded, bt, interpret):
  """inputs: [tokens_padded | 1, lanes] arrays (1-row arrays are broadcast params); outputs: (lanes, dtype)."""
  spec = lambda lanes: pl.BlockSpec((bt, lanes), token_index_map)
  param = lambda lanes: pl.BlockSpec((1, lanes), param_index_map)
  in_specs = [param(a.shape[1]) if a.shape[0] == 1 else spec(a.shape[1]) for a in inputs]
  return kernel_call(kernel, grid=grid(tokens_padded, bt), in_specs=in_specs,
                     out_specs=[spec(lanes) for lanes, _ in outputs],
                     out_shape=[jax.ShapeDtypeStruct((tokens_padded, lanes), dt) for lanes, dt in outputs],
                     dimension_semantics=("parallel",), interpret=interpret, name=name)(*inputs)


def _scale_vec(scale, n):
  return jnp.concatenate([jnp.full((n,), scale[0]), jnp.full((n,), scale[1]),
                          jnp.full((n * n,), scale[2])]).astype(jnp.float32)


def _pre_fwd_call(x, mixes, scale, base, iters, eps, interpret):
  b, s, n, d = x.shape
  bt, tp = _token_tiles(b * s)
  y, post, comb = _call(
      functools.partial(_pre_kernel, n=n, d=d, iters=iters, eps=eps), "mhc_pre",
      [_rows(mixes.astype(jnp.float32), tp), _scale_vec(scale, n)[None], base.astype(jnp.float32)[None],
       _rows(x, tp)],
      [(d, x.dtype), (n, jnp.float32), (n * n, jnp.float32)], tp, bt, interpret)
  t = b * s
  return y[:t].reshape(b, s, d), post[:t].reshape(b, s, n), comb[:t].reshape(b, s, n, n)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _mhc_pre(x, mixes, scale, base, iters, eps, interpret):
  return _pre_fwd_call(x, mixes, scale, base, iters, eps, interpret)


def _mhc_pre_fwd(x, mixes, scale, base, iters, eps, interpret):
  return _pre_fwd_call(x, mixes, scale, base, iters, eps, interpret), (x, mixes, scale, base)


def _mhc_pre_bwd(iters, eps, interpret, residuals, cotangents):
  x, mixes, scale, base = residuals
  dy, dpost, dcomb = cotangents
  b, s, n, d = x.shape
  bt, tp = _token_tiles(b * s)
  scale_vec = _scale_vec(scale, n)
  mixes_rows = _rows(mixes.astype(jnp.float32), tp)
  dz, dx = _call(
      functools.partial(_pre_grad_kernel, n=n, d=d, iters=iters, eps=eps), "mhc_pre_grad",
      [mixes_rows, scale_vec[None], base.astype(jnp.float32)[None], _rows(x, tp), _rows(dy, tp),
       _rows(dpost.astype(jnp.float32), tp), _rows(dcomb.astype(jnp.float32), tp)],
      [(mix_count(n), jnp.float32), (n * d, jnp.float32)], tp, bt, interpret)
  t = b * s
  dz = dz[:t]  # padding tokens are cut before the parameter reductions
  dscale_vec = jnp.sum(dz * mixes_rows[:t], axis=0)
  dscale = jnp.stack([jnp.sum(dscale_vec[:n]), jnp.sum(dscale_vec[n:2 * n]), jnp.sum(dscale_vec[2 * n:])])
  return (dx[:t].reshape(x.shape).astype(x.dtype), (dz * scale_vec).reshape(mixes.shape).astype(mixes.dtype),
          dscale.astype(scale.dtype), jnp.sum(dz, axis=0).astype(base.dtype))


_mhc_pre.defvjp(_mhc_pre_fwd, _mhc_pre_bwd)


def _post_fwd_call(y, residual, post, comb, interpret):
  b, s, n, d = residual.shape
  bt, tp = _token_tiles(b * s)
  (out,) = _call(functools.partial(_post_kernel, n=n, d=d), "mhc_post",
                 [_rows(y, tp), _rows(residual, tp), _rows(post.astype(jnp.float32), tp),
                  _rows(comb.astype(jnp.float32), tp)], [(n * d, y.dtype)], tp, bt, interpret)
  return out[:b * s].reshape(b, s, n, d)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _mhc_post(y, residual, post, comb, interpret):
  return _post_fwd_call(y, residual, post, comb, interpret)


def _mhc_post_fwd(y, residual, post, comb, interpret):
  return _post_fwd_call(y, residual, post, comb, interpret), (y, residual, post, comb)


def _mhc_post_bwd(interpret, residuals, dout):
  y, residual, post, comb = residuals
  b, s, n, d = residual.shape
  bt, tp = _token_tiles(b * s)
  dy, dx, dpost, dcomb = _call(
      functools.partial(_post_grad_kernel, n=n, d=d), "mhc_post_grad",
      [_rows(y, tp), _rows(residual, tp), _rows(post.astype(jnp.float32), tp),
       _rows(comb.astype(jnp.float32), tp), _rows(dout, tp)],
      [(d, jnp.float32), (n * d, jnp.float32), (n, jnp.float32), (n * n, jnp.float32)], tp, bt, interpret)
  t = b * s
  return (dy[:t].reshape(y.shape).astype(y.dtype), dx[:t].reshape(residual.shape).astype(residual.dtype),
          dpost[:t].reshape(post.shape).astype(post.dtype), dcomb[:t].reshape(comb.shape).astype(comb.dtype))


_mhc_post.defvjp(_mhc_post_fwd, _mhc_post_bwd)


def check_pre_arguments(x: jax.Array, mixes: jax.Array, scale: jax.Array, base: jax.Array, iters: int) -> None:
  """The shape contract of mhc_pre (this kernel and the XLA reference alike)."""
  b, s, n, d = x.shape
  m = mix_count(n)
  if mixes.shape != (b, s, m):
    raise ValueError(f"mhc_pre: mixes must be [B={b}, S={s}, (2+N)·N={m}], got {mixes.shape}")
  if scale.shape != (3,) or base.shape != (m,):
    raise ValueError(f"mhc_pre: scale must be [3] and base [{m}], got {scale.shape} and {base.shape}")
  if iters < 1:
    raise ValueError(f"mhc_pre: iters must be ≥ 1, got {iters}")


def check_post_arguments(y: jax.Array, residual: jax.Array, post: jax.Array, comb: jax.Array) -> None:
  """The shape contract of mhc_post (this kernel and the XLA reference alike)."""
  b, s, n, d = residual.shape
  if y.shape != (b, s, d) or post.shape != (b, s, n) or comb.shape != (b, s, n, n):
    raise ValueError(f"mhc_post: expected y [{b}, {s}, {d}], post [{b}, {s}, {n}], comb [{b}, {s}, {n}, {n}]; "
                     f"got {y.shape}, {post.shape}, {comb.shape}")


def mhc_pre(x: jax.Array, mixes: jax.Array, scale: jax.Array, base: jax.Array, *, iters: int, eps: float,
            interpret=None):
  """X [B, S, N, d], mixes [B, S, (2+N)·N], scale [3], base [(2+N)·N] ->
  (y [B, S, d] in X's dtype, post [B, S, N], comb [B, S, N, N]) (fp32 mixing), differentiable in all."""
  check_pre_arguments(x, mixes, scale, base, iters)
  return _mhc_pre(x, mixes, scale, base, int(iters), float(eps),
                  resolve_interpret(interpret, "pallas_kernels.mhc_pre"))


def mhc_post(y: jax.Array, residual: jax.Array, post: jax.Array, comb: jax.Array, *, interpret=None):
  """Y_j = post_j · y + Σ_i comb[i, j] · X_i.  y [B, S, d], residual X [B, S, N, d] -> [B, S, N, d]."""
  check_post_arguments(y, residual, post, comb)
  return _mhc_post(y, residual, post, comb, resolve_interpret(interpret, "pallas_kernels.mhc_post"))
