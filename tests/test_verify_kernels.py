"""Z3 verification of the Pallas kernels: everything proves, and seeded bugs yield counterexamples."""

from __future__ import annotations

import pytest

from pallas_kernels import index_rules as rules
from pallas_kernels import verify
from pallas_kernels.intmath import land, mod, select
from pallas_kernels.verify import index_rules, indexer, mhc, sparse_attention
from pallas_kernels.verify.gpu import common as gpu_tiles
from pallas_kernels.verify.gpu import indexer as gpu_indexer
from pallas_kernels.verify.gpu import mhc as gpu_mhc
from pallas_kernels.verify.gpu import sparse_attention as gpu_sparse_attention


def test_every_property_is_proved(capsys):
  assert verify.main() == 0
  out = capsys.readouterr().out
  assert "FAILED" not in out
  for prop in ("window: visible ⇒ s ≥ 0, t−W < s ≤ t", "window: segment isolation", "ring: slot holds a position",
               "entries: entry i visible at t iff", "layout: compressed rows never overlap window rows",
               "slot mask: valid iff idx != -1", "every block produced", "written back at one sequential step",
               "tile walk: tiles are disjoint", "gather / atomic add: the row of an idx value lies in [0, N)",
               "causal skip: a dead entry tile holds no entry visible", "dz writes: no column is written twice"):
    assert prop in out


def failures(results):
  return {r.prop: r.detail for r in results if not r.proved}


MUTATIONS = [
    # off-by-one window: row t−W is visible too
    (index_rules, dict(window_visible=lambda t, s, window, seg_t, seg_s: land(s >= 0, s > t - window - 1, s <= t,
                                                                              seg_s == seg_t)),
     "window: visible ⇒ s ≥ 0, t−W < s ≤ t"),
    # off-by-one window slots: t−W .. t−1 instead of t−W+1 .. t
    (index_rules, dict(window_row=lambda t, w, window: t - window + w), "window: slot w reads row t−W+1+w"),
    (index_rules, dict(window_row=lambda t, w, window: t - window + w), "window: every s with max(0, t−W+1) ≤ s ≤ t is the row"),
    # the window ignores document boundaries
    (index_rules, dict(window_visible=lambda t, s, window, seg_t, seg_s: land(s >= 0, s > t - window, s <= t)),
     "window: segment isolation"),
    # `<=` for `<` in the compressed visibility rule
    (index_rules, dict(entry_visible=lambda t, i, r: i <= (t + 1) / r), "entries: entry i visible at t iff"),
    (index_rules, dict(entry_visible=lambda t, i, r: i <= (t + 1) / r), "entries: visible ⇒ no future token"),
    # completion one token early
    (index_rules, dict(entry_completed_by=lambda t, r: mod(t + 2, r) == 0), "entries: an entry is visible at its completing"),
    # ring buffer off by one: the slot read is one behind the slot written
    (index_rules, dict(ring_position=lambda t, slot, window: t - mod(t - slot, window) - 1),
     "ring: slot holds a position of that slot"),
    (index_rules, dict(ring_slot=lambda p, window: mod(p + 1, window)), "ring: every p with max(0, t−W+1) ≤ p ≤ t"),
    # compressed rows start one row early, overlapping the last window row
    (index_rules, dict(compressed_row=lambda e, base: select(e >= 0, base + e - 1, -1)),
     "layout: compressed rows never overlap window rows"),
    # invisible top-k picks kept
    (index_rules, dict(topk_slot=lambda e, visible: e), "layout: every gathered compressed row is an entry visible"),
    # block index maps that overrun the last block
    (sparse_attention, dict(drows_index_map=lambda bi, si, kt, idx: (bi, si, kt + 1, 0)), "drows: blocks in bounds"),
    (indexer, dict(score_index_map=lambda bi, ci, ni: (bi, ci, ni + 1)), "scores: blocks in bounds"),
    (mhc, dict(token_index_map=lambda ti: (ti + 1, 0)), "y: blocks in bounds"),
    # −1 slots treated as valid (dereferenced)
    (sparse_attention, dict(slot_valid=lambda v: v >= -1), "slot mask: valid iff idx != -1"),
    # reading the slot one past the tile
    (sparse_attention, dict(kv_row_index_map=lambda j, tile: lambda bi, si, kt, idx: (bi, idx[bi, si, kt * tile + j + 1], 0)),
     "kv row operand j: index map's scalar reads in bounds"),
    # an accumulator written back at every step instead of once
    (sparse_attention, dict(is_last_tile=lambda kt, n: kt >= 0), "o: written back at one sequential step"),
    # two grid points writing the same output block
    (indexer, dict(score_index_map=lambda bi, ci, ni: (bi, ci, 0)), "scores: each block written by one grid point"),
    # overlapping streams
    (mhc, dict(stream_cols=lambda i, d: (i * d, (i + 1) * d + 1)), "streams are disjoint"),
    # GPU kernels: in-kernel tile walks that start one element late, or stop one tile early
    (gpu_tiles, dict(tile_start=lambda i, tile: i * tile + 1), "tile walk: every tile [start, start + T) lies in"),
    (gpu_tiles, dict(tile_count=lambda p, tile: p / tile - 1), "tile walk: tile_count(padded(n)) · T = padded(n)"),
    (gpu_sparse_attention, dict(tile_count=lambda p, tile: p / tile - 1), "slot tiles: tile_count(Kp) tiles"),
    # GPU sparse attention: −1 slots gathered (and scatter-added) unclamped; every head block writing block 0
    (gpu_sparse_attention, dict(safe_row=lambda v: v), "gather / atomic add: the row of an idx value lies in"),
    (gpu_sparse_attention, dict(head_index_map=lambda bi, si, hg: (bi, si, 0, 0)), "o: each block written by one"),
    (gpu_sparse_attention, dict(rows_index_map=lambda bi, si, hg: (bi, 1, 0)), "kv: blocks in bounds"),
    # GPU indexer: a causal skip that tests the tile's last entry instead of its first skips visible entries
    (gpu_indexer, dict(tile_is_live=lambda t, ni, bn, r: rules.entry_visible(t, ni * bn + bn - 1, r)),
     "causal skip: a dead entry tile holds no entry visible"),
    (gpu_indexer, dict(dq_g_map=lambda bi, ci, h: (bi, ci, 1)), "g (cotangent): blocks in bounds"),
    (gpu_indexer, dict(entry=lambda ni, lane, bn: ni * bn + lane + 1), "mask: lane l of entry tile ni is the entry"),
    # GPU mHC: stream blocks past the last tile; post gates overlapping the pre gates in dz
    (gpu_mhc, dict(stream_index_map=lambda ti: (ti + 1, 0, 0)), "x: blocks in bounds"),
    (gpu_mhc, dict(post_cols=lambda n: (n - 1, 2 * n - 1)), "dz writes: no column is written twice"),
]


