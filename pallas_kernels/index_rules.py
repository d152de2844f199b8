"""The model's integer index rules: the one and only definition of each.

Notation: t query position, s key position, W sliding window, r compression ratio, i compressed-entry
index (entry i pools tokens i·r .. i·r + r − 1), p a token position held in the decode cache.

  window_row(t, w, W)                   key row read by window slot w ∈ [0, W) of query t: t − W + 1 + w
                                        (slot W − 1 is t itself)
  window_visible(t, s, W, seg_t, seg_s) query t (segment seg_t) may attend key row s (segment seg_s):
                                        s ≥ 0, t − W < s ≤ t and seg_s == seg_t (segments = packed
                                        documents; pass equal dummy segments when there are none)
  ring_slot(p, W)                       decode ring-buffer slot of position p: p mod W
  ring_position(t, slot, W)             position held by ring slot `slot` once token t is written: the
                                        latest p ≤ t with p ≡ slot (mod W), t − ((t − slot) mod W);
                                        negative = the slot was never written
  entry_visible(t, i, r)                entry i is complete at query t (all its tokens ≤ t):
                                        i < (t + 1) // r
  entry_first_token(i, r)               i · r: the position whose RoPE and segment entry i takes
  entry_completed_by(t, r)              token t completes an entry ((t + 1) mod r == 0); it is entry t // r
  entry_of_token(t, r), block_slot(t, r) t // r and t mod r: a token's entry and its slot in the block
  compressed_row(entry, base)           row of compressed entry `entry` in the gathered attention rows
                                        [window rows 0 .. base − 1 | entries]: base + entry; −1 (an empty
                                        top-k slot) stays −1
  topk_slot(entry, visible)             a top-k pick is kept iff visible, else −1

Every rule is built only from +, −, ·, comparisons and `pallas_kernels.intmath`, so the same function
runs on Python ints, on traced jnp int32 arrays (elementwise, broadcasting) and on Z3 integer terms.
Callers: the XLA evaluation (dsv4_jax/ops), the Pallas kernels (pallas_kernels.indexer's causal mask),
decoding (the KV ring buffer and the compressor's completion step), and the Z3 proofs in
`pallas_kernels/verify/index_rules.py`, which prove these very functions against specs written
independently of them. Callers look rules up as `index_rules.<name>` at call time (never
`from pallas_kernels.index_rules import <name>`), so that a patched rule is the one that runs and is
proved. Nothing here may import dsv4_jax.
"""

from __future__ import annotations

from pallas_kernels.intmath import floordiv, land, mod, select

# ---- sliding window ----


def window_row(t, w, window):
  """The key row read by window slot w ∈ [0, W) of query t: t − W + 1 + w (slot W − 1 is t)."""
  return t - window + 1 + w


def window_visible(t, s, window, seg_t, seg_s):
  """Query t of segment seg_t may attend key row s of segment seg_s: s ≥ 0, t − W < s ≤ t, same segment."""
  return land(s >= 0, s > t - window, s <= t, seg_s == seg_t)


# ---- decode ring buffer (the last W positions of the window cache) ----


def ring_slot(p, window):
  """The ring-buffer slot holding position p: p mod W ∈ [0, W)."""
  return mod(p, window)


def ring_position(t, slot, window):
  """Position held in ring slot `slot` after token t was written: the latest p ≤ t with p ≡ slot (mod W).

  Negative iff the slot was never written (slot > t).
  """
  return t - mod(t - slot, window)


# ---- compressed entries (entry i pools tokens i·r .. i·r + r − 1) ----


def entry_visible(t, i, ratio):
  """Entry i is complete (all of its r tokens seen) at query position t: i < (t + 1) // r."""
  return i < floordiv(t + 1, ratio)


def entry_first_token(i, ratio):
  """The first token of entry i, i·r: the position whose RoPE and segment the entry takes."""
  return i * ratio


def entry_completed_by(t, ratio):
  """Token t completes an entry (entry t // r): (t + 1) mod r == 0."""
  return mod(t + 1, ratio) == 0


def entry_of_token(t, ratio):
  """The entry token t belongs to: t // r."""
  return floordiv(t, ratio)


def block_slot(t, ratio):
  """Token t's slot inside its entry's block of r tokens: t mod r."""
  return mod(t, ratio)


# ---- slot layout of the gathered attention rows ----


def compressed_row(entry, base):
  """Row of compressed entry `entry` in [window rows 0..base−1 | entries]: base + entry; −1 stays −1."""
  return select(entry >= 0, base + entry, -1)


def topk_slot(entry, visible):
  """A top-k pick is kept iff it is visible, else −1 (an empty slot)."""
  return select(visible, entry, -1)
