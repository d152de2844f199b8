"""Whole-model properties that hold whatever the weights: causality, locality of the window, use of a
compressed entry only once its block is complete, segment isolation of packed documents, and the
gradient contract (every nnx.Param is trained; the indexer only by its KL loss).

Logits at t may depend on token p ≤ t only; for a one-layer model (attention is the only op that mixes
positions) exactly on p ∈ (t−W, t] through the window, or on p's compression block once it is
complete: (p//r + 1)·r ≤ t + 1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from tests.helpers import forward_fn, tiny_model

S = 200  # past the window (16), 50 CSA entries (top-k 8), one complete HCA block
TOL = 1e-5


def random_ids(rng, shape, vocab=256):
  return rng.integers(0, vocab, shape).astype(np.int32)


def perturbed_after(ids, p, rng, vocab=256):
  """A copy of ids [S] with every token after position p replaced by a different one."""
  out = ids.copy()
  out[p + 1:] = (ids[p + 1:] + rng.integers(1, vocab, len(ids) - p - 1)) % vocab
  return out


def replaced_at(ids, p, rng, vocab=256):
  out = ids.copy()
  out[p] = (ids[p] + rng.integers(1, vocab)) % vocab
  return out


def changed_positions(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """[S, V] logits of two runs -> bool [S]: where they differ beyond float noise."""
  return np.abs(a - b).max(-1) > TOL * max(1.0, np.abs(a).max())


@pytest.fixture(scope="module")
def model():
  return tiny_model(0)


@pytest.fixture(scope="module")
def forward(model):
  return forward_fn(model, attention_mode="sparse")


# --- causality ----------------------------------------------------------------------------------

def check_causality(forward, seq, cut_points, mode):
  rng = np.random.default_rng(1)
  base = random_ids(rng, (seq,))
  for p in cut_points:
    out = forward(jnp.asarray(np.stack([base, perturbed_after(base, p, rng)])))
    logits, mtp = np.asarray(out.logits), np.asarray(out.mtp_logits)
    # Logits ≤ p see tokens ≤ p only; mtp_logits[t] also reads token t+1, so mtp_logits < p.
    assert not changed_positions(logits[0, :p + 1], logits[1, :p + 1]).any(), (mode, p)
    assert not changed_positions(mtp[0, :p], mtp[1, :p]).any(), (mode, p)
    # ... and the perturbation is visible right after (the test can fail).
    assert changed_positions(logits[0, p + 1:], logits[1, p + 1:]).all(), (mode, p)
    assert changed_positions(mtp[0, p:], mtp[1, p:]).all(), (mode, p)


def test_causality_sparse(forward):
  """Full tiny model; cut before and after the first HCA block completes (t = 127)."""
  check_causality(forward, S, (70, 150), "sparse")


def test_causality_dense():
  """Dense CSA attends every visible entry: a CSA layer plus the MTP layer."""
  model = tiny_model(12, num_hidden_layers=1, compress_ratios=(4, 0))
  check_causality(forward_fn(model, attention_mode="dense"), 64, (21, 40), "dense")


# --- window locality and block completeness (one-layer models) ----------------------------------

def dependence_pattern(fwd, seq, positions, seed):
  """For each p in positions: bool [seq], whether logits at t change when token p changes."""
  rng = np.random.default_rng(seed)
  base = random_ids(rng, (seq,))
  rows = [base] + [replaced_at(base, p, rng) for p in positions]
  logits = np.asarray(fwd(jnp.asarray(np.stack(rows))).logits)
  return [changed_positions(logits[0], logits[i + 1]) for i in range(len(positions))]


def expected_pattern(seq, p, window, ratio=0):
  t = np.arange(seq)
  affected = (t >= p) & (t <= p + window - 1)
  if ratio:
    affected |= t + 1 >= (p // ratio + 1) * ratio
  return affected


def test_window_only_layer_sees_exactly_the_window():
  window, seq = 16, 48
  model = tiny_model(2, num_hidden_layers=1, compress_ratios=(0, 0), sliding_window=window)
  fwd = forward_fn(model, with_mtp=False)
  positions = (0, 20, 40)
  for p, got in zip(positions, dependence_pattern(fwd, seq, positions, seed=3)):
    np.testing.assert_array_equal(got, expected_pattern(seq, p, window), err_msg=f"token {p}")
  # In words: at t = 40 token t−W = 24 is invisible and token t−W+1 = 25 is seen.
  assert 40 not in range(24, 24 + window) and 40 in range(25, 25 + window)


def test_hca_entry_used_only_once_its_block_is_complete():
  window, ratio, seq = 4, 128, 300
  model = tiny_model(4, num_hidden_layers=1, compress_ratios=(ratio, 0), sliding_window=window)
  fwd = forward_fn(model, with_mtp=False)
  positions = (5, 130, 255)
  for p, got in zip(positions, dependence_pattern(fwd, seq, positions, seed=5)):
    np.testing.assert_array_equal(got, expected_pattern(seq, p, window, ratio), err_msg=f"token {p}")


@pytest.mark.parametrize("mode", ["dense", "sparse"])
def test_csa_entry_used_only_once_its_block_is_complete(mode):
  # Window 1 (the query itself), so that the window never covers the rest of the block.
  window, ratio, seq = 1, 4, 64
  model = tiny_model(6, num_hidden_layers=1, compress_ratios=(ratio, 0), sliding_window=window)
  fwd = forward_fn(model, with_mtp=False, attention_mode=mode)
  positions = (20, 41, 62)
  for p, got in zip(positions, dependence_pattern(fwd, seq, positions, seed=7)):
    expected = expected_pattern(seq, p, window, ratio)
    if mode == "dense":
      np.testing.assert_array_equal(got, expected, err_msg=f"token {p}")
    else:  # top-k may pass over the changed entries, but never reads an incomplete block
      assert not (got & ~expected).any(), f"token {p}: changes outside {np.flatnonzero(expected)}"
      assert got[p] and got[(p // ratio + 1) * ratio - 1:].any()


# --- segment isolation --------------------------------------------------------------------------

def test_packed_documents_match_separate_runs(forward):
  """Doc A at 0..199, padding 200..255 (segment 0), doc B at 256..455; positions restart per doc."""
  rng = np.random.default_rng(8)
  docs = random_ids(rng, (2, S))
  start_b, total = 256, 256 + S
  ids = np.zeros((1, total), np.int32)
  ids[0, :S], ids[0, start_b:] = docs[0], docs[1]
  ids[0, S:start_b] = random_ids(rng, (start_b - S,))
  segment_ids = np.zeros((1, total), np.int32)
  segment_ids[0, :S], segment_ids[0, start_b:] = 1, 2
  positions = np.zeros((1, total), np.int32)
  positions[0, :S], positions[0, start_b:] = np.arange(S), np.arange(S)

  fwd = forward
  packed = fwd(jnp.asarray(ids), segment_ids=jnp.asarray(segment_ids), positions=jnp.asarray(positions))
  alone = fwd(jnp.asarray(docs))
  logits, mtp = np.asarray(packed.logits)[0], np.asarray(packed.mtp_logits)[0]
  ref, ref_mtp = np.asarray(alone.logits), np.asarray(alone.mtp_logits)
  scale = np.abs(ref).max()
  for doc, start in ((0, 0), (1, start_b)):
    np.testing.assert_allclose(logits[start:start + S], ref[doc], atol=TOL * scale, err_msg=f"doc {doc}")
    # mtp_logits[t] combines t with t+1: compare where both are in the document.
    np.testing.assert_allclose(mtp[start:start + S - 1], ref_mtp[doc], atol=TOL * scale, err_msg=f"mtp doc {doc}")


# --- gradients ----------------------------------------------------------------------------------

def grads_by_loss(model, ids, mode):
  """Gradients of (CE + MTP CE + balance losses) and of the indexer KL loss alone w.r.t. every nnx.Param.

  One forward pass, pulled back twice (ragged_dot cannot be vmapped for a batched jacrev).
  """
  graphdef, params, rest = nnx.split(model, nnx.Param, ...)

  def losses(params):
    out = nnx.merge(graphdef, params, rest)(ids, attention_mode=mode)
    ce = optax.softmax_cross_entropy_with_integer_labels(out.logits[:, :-1], ids[:, 1:]).mean()
    mtp_ce = optax.softmax_cross_entropy_with_integer_labels(out.mtp_logits[:, :-1], ids[:, 2:]).mean()
    main = ce + mtp_ce + out.aux["balance_loss"] + out.aux["mtp_balance_loss"]
    loads = jnp.concatenate([out.aux["expert_load"], out.aux["mtp_expert_load"]])
    return jnp.stack([main, out.aux["indexer_loss"]]), loads

  @jax.jit
  def run(params):
    values, pullback, loads = jax.vjp(losses, params, has_aux=True)
    return pullback(jnp.array([1.0, 0.0]))[0], pullback(jnp.array([0.0, 1.0]))[0], values, loads

  main, index, values, loads = run(params)
  flat = lambda tree: {".".join(map(str, k)): np.asarray(v[...]) for k, v in nnx.to_flat_state(tree)}
  return flat(main), flat(index), float(values[1]), np.asarray(loads)


def check_gradients(model, ids, mode):
  main, index, index_loss, loads = grads_by_loss(model, ids, mode)
  assert index_loss > 0
  names = sorted(main)
  assert not [n for n in names if n.endswith("gate.bias") or "tid2eid" in n], "non-trainable state is a Param"
  indexer_names = [n for n in names if "indexer" in n]
  assert indexer_names and len(indexer_names) < len(names)
  for name in names:
    g_main, g_index = main[name], index[name]
    assert np.all(np.isfinite(g_main)) and np.all(np.isfinite(g_index)), name
    trained, untouched = (g_index, g_main) if "indexer" in name else (g_main, g_index)
    # The indexer sees stop-gradient inputs and its top-k is not differentiated: the split is exact.
    np.testing.assert_array_equal(untouched, 0.0, err_msg=f"{name}: gradient from the wrong loss")
    assert np.abs(trained).max() > 0, f"{name}: zero gradient"
    if ".experts." in name:  # stacked experts: exactly the experts some token was routed to are trained
      layer = int(name.split(".")[1])
      per_expert = np.abs(trained).reshape(trained.shape[0], -1).max(-1)
      np.testing.assert_array_equal(per_expert > 0, loads[layer if name.startswith("layers") else -1] > 0,
                                    err_msg=name)


def test_every_param_gets_gradient_and_indexer_only_from_its_loss(model):
  """Full tiny model (every layer kind), sparse attention."""
  check_gradients(model, jnp.asarray(random_ids(np.random.default_rng(9), (1, S))), "sparse")


def test_gradients_dense_attention():
  """Dense CSA (warm-up mode) on a CSA-only model plus the MTP layer."""
  model = tiny_model(10, num_hidden_layers=1, compress_ratios=(4, 0))
  check_gradients(model, jnp.asarray(random_ids(np.random.default_rng(11), (1, 64))), "dense")
