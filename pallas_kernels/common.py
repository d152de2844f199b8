"""Shared plumbing for the Pallas kernels: interpret-mode choice, output poisoning, the call builder.

Two variants of each kernel: the TPU one (pallas_kernels.sparse_attention, .indexer, .mhc; Mosaic) and
the GPU one (pallas_kernels.gpu.*; Triton). `interpret=None` means: interpret on CPU (the generic Pallas
interpreter, either variant), compile on the variant's own accelerator (`resolve_interpret`). Pass
`interpret=pltpu.InterpretParams(...)` to run under the TPU interpreter, which simulates scalar
prefetch, SMEM/VMEM memory spaces and the DMA pipeline on CPU.

Poisoning (tests): inside `with poison_outputs():` every floating-point kernel output starts as a NaN
buffer aliased to the output (input_output_aliases), so any element the kernel fails to write shows
up as NaN instead of silently holding stale or zero memory.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

_state = threading.local()


@contextlib.contextmanager
def poison_outputs(enabled: bool = True):
  """Within this context, kernels traced from now on start every float output as NaN."""
  previous = getattr(_state, "poison", False)
  _state.poison = enabled
  try:
    yield
  finally:
    _state.poison = previous


def poisoning() -> bool:
  return getattr(_state, "poison", False)


VARIANTS = {"tpu": "pallas_kernels (Mosaic TPU)", "gpu": "pallas_kernels.gpu (Triton)"}


def resolve_interpret(interpret: Any, kernel_name: str, variant: str = "tpu") -> Any:
  """None -> interpret on CPU, compiled on the backend the kernel variant is written for.

  variant "tpu" (pallas_kernels.*: scalar-prefetch BlockSpecs, Mosaic) compiles on TPU; variant "gpu"
  (pallas_kernels.gpu.*: Triton) compiles on GPU. A variant on the other accelerator is refused with a
  pointer to the right one (`dsv4_jax.ops.dispatch` picks it for you). An explicit `interpret` is
  returned unchanged: True (or a pltpu.InterpretParams) interprets either variant on any backend, False
  compiles, e.g. to lower for another platform with `jax.export`.
  """
  if variant not in VARIANTS:
    raise ValueError(f"{kernel_name}: variant must be one of {sorted(VARIANTS)}, got {variant!r}")
  if interpret is not None:
    return interpret
  backend = jax.default_backend()
  if backend == "cpu":
    return True
  if backend == variant:
    return False
  hint = f"use the {backend.upper()} variant, {VARIANTS[backend]}" if backend in VARIANTS else "pass interpret=True"
  raise NotImplementedError(
      f"{kernel_name}: the {variant.upper()} variant has no compiled lowering for backend {backend!r}; "
      f"{hint} (dsv4_jax.ops.dispatch picks the variant for the backend).")


def kernel_call(kernel: Callable, *, grid: tuple, in_specs: Sequence, out_specs: Sequence,
                out_shape: Sequence[jax.ShapeDtypeStruct], num_scalar_prefetch: int = 0,
                scratch_shapes: Sequence = (), dimension_semantics: Sequence[str],
                interpret: Any, name: str) -> Callable:
  """pallas_call with a PrefetchScalarGridSpec; outputs are poisoned with NaN when `poisoning()`.

  The returned function takes (*scalar_prefetch, *inputs) and returns the tuple of outputs.
  """
  in_specs, out_specs, out_shape = list(in_specs), list(out_specs), list(out_shape)
  poison = poisoning()
  n_in = num_scalar_prefetch + len(in_specs)
  poisoned = [i for i, s in enumerate(out_shape) if poison and jnp.issubdtype(s.dtype, jnp.floating)]

  def body(*refs):
    if poisoned:  # the aliased NaN inputs are the outputs' initial contents; the kernel ignores them
      refs = refs[:n_in] + refs[n_in + len(poisoned):]
    kernel(*refs)

  call = pl.pallas_call(
      body,
      out_shape=tuple(out_shape),
      grid_spec=pltpu.PrefetchScalarGridSpec(
          num_scalar_prefetch=num_scalar_prefetch, grid=grid,
          in_specs=in_specs + [out_specs[i] for i in poisoned],
          out_specs=tuple(out_specs), scratch_shapes=tuple(scratch_shapes)),
      input_output_aliases={n_in + k: i for k, i in enumerate(poisoned)},
      compiler_params=pltpu.CompilerParams(dimension_semantics=tuple(dimension_semantics)),
      interpret=interpret, name=name)

  def run(*args):
    nan_buffers = [jnp.full(out_shape[i].shape, jnp.nan, out_shape[i].dtype) for i in poisoned]
    return call(*args, *nan_buffers)

  return run


def map_query_chunks(fn: Callable, chunk_size: int, *xs):
  """Applies fn to consecutive query chunks of arrays [B, S, ...] and concatenates the results.

  S is padded to a multiple of chunk_size (integer arrays with −1, e.g. index slots and query rows that
  then name nothing; others with 0), the padding rows are sliced off again, and each chunk is
  rematerialised in the backward pass, so only one chunk's intermediates are alive at a time.
  fn receives (*chunks) and returns a pytree of [B, chunk, ...] arrays. Shared by the kernels and the
  XLA references (dsv4_jax imports it from here).
  """
  s = xs[0].shape[1]
  if s <= chunk_size:  # one chunk: nothing to save by rematerialising
    return fn(*xs)
  n = -(-s // chunk_size)
  pad = n * chunk_size - s

  def split(x):
    fill = -1 if jnp.issubdtype(x.dtype, jnp.integer) else 0
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return jnp.moveaxis(x.reshape((x.shape[0], n, chunk_size) + x.shape[2:]), 1, 0)

  def merge(y):
    y = jnp.moveaxis(y, 0, 1)
    return y.reshape((y.shape[0], n * chunk_size) + y.shape[3:])[:, :s]

  out = jax.lax.map(jax.checkpoint(lambda args: fn(*args)), tuple(split(x) for x in xs))
  return jax.tree.map(merge, out)
