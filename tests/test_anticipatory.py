"""Anticipatory routing: the routing-only forward, routing given to the train step, the look-ahead batch
stream, and the two equivalences: Δt = 0 is exactly the normal step; with Δt = k the indices a step
uses are those an independent full forward computes with the parameters of k steps earlier."""

from __future__ import annotations

import copy
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from flax import nnx

from dsv4_jax.config import TrainConfig
from dsv4_jax.data import load_tokenizer, make_dataset
from dsv4_jax.train import curriculum
from dsv4_jax.train.anticipatory import AnticipatoryRouting, make_route_fn
from dsv4_jax.train.batch_stream import BatchStream
from dsv4_jax.train.loop import init_state
from dsv4_jax.train.step import make_train_step, own_routing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def small_tiny_run(steps: int = 200, tokens_per_batch: int = 128, curriculum_stages=None) -> dict:
  """configs/tiny.yaml shrunk so that a step takes tens of milliseconds on a CPU: d = 32, a hash-routed
  and a score-routed layer (window attention), no MTP block, rows of 128 tokens, one row per batch."""
  with open(os.path.join(ROOT, "configs", "tiny.yaml")) as f:
    raw = yaml.safe_load(f)
  raw["model"].update(hidden_size=32, num_hidden_layers=2, compress_ratios=[0, 0], num_attention_heads=2,
                      head_dim=32, q_lora_rank=16, o_lora_rank=16, qk_rope_head_dim=8, sliding_window=32,
                      moe_intermediate_size=32, index_n_heads=2, index_head_dim=16, hc_sinkhorn_iters=3,
                      num_nextn_predict_layers=0)
  raw["data"].update(prefetch_batches=0, num_threads=1)
  raw["curriculum"] = curriculum_stages or [{"seq_len": 128, "steps": steps, "attention": "dense"}]
  raw["train"] = {"tokens_per_batch": tokens_per_batch, "log_every": 1, "eval_every": 0, "checkpoint_every": 50,
                  "keep_checkpoints": 3}
  return raw


def _device(tree):
  return jax.tree.map(jnp.array, tree)   # a device copy (the train step donates its state)


def _to_device(batch):
  return {k: jnp.asarray(v) for k, v in batch.items()}


@pytest.fixture(scope="module")
def run():
  cfg = TrainConfig.from_dict(small_tiny_run())
  graphdef, state, tx = init_state(cfg)
  plans = curriculum.plan(cfg)
  tokenizer = load_tokenizer(cfg.data.tokenizer)

  def stream():
    return BatchStream(lambda plan: make_dataset(cfg.data, plan.stage.seq_len, plan.batch_size, tokenizer),
                       plans, 0, None)

  @jax.jit
  def full_forward(params, extra, batch, routing=None):   # the whole model (head included), as in training
    out = nnx.merge(graphdef, params, extra)(batch["input_ids"], segment_ids=batch["segment_ids"],
                                             positions=batch["positions"], attention_mode="dense", routing=routing)
    return out.logits, out.aux["routing"]

  return dict(cfg=cfg, graphdef=graphdef, state=state, plans=plans, stream=stream,
              step=make_train_step(graphdef, tx, cfg, cfg.optimizer.decay_start_step),
              route=make_route_fn(graphdef), forward=lambda *args: full_forward(*args)[1], full_forward=full_forward,
              kind_at=lambda s: curriculum.stage_at(plans, s).kind(s))


