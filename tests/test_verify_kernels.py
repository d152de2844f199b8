"""Z3 verification of the Pallas kernels: everything proves, and seeded bugs yield counterexamples."""

from __future__ import annotations

import pytest

from pallas_kernels import verify
from pallas_kernels.verify import indexer, mhc, sparse_attention


def test_every_property_is_proved(capsys):
  assert verify.main() == 0
  out = capsys.readouterr().out
  assert "FAILED" not in out
  for prop in ("window: valid slot rows satisfy", "mask: entry i visible iff", "no query sees a future token",
               "slot mask: valid iff idx != -1", "every block produced", "written back at one sequential step"):
    assert prop in out


def failures(results):
  return {r.prop: r.detail for r in results if not r.proved}


MUTATIONS = [
    # off-by-one window: slots cover t−W .. t−1 instead of t−W+1 .. t
    (sparse_attention, dict(window_row=lambda t, w, window: t - window + w), "window: every s with t−W < s ≤ t"),
    # `<=` for `<` in the compressed visibility rule
    (indexer, dict(entry_visible=lambda t, i, r: i <= (t + 1) / r), "mask: entry i visible iff"),
    (indexer, dict(entry_visible=lambda t, i, r: i <= (t + 1) / r), "mask: no query sees a future token"),
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
]


@pytest.mark.parametrize("module, overrides, prop", MUTATIONS, ids=[m[2] for m in MUTATIONS])
def test_mutation_yields_counterexample(module, overrides, prop):
  failed = failures(module.properties(**overrides))
  caught = [name for name in failed if name.startswith(prop)]
  assert caught, f"mutation {sorted(overrides)} was not caught by {prop!r}; failures: {sorted(failed)}"
  assert all(failed[name].startswith("counterexample:") for name in caught)
