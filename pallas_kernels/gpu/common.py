"""Shared plumbing of the GPU (Pallas Triton) kernels: the call builder, power-of-two block sizes, tiles.

Triton constraints that shape every GPU kernel here:
  * `pallas_call` lowers through Triton only when given `plgpu.CompilerParams` (without them JAX 0.10
    picks Mosaic GPU on CUDA); `triton_call` always passes them.
  * Every loaded / stored array has a power-of-two number of elements, and `tl.dot` wants every matmul
    dimension ≥ 16: the wrappers pad heads, head dims, slots, tokens and model dims up to the power-of-two
    block sizes chosen by `block_size` (index slots with −1 = "no entry", query rows with −1 = "no
    position", everything else with 0), and slice the padding off the results.
  * No scratch memory and no sequential grid axes: an accumulation runs as an in-kernel `fori_loop` over
    tiles (`tile_start`) of a block that holds the whole reduced dimension, so each output block is
    owned by one program. Row scatter-adds (sparse attention's dkv) are atomic (`jax.ref.addupdate`,
    lowered to Triton's atomic fadd; exact sequential adds in interpret mode).
  * Values cannot be sliced in-kernel (no `lax.slice` lowering): sub-ranges are read from refs with
    `pl.ds`, small per-token matrices are kept as Python lists of [bt] vectors.

`interpret=True` runs the same kernels under Pallas' generic interpreter on CPU (what the tests do);
`pallas_kernels.common.poison_outputs()` poisons their outputs with NaN as for the TPU kernels.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from pallas_kernels.common import poisoning
from pallas_kernels.intmath import cdiv, floordiv

MIN_DOT = 16  # tl.dot needs M, N, K ≥ 16


# ---- integer index arithmetic (proved by pallas_kernels.verify.gpu) ----

def tile_start(i, tile):
  """First element of tile i when a dimension is walked in tiles of `tile` elements: i·tile."""
  return i * tile


def padded(n, tile):
  """n rounded up to a whole number of tiles (the wrappers pad every tiled dimension to this)."""
  return cdiv(n, tile) * tile


def tile_count(n_padded, tile):
  """Number of tiles of a dimension padded to a multiple of `tile`."""
  return floordiv(n_padded, tile)


# ---- block sizes (Python ints) ----

def next_power_of_two(n: int) -> int:
  """The smallest power of two ≥ n (1 for n ≤ 1)."""
  return 1 << max(0, int(n) - 1).bit_length()


def block_size(n: int, lo: int, hi: int) -> int:
  """A power-of-two block for a dimension of n elements: next_power_of_two(n) clamped to [lo, hi]
  (lo, hi powers of two). The dimension is then padded to a multiple of it."""
  for v in (lo, hi):
    if v < 1 or v & (v - 1):
      raise ValueError(f"block_size: bounds must be powers of two, got lo={lo}, hi={hi}")
  return min(hi, max(lo, next_power_of_two(n)))


def pad_axis(x: jax.Array, axis: int, size: int, fill=0) -> jax.Array:
  """x padded along `axis` to `size` elements with `fill` (x itself when already that long)."""
  extra = size - x.shape[axis]
  if extra < 0:
    raise ValueError(f"pad_axis: axis {axis} has {x.shape[axis]} elements, more than {size}")
  if extra == 0:
    return x
  widths = [(0, 0)] * x.ndim
  widths[axis] = (0, extra)
  return jnp.pad(x, widths, constant_values=fill)


# ---- in-kernel helpers ----

def dot(a: jax.Array, b: jax.Array, *, trans_a: bool = False, trans_b: bool = False) -> jax.Array:
  """fp32-accumulated product of two 2-D tiles, op(a) · op(b). fp32 operands are multiplied at full
  precision (Triton's IEEE mode, not TF32) so that fp32 results match the XLA references."""
  dims = (((0 if trans_a else 1,), (1 if trans_b else 0,)), ((), ()))
  return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32, precision=jax.lax.Precision.HIGHEST)


# ---- the call builder ----

def triton_call(kernel: Callable, *, grid: tuple, in_specs: Sequence, out_specs: Sequence,
                out_shape: Sequence[jax.ShapeDtypeStruct], zero_outputs: Sequence[int] = (),
                num_warps: int, num_stages: int, interpret: Any, name: str) -> Callable:
  """pallas_call lowered by Triton. Outputs listed in `zero_outputs` start as zeros (accumulators the
  kernel adds into atomically); with `poisoning()` every other float output starts as NaN, so elements
  the kernel fails to write show up. Both are input buffers aliased to the outputs, which the kernel
  body never sees. The returned function takes the inputs and returns the tuple of outputs."""
  in_specs, out_specs, out_shape = list(in_specs), list(out_specs), list(out_shape)
  zero = set(zero_outputs)
  poison = poisoning()
  preset = [i for i, s in enumerate(out_shape)
            if i in zero or (poison and jnp.issubdtype(s.dtype, jnp.floating))]
  n_in = len(in_specs)

  def body(*refs):
    kernel(*(refs[:n_in] + refs[n_in + len(preset):]))

  call = pl.pallas_call(
      body, out_shape=tuple(out_shape), grid=grid,
      in_specs=in_specs + [out_specs[i] for i in preset], out_specs=tuple(out_specs),
      input_output_aliases={n_in + k: i for k, i in enumerate(preset)},
      compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
      interpret=interpret, name=name)

  def run(*args):
    initial = [jnp.full(out_shape[i].shape, 0 if i in zero else jnp.nan, out_shape[i].dtype) for i in preset]
    return call(*args, *initial)

  return run
