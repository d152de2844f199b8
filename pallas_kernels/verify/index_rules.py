"""Z3 proofs of the model's integer index rules, `pallas_kernels.index_rules`.

Those functions are the only definition of the sliding window, the decode ring buffer, compressed-entry
visibility / completion and the slot layout of the gathered attention rows; the XLA evaluation, the
Pallas kernels and decoding all call them. Here they are called with Z3 integer terms for symbolic
sizes (W ≥ 1, r ≥ 1, t ≥ 0, …) and checked against specs written independently of their formulas:

  window   query t sees exactly the rows s ≥ 0 with t − W < s ≤ t of its own segment, each through
           exactly one slot (slot w reads t − W + 1 + w);
  ring     the W ring slots hold, after token t is written, exactly the positions of t's window, each
           in the slot it was written to;
  entries  entry i (tokens i·r .. i·r + r − 1) is visible iff all its tokens are seen, and it becomes
           visible exactly at the token that completes it;
  layout   compressed rows follow the window rows [0, base) without overlap, one row per entry, and
           only visible top-k picks reach a row.

Every function is looked up on the `pallas_kernels.index_rules` module when `properties()` runs (a
monkeypatched rule is the one proved), unless a caller overrides it (the mutation tests do).
"""

from __future__ import annotations

import z3

from pallas_kernels import index_rules
from pallas_kernels.verify.engine import Result, functions_under_proof, prove

KERNEL = "index_rules"
NAMES = ("window_row", "window_visible", "ring_slot", "ring_position", "entry_visible", "entry_first_token",
         "entry_completed_by", "entry_of_token", "block_slot", "compressed_row", "topk_slot")


def _fns(overrides):
  return functions_under_proof(index_rules, NAMES, overrides)


def window_properties(f) -> list[Result]:
  t, s, w, w1, w2, window, seg_t, seg_s = z3.Ints("t s w w1 w2 W seg_t seg_s")
  hyp = [t >= 0, window >= 1]
  in_w = lambda x: z3.And(0 <= x, x < window)
  row = lambda w_: f["window_row"](t, w_, window)
  visible = lambda s_, a, b: f["window_visible"](t, s_, window, a, b)
  in_window = [0 <= s, t - window + 1 <= s, s <= t]  # max(0, t − W + 1) ≤ s ≤ t
  witness = s - t + window - 1  # the slot that should read s
  return [
      prove(KERNEL, "window: slot w reads row t−W+1+w (slot W−1 is t)",
            row(w) == t - window + 1 + w, hyp + [in_w(w)], [t, window, w]),
      prove(KERNEL, "window: slot w of t is visible iff its row is ≥ 0",
            visible(row(w), seg_t, seg_t) == (row(w) >= 0), hyp + [in_w(w)], [t, window, w]),
      prove(KERNEL, "window: visible ⇒ s ≥ 0, t−W < s ≤ t (no future row, none too old)",
            z3.Implies(visible(s, seg_t, seg_s), z3.And(s >= 0, t - window < s, s <= t)), hyp,
            [t, window, s, seg_t, seg_s]),
      prove(KERNEL, "window: segment isolation: visible ⇒ seg_s == seg_t",
            z3.Implies(visible(s, seg_t, seg_s), seg_s == seg_t), hyp, [t, window, s, seg_t, seg_s]),
      prove(KERNEL, "window: every s with max(0, t−W+1) ≤ s ≤ t of t's segment is visible",
            visible(s, seg_t, seg_t), hyp + in_window, [t, window, s]),
      prove(KERNEL, "window: every s with max(0, t−W+1) ≤ s ≤ t is the row of a slot",
            z3.And(in_w(witness), row(witness) == s), hyp + in_window, [t, window, s]),
      prove(KERNEL, "window: slots read distinct rows (each row through one slot)",
            z3.Implies(row(w1) == row(w2), w1 == w2), hyp + [in_w(w1), in_w(w2)], [t, window, w1, w2]),
  ]


def ring_properties(f) -> list[Result]:
  t, p, q, slot, window, seg = z3.Ints("t p q slot W seg")
  hyp = [t >= 0, window >= 1]
  ring_slot = lambda p_: f["ring_slot"](p_, window)
  held = lambda slot_: f["ring_position"](t, slot_, window)
  in_ring = [0 <= slot, slot < window]
  return [
      prove(KERNEL, "ring: ring_slot(p) ∈ [0, W)",
            z3.And(0 <= ring_slot(p), ring_slot(p) < window), hyp, [window, p]),
      prove(KERNEL, "ring: positions less than W apart get distinct slots",
            ring_slot(p) != ring_slot(q), hyp + [p < q, q < p + window], [window, p, q]),
      prove(KERNEL, "ring: ring_slot(p + W) == ring_slot(p)",
            ring_slot(p + window) == ring_slot(p), hyp, [window, p]),
      prove(KERNEL, "ring: slot holds a position of that slot with t−W < p ≤ t",
            z3.And(ring_slot(held(slot)) == slot, t - window < held(slot), held(slot) <= t),
            hyp + in_ring, [t, window, slot]),
      prove(KERNEL, "ring: slot holds a position ≥ 0 iff it was written (slot ≤ t)",
            (held(slot) >= 0) == (slot <= t), hyp + in_ring, [t, window, slot]),
      prove(KERNEL, "ring: every p with max(0, t−W+1) ≤ p ≤ t is held in its slot",
            held(ring_slot(p)) == p, hyp + [0 <= p, t - window < p, p <= t], [t, window, p]),
      prove(KERNEL, "ring: the slot written by t holds t", held(ring_slot(t)) == t, hyp, [t, window]),
      prove(KERNEL, "ring: the cache read at t is t's window (held ≥ 0 ⇔ window_visible)",
            (held(slot) >= 0) == f["window_visible"](t, held(slot), window, seg, seg), hyp + in_ring,
            [t, window, slot]),
  ]


