"""KV-cache size: the real cache pytree (sized with `jax.eval_shape`, nothing allocated) against
an analytic formula and two baselines. Derivation: docs/cache_size.md.

Per token of context (D head dim, Dr RoPE dims, Di indexer dim, layers counted by kind):
  V4        = Σ_CSA (E + E_I) / 4 + Σ_HCA E / 128           (+ a constant: W rows per layer, block states)
              E   = entry bytes:  BF16 2·D;   mixed (D − Dr) FP8 + (D − Dr)/64 e8m0 scales + 2·Dr BF16
              E_I = indexer key:  BF16 2·Di;  mixed Di FP8 + Di/64 scales
  V3.2-style = 61 layers × (576 BF16 values (512 latent + 64 RoPE) + 128 FP8 indexer-key bytes) = 78,080 B
  GQA-8      = L layers × 2 (K, V) × 8 heads × 128 dims × 2 bytes (BF16), L = the V4 model's layer count
"""

from __future__ import annotations

import os

import jax

from dsv4_jax.config import ModelConfig
from dsv4_jax.config.shipped import resolve_config
from dsv4_jax.layers.cache import cache_bytes, init_cache, resolve_storage
from dsv4_jax.ops.quantization import KV_FP8_BLOCK

V32_LAYERS = 61
V32_MLA_VALUES = 576  # 512 latent + 64 RoPE dims, BF16
V32_INDEXER_BYTES = 128  # one FP8 key of 128 dims (its 4-byte scale ignored)
GQA_HEADS, GQA_HEAD_DIM = 8, 128

def load_config(name_or_path: str) -> ModelConfig:
  """A shipped config (`flash`, `pro`, `tiny`), a YAML file or a hub config.json."""
  path = resolve_config(name_or_path)
  if path.endswith(".json") or os.path.isdir(path):
    return ModelConfig.from_hf_config(path)
  if not os.path.exists(path):
    raise FileNotFoundError(f"--config {name_or_path!r}: expected flash, pro, a YAML file or a config.json")
  return ModelConfig.from_yaml(path)


def _entry_bytes(dim: int, rope_dim: int, storage: str) -> float:
  if storage != "mixed":
    return dim * (2 if storage == "bfloat16" else 4)
  nope = dim - rope_dim
  blocks = nope // KV_FP8_BLOCK if nope % KV_FP8_BLOCK == 0 else 1
  return nope + blocks + 2 * rope_dim


def analytic_bytes_per_token(cfg: ModelConfig, storage: str) -> float:
  """The per-token slope of the V4 cache (constant terms left out)."""
  storage = resolve_storage(cfg, storage)
  entry = _entry_bytes(cfg.head_dim, cfg.qk_rope_head_dim, storage)
  index_key = _entry_bytes(cfg.index_head_dim, 0, storage)
  total = 0.0
  for r in cfg.compress_ratios[:cfg.num_hidden_layers]:
    if r:
      total += (entry + (index_key if r == 4 else 0.0)) / r
  return total


def v32_bytes_per_token() -> int:
  return V32_LAYERS * (2 * V32_MLA_VALUES + V32_INDEXER_BYTES)


def gqa8_bytes_per_token(cfg: ModelConfig) -> int:
  return cfg.num_hidden_layers * 2 * GQA_HEADS * GQA_HEAD_DIM * 2


def pytree_bytes(cfg: ModelConfig, context: int, storage: str, batch: int = 1) -> int:
  """Bytes of the real cache for `batch` rows of `context` tokens (abstract: nothing is allocated)."""
  return cache_bytes(jax.eval_shape(lambda: init_cache(cfg, batch, context, storage)))


def report(cfg: ModelConfig, context: int, storage: str = "mixed") -> dict:
  storage = resolve_storage(cfg, storage)
  total = pytree_bytes(cfg, context, storage)
  out = {
      "context": context, "storage": storage,
      "v4_total": total, "v4_per_token": total / context,
      "v4_analytic_per_token": analytic_bytes_per_token(cfg, storage),
      "v32_per_token": v32_bytes_per_token(), "gqa8_per_token": gqa8_bytes_per_token(cfg),
  }
  out["ratio_v32"] = out["v4_per_token"] / out["v32_per_token"]
  out["ratio_gqa8"] = out["v4_per_token"] / out["gqa8_per_token"]
  out["analytic_ratio_v32"] = out["v4_analytic_per_token"] / out["v32_per_token"]
  out["analytic_ratio_gqa8"] = out["v4_analytic_per_token"] / out["gqa8_per_token"]
  return out


def format_report(cfg: ModelConfig, rep: dict, name: str = "") -> str:
  ratios = cfg.compress_ratios[:cfg.num_hidden_layers]
  kinds = f"{ratios.count(0)} window, {ratios.count(4)} CSA, {ratios.count(128)} HCA"
  n = rep["context"]

  def gib(per_token):
    return per_token * n / 2 ** 30

  lines = [
      f"config {name}: {cfg.num_hidden_layers} layers ({kinds}); context {n:,} tokens; storage {rep['storage']}",
      f"{'cache':44s} {'bytes/token':>12s} {'total GiB':>10s} {'vs V3.2':>8s} {'vs GQA-8':>9s}",
  ]
  rows = [
      ("DeepSeek-V4 (cache pytree, eval_shape)", rep["v4_per_token"], rep["ratio_v32"], rep["ratio_gqa8"]),
      ("DeepSeek-V4 (analytic, per-token slope)", rep["v4_analytic_per_token"], rep["analytic_ratio_v32"],
       rep["analytic_ratio_gqa8"]),
      ("V3.2-style MLA 576 BF16 + FP8 indexer, 61 L", rep["v32_per_token"], 1.0,
       rep["v32_per_token"] / rep["gqa8_per_token"]),
      (f"BF16 GQA-8, head dim 128, {cfg.num_hidden_layers} L", rep["gqa8_per_token"],
       rep["gqa8_per_token"] / rep["v32_per_token"], 1.0),
  ]
  for label, per_token, r32, rgqa in rows:
    lines.append(f"{label:44s} {per_token:12,.1f} {gib(per_token):10.2f} {100 * r32:7.2f}% {100 * rgqa:8.2f}%")
  return "\n".join(lines)