def test_zero_delay_is_exactly_the_normal_step(run):
  """Δt = 0: each step routes its own batch with its own parameters first (routing-only forward), then
  trains with those indices: loss, parameters, router biases and optimizer state bitwise equal to the
  normal step's (the loop's: routing all −1, the routers choose), step after step."""
  kind = run["kind_at"](0)
  mine = own_routing(run["cfg"].model, 1, 128)
  normal, anticipated = _device(run["state"]), _device(run["state"])
  plain, ahead = run["stream"](), run["stream"]()
  routing = AnticipatoryRouting(run["route"], 0, run["kind_at"], _to_device)
  routing.activate(0, 4)
  for s in range(4):
    normal, m_normal = run["step"](normal, _to_device(plain.next()), kind, mine)
    ids = routing.routing_for(s, anticipated, ahead.peek, 8)
    assert ids is not None and list(routing.stored) == [s]
    anticipated, m_anticipated = run["step"](anticipated, _to_device(ahead.next()), kind, ids)
    assert routing.done(s) == (s == 3)
    for key in ("loss", "total", "grad_norm"):
      assert float(m_normal[key]) == float(m_anticipated[key]), (s, key)
  assert not routing.active and not routing.stored
  for a, b in zip(jax.tree.leaves(normal), jax.tree.leaves(anticipated), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_delay_k_uses_the_routing_of_the_parameters_k_steps_earlier(run):
  """Δt = 2 over 6 steps: the indices step s trains with equal the aux["routing"] of an independent full
  forward of batch s with the parameters (and router biases) kept at step s − 2 (at the period's first
  steps, its first parameters). They are device arrays [R, B, S, K], R = the score-routed layers only
  (the hash-routed layer 0 is left out), at most Δt + 1 held at a time; the look-ahead does not change
  which batch a step trains on."""
  k, n = 2, 6
  cfg = run["cfg"]
  state, stream = _device(run["state"]), run["stream"]()
  routing = AnticipatoryRouting(run["route"], k, run["kind_at"], _to_device)
  routing.activate(0, n)
  kept, used, batches = [], [], []
  for s in range(n):
    kept.append(_device((state.params, state.extra)))
    ids = routing.routing_for(s, state, stream.peek, 8)
    assert sorted(routing.stored) == list(range(s, min(s + k, n - 1) + 1))
    assert isinstance(ids, jax.Array) and ids.dtype == jnp.int32
    used.append(np.asarray(ids))
    batches.append(_to_device(stream.next()))
    state, _ = run["step"](state, batches[-1], run["kind_at"](s), ids)
    routing.done(s)
  assert not routing.active
  r = cfg.model.num_hidden_layers - cfg.model.num_hash_layers
  assert used[0].shape == (r, 1, 128, cfg.model.num_experts_per_tok) and r == 1

  for s in range(n):
    params, extra = kept[max(s - k, 0)]
    np.testing.assert_array_equal(used[s], np.asarray(run["forward"](params, extra, batches[s])), err_msg=str(s))
  stale = [s for s in range(k, n)
           if not np.array_equal(used[s], np.asarray(run["forward"](*kept[s], batches[s])))]
  assert stale, "the parameters of k steps earlier routed exactly as the current ones: the test tests nothing"

  plain = make_dataset(cfg.data, 128, 1, load_tokenizer(cfg.data.tokenizer))
  for batch in batches:
    np.testing.assert_array_equal(np.asarray(batch["input_ids"]), next(plain)["input_ids"])


def test_model_routing_argument(run):
  """−1 routing is the routers' own choice (the same logits as no routing argument); the routing-only
  forward gives the full forward's aux["routing"]; given indices are used; a misshaped array is named."""
  params, extra = _device((run["state"].params, run["state"].extra))
  batch = _to_device(run["stream"]().next())
  logits, own = run["full_forward"](params, extra, batch)
  same, again = run["full_forward"](params, extra, batch, own_routing(run["cfg"].model, 1, 128))
  np.testing.assert_array_equal(np.asarray(same), np.asarray(logits))
  np.testing.assert_array_equal(np.asarray(again), np.asarray(own))
  np.testing.assert_array_equal(np.asarray(run["route"](params, extra, batch, "dense")), np.asarray(own))
  other = (own + 1) % run["cfg"].model.n_routed_experts
  changed, used = run["full_forward"](params, extra, batch, other)
  np.testing.assert_array_equal(np.asarray(used), np.asarray(other))
  assert not np.array_equal(np.asarray(changed), np.asarray(logits))

  model = nnx.merge(run["graphdef"], run["state"].params, run["state"].extra)
  assert model.routed_layers == (1,)
  ids = jnp.zeros((1, 128), jnp.int32)
  with pytest.raises(ValueError, match=r"routing: expected shape \(1, 1, 128, 2\) \(score-routed layers \[1\]"):
    model(ids, routing=jnp.zeros((2, 1, 128, 2), jnp.int32))


def test_batch_stream_reads_ahead_across_a_stage_and_rewinds_exactly():
  """BatchStream against the loop's former reading (one iterator per stage, each continuing from the
  previous one's state): the same batches, and position() is the state that loop saved, whatever was
  read ahead; a stream reset to a position (a resume, a rollback) continues with the same batches."""
  raw = small_tiny_run(curriculum_stages=[{"seq_len": 128, "steps": 3, "attention": "dense"},
                                          {"seq_len": 256, "steps": 3, "attention": "dense"}], tokens_per_batch=256)
  cfg = TrainConfig.from_dict({**raw, "optimizer": {**raw["optimizer"], "warmup_steps": 1}})
  plans = curriculum.plan(cfg)
  tokenizer = load_tokenizer(cfg.data.tokenizer)

  def open_iterator(plan):
    return make_dataset(cfg.data, plan.stage.seq_len, plan.batch_size, tokenizer)

  expected, states, data_state = [], [], None
  for plan in plans:
    it = open_iterator(plan)
    if data_state is not None:
      it.set_state(data_state)
    for _ in range(plan.end - plan.start):
      expected.append(next(it))
      data_state = copy.deepcopy(it.get_state())
      states.append(data_state)
  assert [b["input_ids"].shape for b in expected] == [(2, 128)] * 3 + [(1, 256)] * 3

  stream = BatchStream(open_iterator, plans, 0, None)
  for step in range(6):
    np.testing.assert_array_equal(stream.peek(min(3, 5 - step))["input_ids"], expected[min(step + 3, 5)]["input_ids"])
    np.testing.assert_array_equal(stream.next()["input_ids"], expected[step]["input_ids"])
    assert stream.step == step + 1 and stream.position() == states[step], step
  for start in (1, 2, 3, 4):   # resumed or rolled back to `start`, from the saved position
    again = BatchStream(open_iterator, plans, start, states[start - 1])
    for step in range(start, 6):
      np.testing.assert_array_equal(again.next()["input_ids"], expected[step]["input_ids"])