def entry_properties(f) -> list[Result]:
  t, i, j, r = z3.Ints("t i j r")
  hyp = [t >= 0, i >= 0, r >= 1]
  visible = lambda t_, i_: f["entry_visible"](t_, i_, r)
  of, slot_in = (lambda t_: f["entry_of_token"](t_, r)), (lambda t_: f["block_slot"](t_, r))
  completed = lambda t_: f["entry_completed_by"](t_, r)
  return [
      prove(KERNEL, "entries: entry i visible at t iff (i+1)·r ≤ t+1 (all its tokens seen)",
            visible(t, i) == ((i + 1) * r <= t + 1), hyp, [t, i, r]),
      prove(KERNEL, "entries: visible ⇒ no future token (i·r + r − 1 ≤ t)",
            z3.Implies(visible(t, i), z3.And(i * r <= t, i * r + r - 1 <= t)), hyp, [t, i, r]),
      prove(KERNEL, "entries: token i·r+j (0 ≤ j < r) is entry i, slot j; first token i·r",
            z3.And(f["entry_first_token"](i, r) == i * r, of(i * r + j) == i, slot_in(i * r + j) == j),
            hyp + [0 <= j, j < r], [i, j, r]),
      prove(KERNEL, "entries: t = first token of its entry + block_slot(t), 0 ≤ slot < r",
            z3.And(f["entry_first_token"](of(t), r) + slot_in(t) == t, 0 <= slot_in(t), slot_in(t) < r),
            hyp, [t, r]),
      prove(KERNEL, "entries: the last token i·r + r − 1 of entry i completes it",
            completed(i * r + r - 1), hyp, [i, r]),
      prove(KERNEL, "entries: no other token i·r + j (j < r − 1) completes an entry",
            z3.Not(completed(i * r + j)), hyp + [0 <= j, j < r - 1], [i, j, r]),
      prove(KERNEL, "entries: an entry is visible at its completing token, not before",
            z3.Implies(completed(t), z3.And(visible(t, of(t)), z3.Not(visible(t - 1, of(t))))), hyp, [t, r]),
      prove(KERNEL, "entries: an entry becomes visible only at the token completing it",
            z3.Implies(z3.And(visible(t, i), z3.Not(visible(t - 1, i))), z3.And(completed(t), i == of(t))),
            hyp, [t, i, r]),
  ]


def layout_properties(f) -> list[Result]:
  e, e1, e2, n, base, x, t, s, r, window, seg_t, seg_s = z3.Ints("e e1 e2 N base x t s r W seg_t seg_s")
  v = z3.Bool("visible")
  in_domain = lambda e_: z3.Or(e_ == -1, z3.And(0 <= e_, e_ < n))  # {−1} ∪ [0, N)
  hyp = [n >= 0, base >= 0, in_domain(e)]
  row = lambda e_: f["compressed_row"](e_, base)
  gathered = row(f["topk_slot"](e, f["entry_visible"](t, e, r)))  # the row a top-k pick of t ends up in
  return [
      prove(KERNEL, "layout: compressed_row is −1 iff the entry is −1 (empty top-k slot)",
            (row(e) == -1) == (e == -1), hyp, [n, base, e]),
      prove(KERNEL, "layout: compressed rows of entries lie in [base, base+N)",
            z3.Implies(e != -1, z3.And(base <= row(e), row(e) < base + n)), hyp, [n, base, e]),
      prove(KERNEL, "layout: compressed rows never overlap window rows [0, base)",
            row(e) != x, hyp + [0 <= x, x < base], [n, base, e, x]),
      prove(KERNEL, "layout: compressed_row is injective",
            z3.Implies(row(e1) == row(e2), e1 == e2), hyp + [in_domain(e1), in_domain(e2)], [n, base, e1, e2]),
      prove(KERNEL, "layout: visible window rows of t < base lie in [0, base)",
            z3.Implies(f["window_visible"](t, s, window, seg_t, seg_s), z3.And(0 <= s, s < base)),
            [base >= 0, window >= 1, t >= 0, t < base], [t, base, window, s]),
      prove(KERNEL, "layout: topk_slot keeps a pick iff visible, else −1",
            f["topk_slot"](e, v) == z3.If(v, e, -1), hyp, [e, v]),
      prove(KERNEL, "layout: every gathered compressed row is an entry visible to t",
            z3.Implies(gathered >= 0, z3.And(gathered == base + e, e >= 0, (e + 1) * r <= t + 1)),
            hyp + [t >= 0, r >= 1], [n, base, e, t, r]),
  ]


def properties(**overrides) -> list[Result]:
  f = _fns(overrides)
  return window_properties(f) + ring_properties(f) + entry_properties(f) + layout_properties(f)
