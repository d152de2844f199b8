"""The train state and the jitted train / eval steps.

State: params (nnx.Param), extra (router bias, hash tables: no gradients), opt_state, step.
After each optimizer step every score-routed MoE layer's router bias moves by
  bias_e ← bias_e + speed · sign(mean_e(load) − load_e)            (aux-loss-free balancing)
using the expert loads of that step's batch.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from dsv4_jax.config import TrainConfig
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


def balance_router_bias(extra, loads: jax.Array, speed: float, layer_names: list[tuple]):
  """Returns `extra` with each listed layer's gate bias moved toward balance. loads: [L, E]."""
  flat = dict(nnx.to_flat_state(extra))
  for (path, load) in zip(layer_names, loads):
    if path in flat:
      var = flat[path]
      flat[path] = var.replace(var[...] + speed * jnp.sign(jnp.mean(load) - load))
  return nnx.from_flat_state(list(flat.items()))


def router_bias_paths(cfg) -> tuple[list[tuple], list[tuple]]:
  """Paths of the gate biases of the main layers and of the MTP layers (hash layers have none)."""
  main = [("layers", i, "ffn", "gate", "bias") for i in range(cfg.num_hidden_layers)]
  mtp = [("mtp", i, "ffn", "gate", "bias") for i in range(cfg.num_nextn_predict_layers)]
  return main, mtp


def _only_indexer(tree):
  """Zeros every leaf of `tree` outside the lightning indexers."""
  def keep(key_path, x):
    return x if "'indexer'" in jax.tree_util.keystr(key_path) else jnp.zeros_like(x)

  return jax.tree_util.tree_map_with_path(keep, tree)


def make_train_step(graphdef, tx: optax.GradientTransformation, cfg: TrainConfig, decay_start: int):
  """A jitted `step(state, batch, kind) -> (state, metrics)`; `kind` (a StepKind) is static."""
  main_bias, mtp_bias = router_bias_paths(cfg.model)

  def loss_fn(params, extra, batch, kind: StepKind, step):
    model = nnx.merge(graphdef, params, extra)
    out = model(batch["input_ids"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                attention_mode=kind.attention, with_indexer_loss=kind.indexer_loss,
                with_mtp=not kind.indexer_only)
    mtp_weight = jnp.where(step >= decay_start, cfg.mtp_loss_weight_after_decay, cfg.mtp_loss_weight)
    losses = training_losses(out, batch, mtp_weight=mtp_weight, balance_weight=cfg.balance_loss_weight,
                             indexer_weight=cfg.indexer_loss_weight, indexer_only=kind.indexer_only)
    loads = (out.aux["expert_load"], out.aux.get("mtp_expert_load"))
    return losses["total"], (losses, loads)

  @functools.partial(jax.jit, static_argnums=2, donate_argnums=0)
  def step(state: TrainState, batch: dict, kind: StepKind):
    grads, (losses, (loads, mtp_loads)) = jax.grad(loss_fn, has_aux=True)(
        state.params, state.extra, batch, kind, state.step)
    if kind.indexer_only:  # indexer warm-up: everything else stays frozen (weight decay included)
      grads = _only_indexer(grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    if kind.indexer_only:
      updates = _only_indexer(updates)
    params = optax.apply_updates(state.params, updates)
    extra = state.extra
    if not kind.indexer_only:
      extra = balance_router_bias(extra, loads, cfg.router_bias_speed, main_bias)
      if mtp_loads is not None:
        extra = balance_router_bias(extra, mtp_loads, cfg.router_bias_speed, mtp_bias)
    metrics = dict(losses, grad_norm=optax.global_norm(grads))
    return TrainState(state.step + 1, params, extra, opt_state), metrics

  return step


def make_eval_step(graphdef):
  """A jitted `eval(params, extra, batch, attention) -> (loss sum in nats, target count, target bytes)`."""

  @functools.partial(jax.jit, static_argnums=3)
  def evaluate(params, extra, batch, attention: str):
    model = nnx.merge(graphdef, params, extra)
    out = model(batch["input_ids"], segment_ids=batch["segment_ids"], positions=batch["positions"],
                attention_mode=attention, with_indexer_loss=False, with_mtp=False)
    logp = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, batch["targets"][..., None].astype(jnp.int32), axis=-1)[..., 0]
    mask = batch["loss_mask"].astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(mask), jnp.sum(batch["target_bytes"] * mask)

  return evaluate
