"""The train state and the jitted train / eval steps.

State: params (nnx.Param), extra (router bias, hash tables: no gradients), opt_state, step.
After each optimizer step the model balances its routers (`Transformer.balance_router_bias`):
every score-routed MoE layer's bias moves by
  bias_e ← bias_e + speed · sign(mean_e(load) − load_e)            (aux-loss-free balancing)
using the expert loads of that step's batch (the forward's aux).
Indexer warm-up steps update only the parameters tagged `indexer=True` (the lightning indexers).
A step may be given the batch's MoE routing indices [R, B, S, K] (anticipatory routing, anticipatory.py):
the score-routed layers then use those experts, weighted by the current parameters' gate scores.
The loop always passes them, −1 (`own_routing`: the routers choose) while anticipatory routing is
off, so that one compiled program serves both.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from dsv4_jax.config import ModelConfig, TrainConfig
from dsv4_jax.train.curriculum import StepKind
from dsv4_jax.train.losses import training_losses


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
  step: jax.Array
  params: Any
  extra: Any
  opt_state: Any


def split_model(model: nnx.Module):
  """-> (graphdef, params, extra): trainable nnx.Param state and everything else."""
  graphdef, params, extra = nnx.split(model, nnx.Param, ...)
  return graphdef, params, extra


def routing_shape(cfg: ModelConfig, batch_size: int, seq_len: int) -> tuple[int, int, int, int]:
  """[R, B, S, K] of a batch's routing indices (R: the score-routed main layers)."""
  routed = cfg.num_hidden_layers - min(cfg.num_hash_layers, cfg.num_hidden_layers)
  return routed, batch_size, seq_len, cfg.num_experts_per_tok


def own_routing(cfg: ModelConfig, batch_size: int, seq_len: int) -> jax.Array:
  """Routing indices that leave every choice to the routers (all −1)."""
  return jnp.full(routing_shape(cfg, batch_size, seq_len), -1, jnp.int32)


def _is_variable(x) -> bool:
  return isinstance(x, nnx.Variable)


def _indexer_only(tree):
  """Zeros every parameter of `tree` (params, grads or updates) not tagged `indexer=True`."""
  def keep(var):
    return var if var.get_metadata("indexer", False) else var.replace(jnp.zeros_like(var.get_value()))

  return jax.tree.map(keep, tree, is_leaf=_is_variable)


def make_train_step(graphdef, tx: optax.GradientTransformation, cfg: TrainConfig, decay_start: int,
                    state_sharding: TrainState | None = None):
  """A jitted `step(state, batch, kind, routing=None) -> (state, metrics)`; `kind` (a StepKind) is
  static; `routing` [R, B, S, K]: the batch's expert indices per score-routed layer (−1 rows, or None,
  a separate compilation: the routers choose). The input state is donated.

  state_sharding: a TrainState of NamedSharding (train/placement.py); the output state is laid out
  exactly so (the inputs keep theirs), the metrics are replicated. Trace it under `jax.set_mesh`."""

  def loss_fn(params, extra, batch, kind: StepKind, step, routing):
    model = nnx.merge(graphdef, params, extra)
    out = model(batch["input_ids"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                attention_mode=kind.attention, with_indexer_loss=kind.indexer_loss,
                with_mtp=not kind.indexer_only, routing=routing)
    mtp_weight = jnp.where(step >= decay_start, cfg.mtp_loss_weight_after_decay, cfg.mtp_loss_weight)
    losses = training_losses(out, batch, mtp_weight=mtp_weight, balance_weight=cfg.balance_loss_weight,
                             indexer_weight=cfg.indexer_loss_weight, indexer_only=kind.indexer_only)
    return losses["total"], (losses, out.aux)

  @functools.partial(jax.jit, static_argnums=2, donate_argnums=0, out_shardings=_with_replicated(state_sharding))
  def step(state: TrainState, batch: dict, kind: StepKind, routing: jax.Array | None = None):
    grads, (losses, aux) = jax.grad(loss_fn, has_aux=True)(
        state.params, state.extra, batch, kind, state.step, routing)
    if kind.indexer_only:  # indexer warm-up: everything else stays frozen (weight decay included)
      grads = _indexer_only(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    if kind.indexer_only:
      updates = _indexer_only(updates)
    params = optax.apply_updates(state.params, updates)
    extra = state.extra
    if not kind.indexer_only:  # after the parameter update, from this batch's expert loads
      model = nnx.merge(graphdef, params, extra)
      model.balance_router_bias(aux, cfg.router_bias_speed)
      _, _, extra = split_model(model)
    dropped = aux["dropped_copies"] + aux.get("mtp_dropped_copies", 0)  # expert parallelism's capacity
    metrics = dict(losses, grad_norm=optax.global_norm(grads), dropped_copies=dropped.astype(jnp.float32))
    return TrainState(state.step + 1, params, extra, opt_state), metrics

  return step


def make_eval_step(graphdef, mesh: jax.sharding.Mesh | None = None):
  """A jitted `eval(params, extra, batch, attention) -> (loss sum in nats, target count, target bytes)`;
  with a `mesh`, the three sums are replicated on it."""

  @functools.partial(jax.jit, static_argnums=3, out_shardings=None if mesh is None else _replicated(mesh))
  def evaluate(params, extra, batch, attention: str):
    model = nnx.merge(graphdef, params, extra)
    out = model(batch["input_ids"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                attention_mode=attention, with_indexer_loss=False, with_mtp=False)
    logp = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask), jnp.sum(batch["target_bytes"] * mask)

  return evaluate


def _replicated(mesh: jax.sharding.Mesh) -> NamedSharding:
  return NamedSharding(mesh, PartitionSpec())


def _with_replicated(state_sharding: TrainState | None):
  """out_shardings of the train step: (the state's layout, replicated metrics); None: XLA chooses."""
  if state_sharding is None:
    return None
  return state_sharding, _replicated(state_sharding.step.mesh)