@pytest.mark.parametrize("module, overrides, prop", MUTATIONS, ids=[m[2] for m in MUTATIONS])
def test_mutation_yields_counterexample(module, overrides, prop):
  failed = failures(module.properties(**overrides))
  caught = [name for name in failed if name.startswith(prop)]
  assert caught, f"mutation {sorted(overrides)} was not caught by {prop!r}; failures: {sorted(failed)}"
  assert all(failed[name].startswith("counterexample:") for name in caught)


def test_monkeypatched_rule_is_what_is_proved(monkeypatch, capsys):
  """verify looks rules up on pallas_kernels.index_rules at proof time: a patched rule is the one proved."""
  off_by_one = lambda t, s, window, seg_t, seg_s: land(s >= 0, s > t - window - 1, s <= t, seg_s == seg_t)
  monkeypatch.setattr(rules, "window_visible", off_by_one)
  assert verify.main() == 1
  failed = [line for line in capsys.readouterr().out.splitlines() if "FAILED  counterexample:" in line]
  assert any("window: visible ⇒ s ≥ 0, t−W < s ≤ t" in line for line in failed), failed
  assert all(line.split()[0] == "index_rules" for line in failed), failed


@pytest.mark.parametrize("name", index_rules.NAMES)
def test_rules_agree_on_python_ints_and_jnp_arrays(name):
  """The proved functions run elementwise on traced int32 arrays exactly as on Python ints (incl. t − 1 = −1)."""
  import jax
  import jax.numpy as jnp
  import numpy as np

  grid = np.stack(np.meshgrid(np.arange(-1, 9), np.arange(-1, 9), np.arange(1, 5), indexing="ij"), -1).reshape(-1, 3)
  args = {  # (python call, array call) on each row (a, b, c) of the grid
      "window_row": lambda a, b, c: (a, b, c), "window_visible": lambda a, b, c: (a, b, c, a % 2, b % 2),
      "ring_slot": lambda a, b, c: (a, c), "ring_position": lambda a, b, c: (a, b, c),
      "entry_visible": lambda a, b, c: (a, b, c), "entry_first_token": lambda a, b, c: (a, c),
      "entry_completed_by": lambda a, b, c: (a, c), "entry_of_token": lambda a, b, c: (a, c),
      "block_slot": lambda a, b, c: (a, c), "compressed_row": lambda a, b, c: (a, c),
      "topk_slot": lambda a, b, c: (a, b > 3),
  }[name]
  fn = getattr(rules, name)
  want = np.array([fn(*args(*map(int, row))) for row in grid]).astype(np.int64)
  cols = [jnp.asarray(grid[:, k], jnp.int32) for k in range(3)]
  got = np.asarray(jax.jit(lambda a, b, c: jnp.asarray(fn(*args(a, b, c))).astype(jnp.int32))(*cols))
  np.testing.assert_array_equal(got, want)
