"""The index rules that `dsv4 verify-kernels` proves are the ones the model runs: a seeded mutation of the
window rule in `pallas_kernels.index_rules` changes the model's forward (and so breaks decode = forward),
and makes the verifier print a counterexample."""

import ast
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from helpers import forward_fn, tiny_model
from dsv4_jax.inference import Engine
from pallas_kernels import index_rules, verify
from pallas_kernels.intmath import land

KW = dict(num_hidden_layers=1, compress_ratios=(0, 0), num_hash_layers=0, sliding_window=8)


def off_by_one_window(t, s, window, seg_t, seg_s):
  """The seeded bug: the window reaches one row too far back (t − W ≤ s instead of t − W < s)."""
  return land(s >= 0, s >= t - window, s <= t, seg_s == seg_t)


def run_model(model, seq):
  """(training-forward logits [S, V], logits of decoding the last 4 tokens after a prefill) of one row."""
  full = np.asarray(forward_fn(model, with_mtp=False)(jnp.asarray(seq)).logits)[0]
  engine = Engine(model)
  _, cache = engine.prefill(seq[:, :-4], seq.shape[1])
  decoded = []
  for t in range(seq.shape[1] - 4, seq.shape[1]):
    logits, cache = engine.decode(seq[:, t:t + 1], cache)
    decoded.append(np.asarray(logits)[0, 0])
  return full, np.stack(decoded)


def test_mutated_window_rule_changes_the_model_and_is_caught(monkeypatch, capsys):
  model = tiny_model(seed=2, **KW)
  seq = np.random.default_rng(0).integers(0, 256, (1, 24)).astype(np.int32)
  full, decoded = run_model(model, seq)
  scale = np.abs(full).max()
  np.testing.assert_allclose(decoded, full[-4:], rtol=0, atol=1e-5 * scale)

  monkeypatch.setattr(index_rules, "window_visible", off_by_one_window)
  jax.clear_caches()  # the engine's jitted prefill / decode were traced with the correct rule
  mutated_full, mutated_decoded = run_model(model, seq)
  changed = np.abs(mutated_full - full).max(-1) > 1e-4 * scale
  assert not changed[:8].any() and changed[8:].all()  # rows t ≥ W now also see row t − W
  # Decoding reads a ring of W rows, which cannot hold row t − W: the mutated model's decode no longer
  # equals its own forward (what the decode-vs-forward tests would report).
  assert np.abs(mutated_decoded - mutated_full[-4:]).max() > 1e-4 * scale

  assert verify.main() == 1
  out = capsys.readouterr().out
  failed = [line for line in out.splitlines() if "FAILED" in line and line.startswith("index_rules")]
  assert failed and all("counterexample:" in line for line in failed), out[-2000:]
  assert any("window" in line for line in failed)
  jax.clear_caches()


def test_no_module_binds_a_rule_by_name():
  """Rules are looked up as `index_rules.<name>` when called; `from ...index_rules import <name>` would
  bind a copy that neither a patch nor (for a renamed binding) the proofs follow."""
  root = pathlib.Path(__file__).resolve().parents[1]
  offenders = []
  for path in list((root / "dsv4_jax").rglob("*.py")) + list((root / "pallas_kernels").rglob("*.py")):
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.ImportFrom) and (node.module or "").endswith("index_rules"):
        offenders.append(f"{path.relative_to(root)}:{node.lineno}")
  assert not offenders, offenders
