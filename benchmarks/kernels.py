"""Times the Pallas kernels against their XLA references and reports achieved bytes/s and FLOP/s.

  python benchmarks/kernels.py [--repeats 50] [--smoke]

On an accelerator: for each kernel (sparse attention forward and forward+backward, indexer scores,
mHC pre, mHC post) the Pallas version and the XLA reference are jitted, run a few times for warm-up
(excluded), then timed `--repeats` times; the median is reported with the analytic bytes moved and
FLOPs, as rates and as fractions of the device's measured peak (a large bf16 matmul for FLOP/s, a
large array copy for bytes/s). On CPU it says it needs an accelerator; `--smoke` then runs each
kernel once at tiny sizes in interpret mode to check the script itself.

Sizes follow DeepSeek-V4-Flash per device (H = 64 heads × D = 512, K = 128 window + 512 top-k rows,
Hi = 64 × Di = 128 indexer, N = 4 streams × d = 4096), scaled by --tokens.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import jax
import jax.numpy as jnp


def _time(fn, args, repeats, warmup=3):
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def measured_peaks(repeats):
  """(FLOP/s, bytes/s) of a 8192³ bf16 matmul and a 1 GiB copy on the default device."""
  n = 8192
  a = jnp.ones((n, n), jnp.bfloat16)
  flops = 2 * n ** 3 / _time(jax.jit(lambda x: x @ x), (a,), repeats)
  big = jnp.ones((256 * 1024 * 1024,), jnp.float32)
  bandwidth = 2 * big.nbytes / _time(jax.jit(lambda x: x * 2.0), (big,), repeats)
  return flops, bandwidth


def _rand(key, shape, dtype=jnp.bfloat16):
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def cases(tokens, interpret):
  """[(name, pallas_fn, xla_fn, args, bytes, flops)] at `tokens` query tokens (batch 1)."""
  from dsv4_jax.ops import mhc as ref_mhc
  from dsv4_jax.ops import indexer as ref_indexer
  from dsv4_jax.ops import sparse_attention as ref_sa
  from pallas_kernels import indexer, mhc, sparse_attention

  ks = jax.random.split(jax.random.key(0), 12)
  s = tokens
  h, d, k, n_rows = (64, 512, 640, 2 * tokens) if not interpret else (2, 16, 6, 2 * tokens)
  q, kv = _rand(ks[0], (1, s, h, d)), _rand(ks[1], (1, n_rows, d))
  sink = jnp.zeros((h,), jnp.float32)
  idx = jax.random.randint(ks[2], (1, s, k), -1, n_rows)
  kw = dict(interpret=True) if interpret else {}
  sa_bytes = 2 * (q.size * 2 + s * k * d * 2 + s * k * 4)  # q + o, gathered rows, idx
  sa_flops = 4 * s * h * k * d
  pallas_sa = jax.jit(lambda q, kv, sink, idx: sparse_attention.sparse_attention(q, kv, sink, idx, **kw))
  xla_sa = jax.jit(lambda q, kv, sink, idx: ref_sa.sparse_attention(q, kv, sink, idx))

  def fwd_bwd(fn):
    return jax.jit(jax.grad(lambda q, kv, sink, idx: jnp.sum(fn(q, kv, sink, idx).astype(jnp.float32)),
                            argnums=(0, 1, 2)))

  hi, di, n_entries = (64, 128, tokens // 4) if not interpret else (2, 8, max(tokens // 4, 1))
  iq, iw, ik = _rand(ks[3], (1, s, hi, di)), _rand(ks[4], (1, s, hi)), _rand(ks[5], (1, n_entries, di))
  ix_bytes = iq.size * 2 + ik.size * 2 + s * n_entries * 4
  ix_flops = 2 * s * hi * n_entries * di + 3 * s * hi * n_entries

  n, dm = 4, (4096 if not interpret else 16)
  x = _rand(ks[6], (1, s, n, dm))
  mixes, scale, base = _rand(ks[7], (1, s, 24), jnp.float32), jnp.ones((3,)), jnp.zeros((24,))
  y, post, comb = _rand(ks[8], (1, s, dm)), _rand(ks[9], (1, s, n), jnp.float32), _rand(ks[10], (1, s, n, n), jnp.float32)

  return [
      ("sparse_attention fwd", pallas_sa, xla_sa, (q, kv, sink, idx), sa_bytes, sa_flops),
      ("sparse_attention fwd+bwd", fwd_bwd(pallas_sa), fwd_bwd(xla_sa), (q, kv, sink, idx), 3 * sa_bytes,
       3.5 * sa_flops),
      ("indexer scores (masked)",
       jax.jit(lambda a, b, c: indexer.indexer_scores(a, b, c, ratio=4, **kw)),
       jax.jit(lambda a, b, c: jnp.where(jnp.arange(c.shape[1]) < (jnp.arange(a.shape[1])[:, None] + 1) // 4,
                                         ref_indexer.indexer_scores(a, b, c), -jnp.inf)),
       (iq, iw, ik), ix_bytes, ix_flops),
      ("mhc_pre (Sinkhorn + Σ pre·X)", jax.jit(lambda *a: mhc.mhc_pre(*a, iters=20, eps=1e-6, **kw)),
       jax.jit(lambda *a: ref_mhc.mhc_pre(*a, iters=20, eps=1e-6)), (x, mixes, scale, base),
       x.size * 2 + s * dm * 2, 2 * s * n * dm + s * 20 * 64),
      ("mhc_post", jax.jit(lambda *a: mhc.mhc_post(*a, **kw)), jax.jit(ref_mhc.mhc_post), (y, x, post, comb),
       2 * x.size * 2 + y.size * 2, 2 * s * n * n * dm + 2 * s * n * dm),
  ]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=50)
  parser.add_argument("--tokens", type=int, default=4096)
  parser.add_argument("--smoke", action="store_true", help="on CPU: run each kernel once, tiny, interpreted")
  args = parser.parse_args(argv)
  backend = jax.default_backend()
  if backend == "cpu":
    print("benchmarks/kernels.py needs an accelerator (TPU or GPU): on CPU the kernels only run in "
          "interpret mode, whose timings mean nothing.")
    if not args.smoke:
      return 0
    for name, ours, ref, fn_args, _, _ in cases(8, interpret=True):
      o, r = jax.tree.leaves(ours(*fn_args)), jax.tree.leaves(ref(*fn_args))
      err = max(float(jnp.max(jnp.abs(jnp.where(jnp.isfinite(b), a.astype(jnp.float32) - b.astype(jnp.float32), 0))))
                for a, b in zip(o, r))
      print(f"smoke  {name:<32} ran; max |pallas − xla| = {err:.2e}")
    return 0

  peak_flops, peak_bw = measured_peaks(max(args.repeats // 5, 5))
  print(f"device: {jax.devices()[0].device_kind}; measured peak {peak_flops / 1e12:.1f} TFLOP/s (bf16 matmul), "
        f"{peak_bw / 1e9:.0f} GB/s (copy); tokens = {args.tokens}, median of {args.repeats}")
  print(f"{'kernel':<32} {'impl':<7} {'ms':>9} {'GB/s':>9} {'%bw':>6} {'TFLOP/s':>9} {'%peak':>6}")
  for name, ours, ref, fn_args, nbytes, flops in cases(args.tokens, interpret=False):
    for impl, fn in (("pallas", ours), ("xla", ref)):
      try:
        t = _time(fn, fn_args, args.repeats)
      except NotImplementedError as e:  # e.g. no GPU lowering of the scalar-prefetch kernels
        print(f"{name:<32} {impl:<7} {'n/a':>9}  ({str(e).split(';')[0]})")
        continue
      print(f"{name:<32} {impl:<7} {t * 1e3:9.3f} {nbytes / t / 1e9:9.1f} {100 * nbytes / t / peak_bw:6.1f} "
            f"{flops / t / 1e12:9.2f} {100 * flops / t / peak_flops:6.1f}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
