"""Token sampling and the generation loop.

Sampling from logits ℓ [B, V]:
  temperature = 0  greedy: argmax ℓ
  otherwise        ℓ / temperature, then
                   top-k (k > 0): keep the k largest logits (ties with the k-th kept too),
                   top-p (p < 1): keep the smallest prefix of tokens sorted by probability whose mass
                                  reaches p (the most likely token always stays),
                   and draw from the softmax of what is kept.
`generate` prefills right-padded prompts of different lengths together, then decodes one token per
row per step at each row's own position, stopping a row at a stop token or after max_new_tokens.
"""

from __future__ import annotations

import functools
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.inference.engine import Engine


def filter_logits(logits: jax.Array, top_k: int = 0, top_p: float = 1.0) -> jax.Array:
  """logits [B, V] -> the same with every token outside the top-k / top-p set at −inf."""
  if top_k > 0 and top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  if top_p < 1.0:
    ordered = jnp.sort(logits, axis=-1)[:, ::-1]
    probs = jax.nn.softmax(ordered, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = jnp.maximum(jnp.sum(mass_before < top_p, axis=-1, keepdims=True), 1)
    threshold = jnp.take_along_axis(ordered, keep - 1, axis=-1)
    logits = jnp.where(logits < threshold, -jnp.inf, logits)
  return logits


@functools.partial(jax.jit, static_argnames=("top_k", "top_p", "greedy"))
def _sample(logits, key, temperature, *, top_k, top_p, greedy):
  logits = logits.astype(jnp.float32)
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = filter_logits(logits / temperature, top_k, top_p)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def sample(logits: jax.Array, key: jax.Array, *, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0) -> jax.Array:
  """logits [B, V], a PRNG key -> token ids [B] (int32). temperature 0 is greedy."""
  if temperature < 0 or not 0.0 < top_p <= 1.0 or top_k < 0:
    raise ValueError(f"sample: need temperature ≥ 0, 0 < top_p ≤ 1, top_k ≥ 0; got temperature "
                     f"{temperature}, top_p {top_p}, top_k {top_k}")
  return _sample(jnp.asarray(logits), key, jnp.float32(max(temperature, 1e-6)), top_k=int(top_k),
                 top_p=float(top_p), greedy=temperature == 0)


def stream(model, prompts: Sequence[Sequence[int]], *, max_new_tokens: int, temperature: float = 0.0,
           top_k: int = 0, top_p: float = 1.0, seed: int = 0, stop_tokens: Sequence[int] = (),
           storage: str | None = None) -> Iterator[np.ndarray]:
  """Yields, per step, the new token of every row [B] (int, −1 for rows that have already stopped).

  A row stops after emitting a stop token (which is yielded) or max_new_tokens tokens.
  `model` is a Transformer or an Engine.
  """
  engine = model if isinstance(model, Engine) else Engine(model)
  lengths = np.array([len(p) for p in prompts], np.int32)
  if len(prompts) == 0 or lengths.min() < 1:
    raise ValueError(f"generate: every prompt needs at least one token, got lengths {lengths.tolist()}")
  if max_new_tokens < 1:
    return
  ids = np.zeros((len(prompts), lengths.max()), np.int32)
  for row, prompt in enumerate(prompts):
    ids[row, :len(prompt)] = np.asarray(prompt, np.int32)
  stops = np.asarray(list(stop_tokens), np.int32)
  key = jax.random.PRNGKey(seed)
  logits, cache = engine.prefill(ids, int(lengths.max()) + max_new_tokens, lengths=lengths, storage=storage,
                                 last_only=True)
  logits = logits[:, 0]
  done = np.zeros(len(prompts), bool)
  for step in range(max_new_tokens):
    tokens = np.asarray(sample(logits, jax.random.fold_in(key, step), temperature=temperature, top_k=top_k,
                               top_p=top_p))
    out = np.where(done, -1, tokens)
    yield out
    done |= np.isin(tokens, stops)
    if done.all() or step == max_new_tokens - 1:
      return
    logits, cache = engine.decode(tokens[:, None], cache)
    logits = logits[:, 0]


def generate(model, prompts: Sequence[Sequence[int]], **kwargs) -> list[list[int]]:
  """The tokens `stream` produces, per row (see `stream` for the arguments)."""
  rows: list[list[int]] = [[] for _ in prompts]
  for tokens in stream(model, prompts, **kwargs):
    for row, token in enumerate(tokens):
      if token >= 0:
        rows[row].append(int(token))
  return rows
