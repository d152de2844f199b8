"""Mapping between our NNX parameter paths and the released checkpoint's tensor names.

Ours mirror the released names, so the mapping is renaming and stacking only:
  layers.3.hc_attn.fn            <-> layers.3.hc_attn_fn        (likewise hc_ffn, hc_head; base, scale)
  layers.0.ffn.experts.w1 [E,…]  <-> layers.0.ffn.experts.{e}.w1.weight  (one tensor per expert)
  everything else                 <-> the same dotted path
"""

from __future__ import annotations

import re

_HC = re.compile(r"(^|\.)(hc_(?:attn|ffn|head))\.(fn|base|scale)$")
_EXPERT = re.compile(r"^(.*\.ffn\.experts)\.(w[123])$")
_RELEASED_EXPERT = re.compile(r"^(.*\.ffn\.experts)\.(\d+)\.(w[123])\.weight$")


def path_to_name(path: tuple) -> str:
  """An nnx state path (('layers', 3, 'attn', 'wq_a', 'weight')) -> our dotted name."""
  return ".".join(str(p) for p in path)


def to_released(name: str, n_experts: int) -> list[str]:
  """Our dotted name -> the released tensor name(s) (one per expert for stacked expert weights)."""
  name = _HC.sub(r"\1\2_\3", name)
  m = _EXPERT.match(name)
  if m:
    return [f"{m.group(1)}.{e}.{m.group(2)}.weight" for e in range(n_experts)]
  return [name]


def from_released(name: str) -> tuple[str, int | None]:
  """A released tensor name -> (our dotted name, expert index or None)."""
  m = _RELEASED_EXPERT.match(name)
  if m:
    return f"{m.group(1)}.{m.group(3)}", int(m.group(2))
  for kind in ("hc_attn", "hc_ffn", "hc_head"):
    for part in ("fn", "base", "scale"):
      suffix = f"{kind}_{part}"
      if name == suffix or name.endswith("." + suffix):
        return name[: len(name) - len(suffix)] + f"{kind}.{part}", None
  return name, None
