"""Inference: cached decoding equals the full forward, batching, sampling, `dsv4 generate`, cache size."""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import forward_fn, tiny_config, tiny_model

from dsv4_jax.inference import Engine, decode_compilations, init_cache
from dsv4_jax.ops.kv_storage import decode_rows, encode_rows
from dsv4_jax.inference.cache_size import load_config, report
from dsv4_jax.inference.sampling import generate, sample
from dsv4_jax.ops.quantization import fake_quant_fp8

# Every layer kind: window-only (hash-routed layer 0), CSA (indexer top-8 of up to 70 entries), HCA.
RATIOS = dict(num_hidden_layers=3, compress_ratios=(0, 4, 128, 0))
PROMPT_LENGTHS = (230, 100)  # row 0 decodes positions 230..279 (crosses 255), row 1 100..149 (crosses 127)
NEW_TOKENS = 50
TOTAL = max(PROMPT_LENGTHS) + NEW_TOKENS
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def model():
  return tiny_model(3, **RATIOS)


@pytest.fixture(scope="module")
def engine(model):
  return Engine(model)


@pytest.fixture(scope="module")
def sequences():
  return np.random.default_rng(0).integers(0, 256, (2, TOTAL)).astype(np.int32)


def _padded_prompts(sequences):
  ids = np.zeros((2, max(PROMPT_LENGTHS)), np.int32)
  for row, length in enumerate(PROMPT_LENGTHS):
    ids[row, :length] = sequences[row, :length]
  return ids


def test_cache_layout():
  cfg = tiny_config(**RATIOS)
  cache = jax.eval_shape(lambda: init_cache(cfg, 3, 256))
  d, di, w = cfg.head_dim, cfg.index_head_dim, cfg.sliding_window
  window, csa, hca = cache.layers
  assert window.window["rows"].shape == (3, w, d) and window.compressor is None and window.indexer is None
  assert csa.compressor.entries["rows"].shape == (3, 64, d)
  assert csa.compressor.block_kv.shape == (3, 4, 2 * d) and csa.compressor.prev_kv.shape == (3, 4, d)
  assert csa.indexer.entries["rows"].shape == (3, 64, di) and csa.indexer.prev_score.shape == (3, 4, di)
  assert hca.compressor.entries["rows"].shape == (3, 2, d) and hca.compressor.block_kv.shape == (3, 128, d)
  assert hca.compressor.prev_kv is None and hca.indexer is None
  assert cache.lengths.shape == (3,)


@pytest.mark.parametrize("qat", [False, True], ids=["fp32", "qat"])
def test_decode_matches_full_forward(model, engine, sequences, qat):
  """Batched prompts of lengths 230 and 100, then 50 teacher-forced decode steps per row, against the
  sparse-mode full forward of each row's whole sequence (causal, so one [2, 280] forward serves both).
  With qat the model simulates the released FP8 KV / FP4 indexer quantisation on both paths."""
  if qat:
    model = tiny_model(4, qat=True, head_dim=72, index_head_dim=32, **RATIOS)
    engine = Engine(model)
  reference = np.asarray(forward_fn(model, attention_mode="sparse", with_indexer_loss=False, with_mtp=False)(
      jnp.asarray(sequences)).logits)
  logits, cache = engine.prefill(_padded_prompts(sequences), TOTAL, lengths=PROMPT_LENGTHS)
  logits = np.asarray(logits)
  for row, length in enumerate(PROMPT_LENGTHS):
    ref = reference[row, :length]
    assert np.abs(logits[row, :length] - ref).max() / np.abs(ref).max() <= 1e-5

  compiled_before = decode_compilations()
  errors = np.zeros((2, NEW_TOKENS))
  for step in range(NEW_TOKENS):
    tokens = np.array([[sequences[row, length + step]] for row, length in enumerate(PROMPT_LENGTHS)])
    step_logits, cache = engine.decode(tokens, cache)
    step_logits = np.asarray(step_logits)
    assert step_logits.shape == (2, 1, model.cfg.vocab_size)
    for row, length in enumerate(PROMPT_LENGTHS):
      ref = reference[row, length + step]
      errors[row, step] = np.abs(step_logits[row, 0] - ref).max() / np.abs(ref).max()
  print(f"decode vs forward ({'qat' if qat else 'fp32'}): max relative error {errors.max():.2e}, "
        f"median {np.median(errors):.2e}")
  worst = np.unravel_index(errors.argmax(), errors.shape)
  assert errors.max() <= 1e-5, f"worst relative error {errors.max():.2e} at row/step {worst}"
  assert decode_compilations() - compiled_before <= 1  # one program for all 50 steps
  np.testing.assert_array_equal(np.asarray(cache.lengths), np.array(PROMPT_LENGTHS) + NEW_TOKENS)


