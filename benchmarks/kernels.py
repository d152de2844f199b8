"""Times each Pallas kernel against its XLA reference at DeepSeek-V4-Flash shapes, against the roofline.

  python benchmarks/kernels.py [--json kernels.json] [--repeats 20] [--tokens 4096] [--no-block]
  python benchmarks/kernels.py --smoke [--json smoke.json]        # CPU: tiny shapes, interpret mode
  (--cases mhc_pre,indexer: only those; --variant tpu|gpu: the other variant)

One call on one accelerator (an H200: the Triton variants, pallas_kernels.gpu; a TPU: the Mosaic ones)
times, for bf16 inputs, each kernel and its XLA reference (dsv4_jax/ops), forward and forward+backward:
  sparse attention         Pallas sparse_attention vs the gather reference, K = window + top-k rows
  CSA attention, model     the model's own per-chunk path: gathered kernel (dispatch, Pallas) vs the
                           banded XLA evaluation (ops/hybrid_attention.py), top-k picked per chunk
  indexer scores           causal-masked scores of every (query, entry) pair
  mhc_pre, mhc_post        Sinkhorn + weighted stream sum; stream mixing
For each: the median time of --repeats runs after warm-up, the analytic FLOPs and the minimum HBM bytes
(each operand read once, each result written once; gathered rows counted once per distinct row), the
achieved rates, and the fraction of the roofline time max(FLOPs / peak FLOP/s, bytes / peak bytes/s)
that was reached (H200: 990 TFLOP/s dense bf16, 4.8 TB/s; other devices: measured peaks), plus the
largest relative difference between the kernel's and the reference's outputs (and gradients).
Then one Flash block (a CSA layer: mHC, attention, indexer, MoE) forward+backward with the kernels and
with XLA, and the share of it spent in its two mHC sublayers (pre + post, forward+backward).
Prints one table, and writes everything as JSON with --json. Shapes come from configs/flash.yaml
(--config), per device: one sequence of --tokens tokens.

On CPU the timings mean nothing (interpret mode): it says so, unless --smoke, which runs every case once
at tiny shapes (configs/tiny.yaml) in interpret mode (the GPU variant unless --variant tpu) to check the
script and the numbers it reports.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

import jax
import jax.numpy as jnp
import numpy as np

# (dense bf16 FLOP/s, HBM bytes/s) by device kind (substring match); others are measured.
ROOFLINES = {"H200": (990e12, 4.8e12), "H100": (989e12, 3.35e12)}
BF16 = jnp.bfloat16


def _time(fn, args, repeats, warmup=2):
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
  a = jnp.ones((n, n), BF16)
  flops = 2 * n ** 3 / _time(jax.jit(lambda x: x @ x), (a,), repeats)
  big = jnp.ones((256 * 1024 * 1024,), jnp.float32)
  bandwidth = 2 * big.nbytes / _time(jax.jit(lambda x: x * 2.0), (big,), repeats)
  return flops, bandwidth


def roofline(repeats):
  """(peak FLOP/s, peak bytes/s, where from) of the default device; None on CPU."""
  if jax.default_backend() == "cpu":
    return None
  kind = jax.devices()[0].device_kind
  for name, peaks in ROOFLINES.items():
    if name in kind:
      return peaks + (f"{name} datasheet",)
  return measured_peaks(max(repeats // 4, 3)) + ("measured",)


def rel_diff(got, want) -> float:
  """max |got − want| / max |want| over all leaves (finite reference entries only)."""
  num = den = 0.0
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    finite = np.isfinite(b)
    if finite.any():
      num = max(num, float(np.max(np.abs(np.where(finite, a, 0.0) - np.where(finite, b, 0.0)))))
      den = max(den, float(np.max(np.abs(np.where(finite, b, 0.0)))))
  return num / max(den, 1e-30)


def shapes(cfg, tokens: int) -> dict:
  """The per-device sizes of one sequence of `tokens` tokens of the model `cfg` (a CSA layer)."""
  return dict(tokens=tokens, heads=cfg.num_attention_heads, head_dim=cfg.head_dim, window=cfg.sliding_window,
              topk=cfg.index_topk, ratio=4, entries=tokens // 4, index_heads=cfg.index_n_heads,
              index_dim=cfg.index_head_dim, streams=cfg.hc_mult, hidden=cfg.hidden_size,
              iters=cfg.hc_sinkhorn_iters, eps=cfg.hc_eps, chunk=min(cfg.attention_chunk_size, tokens))


def _normal(key, shape, dtype=BF16):
  return jax.random.normal(key, shape, jnp.float32).astype(dtype)


def _grad_of(fn, argnums):
  """args -> gradients of Σ outputs (finite entries) w.r.t. args[argnums]: one jitted forward+backward."""
  def run(*args):
    def loss(*a):
      leaves = [o.astype(jnp.float32) for o in jax.tree.leaves(fn(*a))]
      return sum(jnp.sum(jnp.where(jnp.isfinite(o), o, 0.0)) for o in leaves)  # masked scores are −inf
    return jax.grad(loss, argnums=argnums)(*args)
  return jax.jit(run)


def cases(sh: dict, variant: str, interpret: bool, kernels: str):
  """[(name, pallas_fn, xla_fn, args, bytes, flops)]: every kernel, forward and forward+backward."""
  from dsv4_jax.ops import dispatch, index_rules
  from dsv4_jax.ops import indexer as ref_indexer
  from dsv4_jax.ops import mhc as ref_mhc
  from dsv4_jax.ops import sparse_attention as ref_sa
  from dsv4_jax.ops.hybrid_attention import banded_attention
  from dsv4_jax.ops.visibility import compressed_visibility, window_indices
  from pallas_kernels.common import map_query_chunks
  if variant == "gpu":
    from pallas_kernels.gpu import indexer, mhc, sparse_attention
  else:
    from pallas_kernels import indexer, mhc, sparse_attention

  s, h, d, w, r, n = (sh[k] for k in ("tokens", "heads", "head_dim", "window", "ratio", "entries"))
  hi, di, ns, dm, chunk = (sh[k] for k in ("index_heads", "index_dim", "streams", "hidden", "chunk"))
  ks = iter(jax.random.split(jax.random.key(0), 16))
  kw = dict(interpret=interpret)

  # sparse attention: each query's window rows ∪ a top-k of its visible compressed rows (index rules)
  q, kv, sink = _normal(next(ks), (1, s, h, d)), _normal(next(ks), (1, s + n, d)), _normal(next(ks), (h,), jnp.float32)
  rows = jnp.arange(s, dtype=jnp.int32)[None]
  seg = jnp.ones((1, s), jnp.int32)
  index_scores = jax.random.normal(next(ks), (1, s, n), jnp.float32)
  picks, _ = ref_indexer.select_topk(index_scores, compressed_visibility(rows, seg, r, n), sh["topk"])
  idx = jnp.concatenate([window_indices(rows, seg, w), index_rules.compressed_row(picks, s)], axis=-1)
  k = idx.shape[-1]
  sa_flops = 4 * s * h * k * d
  sa_bytes = 2 * q.size * 2 + kv.size * 2 + idx.size * 4
  pallas_sa = lambda q, kv, sink: sparse_attention.sparse_attention(q, kv, sink, idx, chunk_size=chunk, **kw)
  xla_sa = lambda q, kv, sink: ref_sa.sparse_attention(q, kv, sink, idx, chunk_size=chunk)

  # the model's CSA path over query chunks: top-k per chunk, then banded (XLA) or gathered (kernel)
  def csa(kernels_):
    attend = banded_attention if kernels_ == "xla" else dispatch.hybrid_attention(kernels_)

    def layer(q, kv, sink):
      def one_chunk(rows_c, q_c, scores_c):
        valid = compressed_visibility(rows_c, seg, r, n)
        cidx, _ = ref_indexer.select_topk(scores_c, valid, sh["topk"])
        o, _, _ = attend(q_c, rows_c, kv, seg, sink, window=w, scale=d ** -0.5, compressed_valid=cidx >= 0,
                         compressed_idx=cidx)
        return o
      return map_query_chunks(one_chunk, chunk, rows, q, index_scores)
    return layer

  # indexer: causal scores of every (query, entry) pair; FLOPs of the visible pairs only
  iq, iw, ik = _normal(next(ks), (1, s, hi, di)), _normal(next(ks), (1, s, hi)), _normal(next(ks), (1, n, di))
  visible_pairs = int(np.sum(np.minimum((np.arange(s) + 1) // r, n)))
  ix_flops = visible_pairs * hi * (2 * di + 3)
  ix_bytes = iq.size * 2 + iw.size * 2 + ik.size * 2 + s * n * 4
  mask = compressed_visibility(rows, seg, r, n)
  pallas_ix = lambda a, b, c: indexer.indexer_scores(a, b, c, ratio=r, rows=rows, **kw)
  xla_ix = lambda a, b, c: jnp.where(mask, ref_indexer.indexer_scores(a, b, c), -jnp.inf)

  # mHC on X [1, S, N, d]
  m = (2 + ns) * ns
  x = _normal(next(ks), (1, s, ns, dm))
  mixes, scale, base = (_normal(next(ks), (1, s, m), jnp.float32), jnp.ones((3,), jnp.float32),
                        0.1 * _normal(next(ks), (m,), jnp.float32))
  y = _normal(next(ks), (1, s, dm))
  post = 2 * jax.nn.sigmoid(_normal(next(ks), (1, s, ns), jnp.float32))
  comb = jax.nn.softmax(_normal(next(ks), (1, s, ns, ns), jnp.float32), axis=-1)
  sink_flops = s * sh["iters"] * 6 * ns * ns
  pre_bytes, post_bytes = x.size * 2 + y.size * 2 + s * m * 4, 2 * x.size * 2 + y.size * 2 + s * (ns + ns * ns) * 4
  mhc_kw = dict(iters=sh["iters"], eps=sh["eps"])

  return [
      ("sparse_attention fwd", jax.jit(pallas_sa), jax.jit(xla_sa), (q, kv, sink), sa_bytes, sa_flops),
      ("sparse_attention fwd+bwd", _grad_of(pallas_sa, (0, 1, 2)), _grad_of(xla_sa, (0, 1, 2)), (q, kv, sink),
       3 * sa_bytes + kv.size * 4, 3.5 * sa_flops),
      ("CSA attention (model path) fwd", jax.jit(csa(kernels)), jax.jit(csa("xla")), (q, kv, sink), sa_bytes,
       sa_flops),
      ("CSA attention (model path) fwd+bwd", _grad_of(csa(kernels), (0, 1, 2)), _grad_of(csa("xla"), (0, 1, 2)),
       (q, kv, sink), 3 * sa_bytes + kv.size * 4, 3.5 * sa_flops),
      ("indexer_scores fwd", jax.jit(pallas_ix), jax.jit(xla_ix), (iq, iw, ik), ix_bytes, ix_flops),
      ("indexer_scores fwd+bwd", _grad_of(pallas_ix, (0, 1, 2)), _grad_of(xla_ix, (0, 1, 2)), (iq, iw, ik),
       2 * ix_bytes + s * n * 4 + (iq.size + iw.size + ik.size) * 4, 5 * ix_flops),
      ("mhc_pre fwd", jax.jit(lambda *a: mhc.mhc_pre(*a, **mhc_kw, **kw)),
       jax.jit(lambda *a: ref_mhc.mhc_pre(*a, **mhc_kw)), (x, mixes, scale, base), pre_bytes,
       2 * x.size + sink_flops),
      ("mhc_pre fwd+bwd", _grad_of(lambda *a: mhc.mhc_pre(*a, **mhc_kw, **kw), (0, 1, 2, 3)),
       _grad_of(lambda *a: ref_mhc.mhc_pre(*a, **mhc_kw), (0, 1, 2, 3)), (x, mixes, scale, base),
       pre_bytes + x.size * 2 + y.size * 2 + x.size * 4, 3 * 2 * x.size + 3 * sink_flops),
      ("mhc_post fwd", jax.jit(lambda *a: mhc.mhc_post(*a, **kw)), jax.jit(ref_mhc.mhc_post), (y, x, post, comb),
       post_bytes, 2 * x.size * (ns + 1)),
      ("mhc_post fwd+bwd", _grad_of(lambda *a: mhc.mhc_post(*a, **kw), (0, 1, 2, 3)),
       _grad_of(ref_mhc.mhc_post, (0, 1, 2, 3)), (y, x, post, comb), post_bytes + x.size * 2 + y.size * 2
       + x.size * 2 + (x.size + y.size) * 4, 3 * 2 * x.size * (ns + 1)),
  ]


def block_share(cfg, sh: dict, kernels: str, repeats: int) -> dict:
  """One block of `cfg` (its first CSA layer) forward+backward, and its two mHC sublayers alone, with
  `kernels` ("xla" or the Pallas choice): {block_ms, mhc_ms, share}."""
  from flax import nnx
  from dsv4_jax.layers.block import Block

  layer = list(cfg.compress_ratios).index(4)
  mcfg = cfg.replace(kernels=kernels, dtype="bfloat16", param_dtype="bfloat16")
  make = lambda: Block(mcfg, layer, rngs=nnx.Rngs(0))
  graphdef, _, _ = nnx.split(nnx.eval_shape(make), nnx.Param, ...)
  params, rest = jax.jit(lambda: nnx.split(make(), nnx.Param, ...)[1:])()  # initialised on the device
  s = sh["tokens"]
  x = _normal(jax.random.key(1), (1, s, sh["streams"], sh["hidden"]))
  ids = jax.random.randint(jax.random.key(2), (1, s), 0, cfg.vocab_size)
  positions, seg = jnp.arange(s, dtype=jnp.int32)[None], jnp.ones((1, s), jnp.int32)

  def block_loss(params, x):
    out, _, _ = nnx.merge(graphdef, params, rest)(x, ids, positions, seg, attention_mode="sparse",
                                                  with_indexer_loss=False)
    return jnp.sum(out.astype(jnp.float32))

  def mhc_loss(params, x):  # the block's two hyper-connections, with the sublayer F = identity
    block = nnx.merge(graphdef, params, rest)
    for hc in (block.hc_attn, block.hc_ffn):
      y, post, comb = hc.pre(x)
      x = hc.post(y, x, post, comb)
    return jnp.sum(x.astype(jnp.float32))

  t_block = _time(jax.jit(jax.grad(block_loss, argnums=(0, 1))), (params, x), repeats)
  t_mhc = _time(jax.jit(jax.grad(mhc_loss, argnums=(0, 1))), (params, x), repeats)
  return dict(kernels=kernels, block_ms=t_block * 1e3, mhc_ms=t_mhc * 1e3, share=t_mhc / t_block)


def run(args) -> dict:
  from dsv4_jax.config import ModelConfig
  from dsv4_jax.config.shipped import resolve_config
  from dsv4_jax.ops import dispatch

  backend = jax.default_backend()
  interpret = backend == "cpu"
  variant = args.variant if args.variant != "auto" else ("tpu" if backend == "tpu" else "gpu")
  cfg = ModelConfig.from_yaml(resolve_config(args.config or ("tiny" if args.smoke else "flash")))
  sh = shapes(cfg, args.tokens or (32 if args.smoke else 4096))
  repeats = 1 if args.smoke else args.repeats
  peaks = roofline(repeats)
  report = dict(device=jax.devices()[0].device_kind, backend=backend, variant=variant, interpret=interpret,
                smoke=args.smoke, shapes=sh, repeats=repeats,
                roofline=None if peaks is None else dict(flops_per_s=peaks[0], bytes_per_s=peaks[1], source=peaks[2]),
                results=[], mhc_share=[])
  print(f"device: {report['device']} ({backend}); kernels: the {variant.upper()} variant"
        + (", interpret mode (timings mean nothing)" if interpret else "")
        + (f"; roofline {peaks[0] / 1e12:.0f} TFLOP/s, {peaks[1] / 1e12:.2f} TB/s ({peaks[2]})" if peaks else "")
        + f"; {sh['tokens']} tokens, median of {repeats}")
  header = (f"{'kernel':<36} {'impl':<6} {'ms':>9} {'TFLOP/s':>8} {'GB/s':>8} {'%roof':>6} "
            f"{'xla/pallas':>10} {'rel diff':>9}")
  print(header + "\n" + "-" * len(header))
  # trace (and so choose the kernels) under the chosen variant; interpreted on CPU
  with dispatch.kernel_platform(variant, interpret=interpret):
    for name, ours, ref, fn_args, nbytes, flops in cases(sh, variant, interpret, "pallas"):
      if args.cases and not any(pattern in name for pattern in args.cases.split(",")):
        continue
      rows, outputs = {}, {}
      for impl, fn in (("pallas", ours), ("xla", ref)):
        entry = dict(kernel=name, impl=impl, bytes=float(nbytes), flops=float(flops))
        try:
          outputs[impl] = jax.block_until_ready(fn(*fn_args))
          t = _time(fn, fn_args, repeats, warmup=0 if args.smoke else 2)
          entry.update(ms=t * 1e3, flops_per_s=flops / t, bytes_per_s=nbytes / t)
          if peaks:
            entry["roofline_fraction"] = max(flops / peaks[0], nbytes / peaks[1]) / t
        except Exception as e:  # one failing kernel must not end a single-call run
          entry["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows[impl] = entry
      if len(outputs) == 2:
        rows["pallas"]["rel_diff"] = rel_diff(outputs["pallas"], outputs["xla"])
      if "ms" in rows["pallas"] and "ms" in rows["xla"]:
        rows["pallas"]["speedup"] = rows["xla"]["ms"] / rows["pallas"]["ms"]
      for impl, e in rows.items():
        report["results"].append(e)
        if "error" in e:
          print(f"{name:<36} {impl:<6} {'failed':>9}  {e['error']}")
          continue
        roof = f"{100 * e['roofline_fraction']:6.1f}" if "roofline_fraction" in e else f"{'-':>6}"
        speed = f"{e['speedup']:10.2f}" if "speedup" in e else f"{'':>10}"
        diff = f"{e['rel_diff']:9.1e}" if "rel_diff" in e else f"{'':>9}"
        print(f"{name:<36} {impl:<6} {e['ms']:9.3f} {e['flops_per_s'] / 1e12:8.2f} {e['bytes_per_s'] / 1e9:8.1f} "
              f"{roof} {speed} {diff}")
    if args.block:
      for kernels in ("pallas", "xla"):
        try:
          share = block_share(cfg, sh, kernels, repeats)
        except Exception as e:
          share = dict(kernels=kernels, error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
        report["mhc_share"].append(share)
        label = "Pallas" if kernels == "pallas" else "XLA"
        print(f"one block fwd+bwd ({label}): " + (share["error"] if "error" in share else
              f"{share['block_ms']:.3f} ms, of which mHC (2 × pre + post) {share['mhc_ms']:.3f} ms = "
              f"{100 * share['share']:.1f}%"))
  return report


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--tokens", type=int, default=None, help="tokens of the one sequence (default 4096; smoke 32)")
  parser.add_argument("--config", default=None, help="model config for the shapes (default flash; smoke tiny)")
  parser.add_argument("--variant", default="auto", choices=["auto", "gpu", "tpu"],
                      help="kernel variant (auto: the backend's; GPU on CPU)")
  parser.add_argument("--json", default=None, help="write the report here")
  parser.add_argument("--cases", default=None, help="only the cases whose name contains one of these "
                      "comma-separated strings (e.g. 'mhc_pre,indexer')")
  parser.add_argument("--no-block", dest="block", action="store_false", help="skip the block / mHC-share timing")
  parser.add_argument("--smoke", action="store_true", help="on CPU: every case once, tiny shapes, interpreted")
  args = parser.parse_args(argv)
  if jax.default_backend() == "cpu" and not args.smoke:
    print("benchmarks/kernels.py needs an accelerator (GPU or TPU): on CPU the kernels only run in interpret "
          "mode, whose timings mean nothing. --smoke runs it at tiny shapes to check the script.")
    return 0
  report = run(args)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(report, f, indent=1)
    print(f"wrote {args.json}")
  failed = [e for e in report["results"] + report["mhc_share"] if "error" in e]
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
