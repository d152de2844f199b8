"""Analytic forward FLOPs per token of a DeepSeek-V4 config (2 FLOPs per multiply-add, matmuls only).

The model count is what the architecture needs: W window slots and k routed experts per token.
`executed=True` counts what the XLA path runs instead, which is what XLA's cost analysis reports:
the banded window evaluation scores chunk + W − 1 keys per query (`ops/banded_attention.py`), and XLA
on CPU evaluates `jax.lax.ragged_dot` densely, every one of the k·T routed rows against all E experts.
Both count, for CSA, the top-k entries (sparse) and for HCA / dense CSA every compressed entry of the
sequence (masked ones are computed too).
"""

from __future__ import annotations

from dsv4_jax.config import ModelConfig


def _block_flops(cfg: ModelConfig, ratio: int, seq_len: int, attention: str, routed_experts: int,
                 window_slots: int) -> float:
  d, h, hd, n = cfg.hidden_size, cfg.num_attention_heads, cfg.head_dim, cfg.hc_mult
  f = 0.0
  # mHC around attention and MoE: mixes, pre-weighted sum, post + comb.
  f += 2 * (2 * cfg.mix_hc * n * d + 2 * n * d + 2 * n * n * d + 2 * n * d)
  # Attention projections.
  f += 2 * (d * cfg.q_lora_rank + cfg.q_lora_rank * h * hd + d * hd + h * hd * cfg.o_lora_rank
            + cfg.o_groups * cfg.o_lora_rank * d)
  entries = seq_len // ratio if ratio else 0
  slots = window_slots
  if ratio:
    coff = 2 if ratio == 4 else 1
    f += 2 * 2 * d * coff * hd  # compressor wkv + wgate
    if ratio == 4:
      di, hi = cfg.index_head_dim, cfg.index_n_heads
      f += 2 * (cfg.q_lora_rank * hi * di + d * hi + 2 * d * 2 * di)  # indexer projections + compressor
      if attention == "sparse":
        f += 2 * hi * di * entries + 2 * hi * entries  # indexer scores over every entry
        slots += min(cfg.index_topk, entries)
      else:
        slots += entries
    else:
      slots += entries
  f += 2 * 2 * h * hd * slots  # q·k and p·v
  # MoE: router, shared expert, routed experts.
  f += 2 * d * cfg.n_routed_experts + 3 * 2 * d * cfg.moe_intermediate_size * (1 + routed_experts)
  return f


def forward_flops_per_token(cfg: ModelConfig, seq_len: int, *, attention: str = "sparse",
                            executed: bool = False, with_mtp: bool = True) -> float:
  """Forward FLOPs per token (see module docstring); training ≈ 3× this."""
  k = cfg.num_experts_per_tok
  routed = k * cfg.n_routed_experts if executed else k
  window = cfg.sliding_window
  slots = min(cfg.attention_chunk_size, seq_len) + window - 1 if executed else window
  d, n = cfg.hidden_size, cfg.hc_mult
  head = 2 * n * n * d + 2 * n * d + 2 * d * cfg.vocab_size  # hc_head + output head
  f = sum(_block_flops(cfg, cfg.compress_ratios[i], seq_len, attention, routed, slots)
          for i in range(cfg.num_hidden_layers)) + head
  if with_mtp:
    for j in range(cfg.num_nextn_predict_layers):
      f += 2 * d * d + 2 * n * d * d  # e_proj, h_proj (on every stream)
      f += _block_flops(cfg, cfg.compress_ratios[cfg.num_hidden_layers + j], seq_len, attention, routed,
                        slots) + head
  return f