def test_batched_generation_equals_each_prompt_alone(engine, sequences):
  prompts = [sequences[row, :length] for row, length in enumerate(PROMPT_LENGTHS)]
  batched = generate(engine, prompts, max_new_tokens=NEW_TOKENS)
  for row, prompt in enumerate(prompts):
    # Alone: a batch of one (padded to a shared width so both prompts reuse one compilation).
    ids = np.zeros((1, max(PROMPT_LENGTHS)), np.int32)
    ids[0, :len(prompt)] = prompt
    logits, cache = engine.prefill(ids, TOTAL, lengths=[len(prompt)])
    token = int(np.argmax(np.asarray(logits)[0, len(prompt) - 1]))
    alone = [token]
    for _ in range(NEW_TOKENS - 1):
      logits, cache = engine.decode(np.array([[token]]), cache)
      token = int(np.argmax(np.asarray(logits)[0, 0]))
      alone.append(token)
    assert batched[row] == alone, f"row {row}"


def test_stop_tokens(engine, sequences):
  prompts = [sequences[row, :length] for row, length in enumerate(PROMPT_LENGTHS)]
  free = generate(engine, prompts, max_new_tokens=NEW_TOKENS)
  stop = free[0][2]
  stopped = generate(engine, prompts, max_new_tokens=NEW_TOKENS, stop_tokens=[stop])
  for row in range(2):
    expected = free[row][:free[row].index(stop) + 1] if stop in free[row] else free[row]
    assert stopped[row] == expected


# --- sampling ------------------------------------------------------------------------------------

def _logits(rows=4, vocab=50, seed=0):
  return jnp.asarray(np.random.default_rng(seed).normal(size=(rows, vocab)) * 2.0, jnp.float32)


def test_sampling_degenerate_cases_are_greedy():
  logits = _logits()
  greedy = np.argmax(np.asarray(logits), axis=-1)
  for seed in range(5):
    key = jax.random.PRNGKey(seed)
    np.testing.assert_array_equal(sample(logits, key, temperature=0.0), greedy)
    np.testing.assert_array_equal(sample(logits, key, temperature=1.5, top_k=1), greedy)
    np.testing.assert_array_equal(sample(logits, key, temperature=1.5, top_p=1e-6), greedy)


def test_sampling_seed_determinism():
  logits = _logits(rows=64)
  a = sample(logits, jax.random.PRNGKey(7), temperature=1.0)
  b = sample(logits, jax.random.PRNGKey(7), temperature=1.0)
  c = sample(logits, jax.random.PRNGKey(8), temperature=1.0)
  np.testing.assert_array_equal(a, b)
  assert np.any(np.asarray(a) != np.asarray(c))


def _frequencies(logits_row, n, **kw):
  logits = jnp.broadcast_to(jnp.asarray(logits_row, jnp.float32), (n, len(logits_row)))
  tokens = np.asarray(sample(logits, jax.random.PRNGKey(0), **kw))
  return np.bincount(tokens, minlength=len(logits_row)) / n


def _check_distribution(freq, probs, n):
  sigma = np.sqrt(probs * (1 - probs) / n)
  assert np.all(np.abs(freq - probs) <= 5 * sigma + 1e-9), (freq, probs)


def test_temperature_top_k_top_p_distributions():
  """Empirical frequencies against closed-form distributions (20k draws, 5σ bands)."""
  n = 20000
  logits = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04]))
  for temperature in (0.5, 1.0, 2.0):
    probs = np.exp(logits / temperature) / np.sum(np.exp(logits / temperature))
    _check_distribution(_frequencies(logits, n, temperature=temperature), probs, n)
  # top-k 3: renormalised over the three most likely tokens.
  probs = np.array([0.4, 0.25, 0.15, 0, 0, 0]) / 0.8
  _check_distribution(_frequencies(logits, n, temperature=1.0, top_k=3), probs, n)
  # top-p 0.6: the smallest prefix reaching 0.6 is {0.4, 0.25} (0.4 alone falls short).
  probs = np.array([0.4, 0.25, 0, 0, 0, 0]) / 0.65
  _check_distribution(_frequencies(logits, n, temperature=1.0, top_p=0.6), probs, n)
  # Low temperature concentrates on the argmax; high temperature flattens.
  assert _frequencies(logits, 2000, temperature=0.05)[0] > 0.99
  assert _frequencies(logits, 2000, temperature=50.0)[0] < 0.25


# --- storage, generate CLI, cache size ------------------------------------------------------------

def test_mixed_storage_round_trip():
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(size=(2, 5, 512)) * 3, jnp.float32)
  stored = encode_rows(x, "mixed", 64)
  assert stored["nope"].dtype == jnp.float8_e4m3fn and stored["nope"].shape == (2, 5, 448)
  assert stored["scale"].shape == (2, 5, 7) and stored["rope"].dtype == jnp.bfloat16
  back = np.asarray(decode_rows(stored, jnp.float32))
  # Values already on the released FP8 grid (the QAT model's KV) come back exactly; RoPE dims as BF16.
  on_grid = jnp.concatenate([fake_quant_fp8(x[..., :448]), x[..., 448:].astype(jnp.bfloat16).astype(jnp.float32)],
                            axis=-1)
  np.testing.assert_array_equal(np.asarray(decode_rows(encode_rows(on_grid, "mixed", 64), jnp.float32)),
                                np.asarray(on_grid))
  # Otherwise within FP8 e4m3 rounding: half an ulp (2^-4 relative) of each block's power-of-two scale.
  blocks = np.asarray(x[..., :448]).reshape(2, 5, 7, 64)
  scale = 2.0 ** np.ceil(np.log2(np.abs(blocks).max(-1, keepdims=True) / 448))
  err = np.abs(back[..., :448].reshape(blocks.shape) - blocks)
  assert np.all(err <= np.maximum(np.abs(blocks) * 2 ** -4, scale * 2 ** -9) + 1e-7)


def test_generate_cli_end_to_end(tmp_path):
  from flax import nnx

  from dsv4_jax.convert import save_checkpoint
  from dsv4_jax.layers.model import Transformer

  ckpt = tmp_path / "ckpt"
  save_checkpoint(Transformer(tiny_config(num_hidden_layers=1, compress_ratios=(4, 0)), rngs=nnx.Rngs(0)),
                  ckpt)
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [sys.executable, "-m", "dsv4_jax.cli", "generate", "--checkpoint", str(ckpt), "--prompt", "Hello",
       "--max_new_tokens", "6", "--temperature", "0.8", "--top_p", "0.9", "--seed", "1"],
      capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.startswith("Hello")
  assert "6 tokens" in proc.stderr or "tokens in" in proc.stderr


def test_cache_size_flash_1m_matches_analytic():
  """Flash at 2^20 tokens: the eval_shape'd cache pytree against the derivation in docs/cache_size.md."""
  cfg = load_config("flash")
  ratios = cfg.compress_ratios[:cfg.num_hidden_layers]
  csa, hca = ratios.count(4), ratios.count(128)
  assert (csa, hca, cfg.num_hidden_layers) == (21, 20, 43)
  v32 = 61 * (576 * 2 + 128)  # 78,080 bytes per token
  gqa8 = 43 * 2 * 8 * 128 * 2
  analytic = {
      "bf16": csa * (512 * 2 + 128 * 2) / 4 + hca * 512 * 2 / 128,  # 6,880 B/token
      "mixed": csa * ((448 + 7 + 128) + (128 + 2)) / 4 + hca * (448 + 7 + 128) / 128,  # 3,834.3 B/token
  }
  for storage, per_token in analytic.items():
    rep = report(cfg, 1 << 20, storage)
    assert abs(rep["ratio_v32"] - per_token / v32) <= 0.02
    assert abs(rep["ratio_gqa8"] - per_token / gqa8) <= 0.02
    assert rep["v4_per_token"] >= per_token  # the pytree adds the window and block states on top
  proc = subprocess.run([sys.executable, "-m", "dsv4_jax.cli", "cache-size", "--config", "flash", "--context",
                         str(1 << 20), "--storage", "mixed"], capture_output=True, text=True, timeout=120,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, cwd=REPO)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "V3.2" in proc.stdout and "GQA-8" in proc.stdout
