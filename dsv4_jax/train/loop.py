"""The training loop behind `dsv4 train`.

Per curriculum stage: a data iterator of that stage's shape (continuing the token stream), one
compilation per step kind (all compiled ahead on a background thread, compile_ahead.py), progress
with loss / tokens/s / ETA, periodic validation (loss and bits per byte on a fixed random sample of
held-out rows), asynchronous checkpoints. Ctrl-C stops cleanly with a final checkpoint; `resume=True`
continues from the latest checkpoint exactly (same data, same optimizer state, same curriculum stage).

A run directory holds one run: a fresh run refuses a directory that holds one (`overwrite=True`
deletes it first), `resume=True` requires a checkpoint (`resume="auto"`: resume if there is one), a
corrupt latest checkpoint is reported and the newest one that restores is used (checkpoint.py).

The run is laid out on the mesh of `cfg.mesh` over every device (placement.py: the state sharded from
its first allocation, batches assembled from each process's rows); with several processes
(distributed.py) each reads its own data shards (data/shards.py) and process 0 alone prints and writes.

Loss spikes (`cfg.stability`, spike.py): each step's loss and gradient norm go to the spike detector;
on a spike the state rolls back to a host snapshot a few steps earlier, the data stream rewinds
(or skips), and anticipatory routing (anticipatory.py) runs for a period: each step then also routes
the batch of Δt steps later (batch_stream.py reads it ahead) and trains with the indices stored Δt
steps earlier. Each event is one log line and one "event" record in metrics.jsonl.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import os
import time

import jax
import jax.numpy as jnp
from flax import nnx

from dsv4_jax.config import ConfigError, TrainConfig
from dsv4_jax.data import (bits_per_byte, corpus_unigram_byte_entropy, load_tokenizer, make_dataset,
                           validation_sample)
from dsv4_jax.data import shards as data_shards
from dsv4_jax.data.packing import empty_row
from dsv4_jax.layers.model import Transformer
from dsv4_jax.optim import build_optimizer
from dsv4_jax.optim.schedule import learning_rate_schedule
from dsv4_jax.parallel.mesh import make_mesh
from dsv4_jax.train import curriculum, distributed
from dsv4_jax.train.anticipatory import AnticipatoryRouting, make_route_fn
from dsv4_jax.train.batch_stream import BatchStream
from dsv4_jax.train.checkpoint import RunDirectoryError, TrainCheckpointer, clear_run, prepare_run_directory
from dsv4_jax.train.compile_ahead import CompileAhead, shapes_of
from dsv4_jax.train.metrics import MetricsWriter, NoMetrics, last_record
from dsv4_jax.train.placement import Placement
from dsv4_jax.train.spike import Spike, SpikeRecoveryError, StabilityController, copy_params
from dsv4_jax.train.step import (TrainState, make_eval_step, make_train_step, own_routing, routing_shape,
                                  split_model)


def config_fingerprint(cfg: TrainConfig) -> str:
  """A hash of everything that must match for a checkpoint to resume this run (the data shard count is
  checked against the checkpoint's data position instead: 0, one per process, may resolve to it)."""
  data = dataclasses.replace(cfg.data, shards=0)
  return hashlib.sha256(repr((cfg.model, data, cfg.optimizer, cfg.curriculum, cfg.tokens_per_batch,
                              cfg.seed)).encode()).hexdigest()[:16]


def run_mesh(cfg: TrainConfig) -> jax.sharding.Mesh:
  """The device mesh of `cfg.mesh` over all devices (ConfigError if it does not fit them or the model)."""
  return make_mesh(**cfg.mesh.axis_sizes(jax.device_count(), cfg.model.n_routed_experts))


def _data_shards(cfg: TrainConfig, plans) -> tuple[int, range]:
  """(the run's number of data shards, this process's shards): `data.shards`, or one per process."""
  count, processes = cfg.data.shards or jax.process_count(), jax.process_count()
  if count % processes:
    raise ConfigError(f"data.shards: {count} shards cannot be split evenly over {processes} processes")
  for plan in plans:
    if plan.batch_size % count:
      raise ConfigError(f"curriculum stage {plan.index}: its batch of {plan.batch_size} rows does not split into "
                        f"{count} data shards (data.shards, default one per process)")
  per_process = count // processes
  return count, range(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)


def _own_data_state(data_state: dict, count: int, mine: range, run_dir: str) -> dict:
  """This process's shards of a checkpoint's data position (which holds every shard's)."""
  if not isinstance(data_state, dict) or data_state.get("shards") != count:
    found = data_state.get("shards") if isinstance(data_state, dict) else None
    raise RunDirectoryError(f"--resume: the checkpoints in {run_dir} read the data as {found} shards, this run as "
                            f"{count}; resume with --set data.shards={found} (any number of processes that divides it)")
  return data_shards.select(data_state, mine)


def init_state(cfg: TrainConfig, mesh: jax.sharding.Mesh | None = None):
  """-> (graphdef, TrainState, optimizer): the model initialised from `cfg.seed`, laid out on `mesh`
  (placement.py; default: the first device).

  Every parameter is drawn directly into its shards (layers/linear.py: the same values on every mesh)
  and the optimizer state is created by one jitted init with the parameters' shardings, so no host
  or device ever holds more than its own part of the state.
  """
  mesh = mesh or make_mesh(devices=jax.devices()[:1])
  with jax.set_mesh(mesh):
    model = Transformer(cfg.model, rngs=nnx.Rngs(cfg.seed))
  graphdef, params, extra = split_model(model)
  tx = build_optimizer(cfg.optimizer, params)
  layout = Placement.of(mesh, params, extra, tx).state
  state = TrainState(step=jax.device_put(jnp.zeros((), jnp.int32), layout.step),
                     params=jax.device_put(params, layout.params), extra=jax.device_put(extra, layout.extra),
                     opt_state=jax.jit(tx.init, out_shardings=layout.opt_state)(params))
  return graphdef, state, tx


def evaluate(evaluate_fn, state: TrainState, batches: list[dict], placement: Placement) -> dict:
  """Validation loss (nats/token) and bits per byte over `batches` (a `validation_sample`).

  evaluate_fn(params, extra, batch) -> (loss sum in nats, target count, target bytes).
  """
  loss_sum = count = n_bytes = 0.0
  for batch in batches:
    s, c, b = evaluate_fn(state.params, state.extra, placement.batch(placement.local_rows(batch)))
    loss_sum, count, n_bytes = loss_sum + float(s), count + float(c), n_bytes + float(b)
  return {"loss": loss_sum / max(count, 1.0), "bits_per_byte": bits_per_byte(loss_sum, n_bytes),
          "tokens": count, "seq_len": batches[0]["input_ids"].shape[1]}


def _batch_shapes(batch_size: int, seq_len: int, placement: Placement) -> dict:
  sharding = placement.batch_sharding((batch_size, seq_len))
  return {key: jax.ShapeDtypeStruct((batch_size, seq_len), value.dtype, sharding=sharding)
          for key, value in empty_row(seq_len, 0).items()}


def _compile_ahead(cfg: TrainConfig, plans, step_fn, eval_fn, state: TrainState, placement: Placement,
                   first: int, total: int) -> CompileAhead:
  """Queues, in the order the run needs them, the train steps of global steps [first, total) and
  the evaluations among them. Keys: ("train", stage index, step kind), ("eval", stage index, attention).
  A train step takes (state, batch, routing indices): anticipated, or all −1 (the routers choose).
  Every input shape carries its sharding (placement.py), so each program is compiled for the mesh."""
  compiler = CompileAhead(placement.mesh)
  state_shapes = shapes_of(state)
  for plan in plans:
    batch = _batch_shapes(plan.batch_size, plan.stage.seq_len, placement)
    shape = routing_shape(cfg.model, plan.batch_size, plan.stage.seq_len)
    routing = jax.ShapeDtypeStruct(shape, jnp.int32, sharding=placement.routing_sharding(shape))
    for kind in plan.kinds(first, total):
      compiler.submit(("train", plan.index, kind),
                      functools.partial(step_fn.lower, state_shapes, batch, kind, routing))
    evaluated = [step for step in range(max(first, plan.start) + 1, min(total, plan.end) + 1)
                 if cfg.eval_every and (step % cfg.eval_every == 0 or step == total)]
    for attention in dict.fromkeys(plan.kind(step - 1).attention for step in evaluated):
      compiler.submit(("eval", plan.index, attention), functools.partial(
          eval_fn.lower, state_shapes.params, state_shapes.extra, batch, attention))
  return compiler


def _resume_mode(resume) -> bool | str:
  if isinstance(resume, str) and resume.lower() in ("true", "false", "auto"):
    resume = {"true": True, "false": False, "auto": "auto"}[resume.lower()]
  if resume not in (True, False, "auto"):
    raise ValueError(f"resume: expected True, False or 'auto', got {resume!r}")
  return resume


def train(cfg: TrainConfig, *, resume: bool | str = False, overwrite: bool = False, max_steps: int | None = None,
          progress: bool = True, log=print) -> dict:
  """Trains per `cfg`; returns a summary dict. `max_steps` stops early (for tests and smoke runs).

  resume: False starts a new run (refused, RunDirectoryError, if `cfg.run_dir` holds a run, unless
  `overwrite` deletes that run first); True continues from the newest checkpoint that restores
  (RunDirectoryError if there is none); "auto" continues if there is a checkpoint, else starts.
  """
  if not distributed.is_primary():   # process 0 alone prints and writes the run's files
    log, progress = (lambda *args, **kwargs: None), False
  restore = prepare_run_directory(cfg.run_dir, resume=_resume_mode(resume), overwrite=overwrite, log=log)
  tokenizer = load_tokenizer(cfg.data.tokenizer)
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise ValueError(f"tokenizer vocab_size {tokenizer.vocab_size} exceeds model.vocab_size {cfg.model.vocab_size}")
  plans = curriculum.plan(cfg)
  shard_count, my_shards = _data_shards(cfg, plans)
  fingerprint = config_fingerprint(cfg)
  distributed.check_agreement("config fingerprint and mesh", [fingerprint, dataclasses.asdict(cfg.mesh)])
  mesh = run_mesh(cfg)
  graphdef, state, tx = init_state(cfg, mesh)
  placement = Placement.of(mesh, state.params, state.extra, tx)
  schedule = learning_rate_schedule(cfg.optimizer)
  decay_start = cfg.optimizer.decay_start_step
  step_fn = make_train_step(graphdef, tx, cfg, decay_start, placement.state)
  eval_fn = make_eval_step(graphdef, mesh)
  if overwrite and distributed.is_primary():   # only now: a config that fails above leaves the old run in place
    clear_run(cfg.run_dir, log)
  distributed.barrier("run directory ready")
  os.makedirs(cfg.run_dir, exist_ok=True)
  ckpt = TrainCheckpointer(os.path.join(cfg.run_dir, "checkpoints"), keep=cfg.keep_checkpoints,
                           save_every=cfg.checkpoint_every)

  def same_config(meta: dict) -> None:
    if meta.get("fingerprint") != fingerprint:
      raise RunDirectoryError(f"--resume: the checkpoints in {cfg.run_dir} were written with a different "
                              f"config (fingerprint {meta.get('fingerprint')} != {fingerprint}); resume with "
                              f"that config, or start over (--overwrite or another train.run_dir)")

  data_state, resumed_at, stability, routing_arrays = None, None, {}, {}
  if restore:
    try:
      found = ckpt.restore_latest(state, check=same_config, log=log, with_arrays=True)
      if found is None:
        raise RunDirectoryError(f"--resume: Orbax lists no checkpoint in {ckpt.directory}")
      resumed_at, state, data_state, meta, routing_arrays = found
      data_state = _own_data_state(data_state, shard_count, my_shards, cfg.run_dir)
    except BaseException:
      ckpt.close()
      raise
    stability = meta.get("stability") or {}
    log(f"resumed from step {resumed_at} (stage {meta['stage']})")

  total = cfg.optimizer.total_steps if max_steps is None else min(max_steps, cfg.optimizer.total_steps)
  step = int(state.step)
  if resumed_at is not None and step >= total:
    ckpt.close()
    last = last_record(cfg.run_dir)
    if step >= cfg.optimizer.total_steps:
      log(f"run already complete at step {step}; nothing to do")
    else:
      log(f"run already at step {step} (--max_steps {max_steps}); nothing to do")
    return {"steps": step, "interrupted": False, "already_complete": True, "seconds": 0.0,
            "tokens_per_second": 0.0, "final_loss": last["loss"] if last else math.nan, "history": [],
            "eval": None}

  if distributed.is_primary():
    with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
      json.dump(dataclasses.asdict(cfg), f, indent=2, default=str)
  metrics = MetricsWriter(cfg.run_dir, resumed_at=resumed_at) if distributed.is_primary() else NoMetrics()
  if metrics.dropped:
    log(f"metrics.jsonl: dropped {metrics.dropped} record(s) after step {resumed_at} (written after that "
        f"checkpoint; the resumed run writes them again)")
  compiled = _compile_ahead(cfg, plans, step_fn, eval_fn, state, placement, step, total)
  controller = StabilityController(cfg.stability)
  controller.load(stability.get("controller"))
  anticipation = AnticipatoryRouting(make_route_fn(graphdef, mesh), cfg.stability.routing_delay,
                                     lambda s: curriculum.stage_at(plans, s).kind(s), placement.batch)
  anticipation.load(stability.get("anticipation"), routing_arrays)

  def open_stage(plan) -> data_shards.LocalShards:
    rows = plan.batch_size // shard_count
    return data_shards.LocalShards(lambda index: make_dataset(
        cfg.data, plan.stage.seq_len, rows, tokenizer, split="train", shard_index=index, shard_count=shard_count),
        my_shards, shard_count)

  stream = BatchStream(open_stage, plans, step, data_state)

  def save(step: int, state: TrainState, data_state: dict, plan, force: bool = False) -> None:
    """A checkpoint at `step` when one is due: every process's shards of the data position in one."""
    if ckpt.due(step, force):
      meta = {"stage": plan.index, "fingerprint": fingerprint,
              "stability": {"controller": controller.state_dict(), "anticipation": anticipation.state_dict()}}
      ckpt.save(step, state, data_shards.merge(distributed.all_processes(data_state)), meta,
                arrays=anticipation.arrays(), force=True)

  history, last_eval, interrupted, events = [], None, False, []
  start_time, tokens_done = time.time(), 0
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=total, initial=step, dynamic_ncols=True, desc="train")
  plan, eval_batches, own, first = None, {}, {}, True   # per stage: its validation sample, its −1 routing
  try:
    while step < total:
      if plan is None or not plan.start <= step < plan.end:
        plan = curriculum.stage_at(plans, step)
        log(f"[curriculum] {plan.describe()}")
        if mesh.size > 1:
          log(f"[mesh] {placement.describe(plan.batch_size, plan.stage.seq_len)}")
        window_start, window_tokens = time.time(), 0.0
      kind = plan.kind(step)
      controller.maybe_snapshot(step, state, stream.position(), first=first)
      first = False
      routing = anticipation.routing_for(step, state, stream.peek, cfg.optimizer.total_steps)
      anticipated = routing is not None
      if not anticipated:
        if plan.index not in own:   # placed once per stage
          own[plan.index] = placement.routing(own_routing(cfg.model, plan.batch_size, plan.stage.seq_len))
        routing = own[plan.index]
      else:
        routing = placement.routing(routing)
      batch = stream.next()
      if controller.fault_due(step + 1, "batch"):
        batch = controller.corrupt_batch(batch, tokenizer.vocab_size)
        log(f"[stability] step {step + 1}: fault injection (stability.fault_step): random targets in this batch")
      batch = placement.batch(batch)
      before = copy_params(state.params) if controller.fault_due(step + 1, "update") else None
      state, m = compiled.get(("train", plan.index, kind))(state, batch, routing)
      if before is not None:
        state = dataclasses.replace(state, params=controller.scale_update(before, state.params))
        log(f"[stability] step {step + 1}: fault injection (stability.fault_step): parameter update "
            f"x{cfg.stability.fault_scale:g}")
      trained, step = step, step + 1
      window_tokens += float(m["tokens"])
      period_start = anticipation.start
      period_over = anticipation.done(trained)
      spike = controller.observe(step, plan.index, float(m["loss"]), float(m["grad_norm"]))
      if step % cfg.log_every == 0 or step == total:
        elapsed = time.time() - window_start
        values = {k: float(v) for k, v in m.items() if k != "loss_sum"}
        values.update(lr=float(schedule(step - 1)), tokens_per_second=window_tokens / max(elapsed, 1e-9),
                      seq_len=plan.stage.seq_len, anticipation=float(anticipated),
                      spikes=controller.spikes, rollbacks=controller.rollbacks)
        metrics.write(step, "train", values)
        history.append(values)
        tokens_done += window_tokens
        window_start, window_tokens = time.time(), 0.0
        if bar is not None:
          bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{values['tokens_per_second']:.0f}")
      if spike is not None:
        state, step = _recover(spike, controller, anticipation, stream, ckpt, cfg, metrics, events, log)
        data_state = stream.position()
        if bar is not None:
          bar.n = step
          bar.refresh()
        if controller.too_many():
          raise SpikeRecoveryError(events[-1]["action"])
        continue
      if period_over:
        _event(metrics, events, log, step, event="anticipation_off", loss=float(m["loss"]),
               action=f"anticipatory routing off (it routed steps {period_start + 1}..{step})")
      if bar is not None:
        bar.update(1)
      if cfg.eval_every and (step % cfg.eval_every == 0 or step == total):
        if plan.index not in eval_batches:
          eval_batches[plan.index] = validation_sample(cfg.data, plan.stage.seq_len, plan.batch_size,
                                                       max(1, cfg.eval_tokens // plan.stage.seq_len), tokenizer)
        evaluate_fn = compiled.get(("eval", plan.index, plan.kind(step - 1).attention))
        last_eval = evaluate(evaluate_fn, state, eval_batches[plan.index], placement)
        metrics.write(step, "eval", last_eval)
        log(f"[eval] step {step}: loss {last_eval['loss']:.4f}, {last_eval['bits_per_byte']:.4f} bits/byte")
      data_state = stream.position()
      save(step, state, data_state, plan)
  except KeyboardInterrupt:
    interrupted = True
    log(f"interrupted at step {step}: saving a final checkpoint")
  finally:
    if bar is not None:
      bar.close()
    stream.close()
    if data_state is not None and step > 0:
      save(step, state, data_state, curriculum.stage_at(plans, step - 1), force=True)
    ckpt.close()
    metrics.close()

  elapsed = time.time() - start_time
  summary = {"steps": step, "interrupted": interrupted, "seconds": elapsed,
             "tokens_per_second": tokens_done / max(elapsed, 1e-9),
             "final_loss": history[-1]["loss"] if history else math.nan, "history": history,
             "eval": last_eval,
             "stability": {"spikes": controller.spikes, "rollbacks": controller.rollbacks, "events": events}}
  validation = ""
  if last_eval:
    entropy = corpus_unigram_byte_entropy(cfg.data)
    summary["unigram_bits_per_byte"] = entropy
    validation = (f", validation {last_eval['bits_per_byte']:.4f} bits/byte = "
                  f"{100 * last_eval['bits_per_byte'] / entropy:.1f}% of the validation split's unigram "
                  f"byte entropy ({entropy:.4f} bits/byte)")
  loss = f", train loss {summary['final_loss']:.4f}" if history else ""
  log(f"done: {step} steps in {elapsed:.0f}s, {summary['tokens_per_second']:.0f} tokens/s{loss}{validation}")
  return summary


EVENT_NAMES = {"spike": "loss spike", "anticipation_off": "recovered"}


def _event(metrics: MetricsWriter, events: list, log, step: int, **record) -> None:
  """One stability event: a log line "[stability] step N: <event>, <loss vs threshold>: <action>" and an
  "event" record in metrics.jsonl."""
  events.append({"step": step, **record})
  metrics.event(step, record)
  loss, reason = record.get("loss"), record.get("reason")
  if reason == "loss":
    said = f"loss {loss:.4f} > threshold {record['threshold']:.4f} (median {record['median']:.4f})"
  elif reason == "grad_norm":
    said = (f"gradient norm {record['grad_norm']:.4g} > threshold {record['threshold']:.4g} (loss {loss:.4f}, "
            f"loss threshold {record['loss_threshold']:.4f})")
  elif reason == "non-finite":
    said = f"loss {loss}, gradient norm {record['grad_norm']} (not finite)"
  else:
    said = f"loss {loss:.4f}"
  log(f"[stability] step {step}: {EVENT_NAMES.get(record['event'], record['event'])}, {said}: {record['action']}")


def _recover(spike: Spike, controller: StabilityController, anticipation: AnticipatoryRouting,
             stream: BatchStream, ckpt: TrainCheckpointer, cfg: TrainConfig, metrics: MetricsWriter,
             events: list, log):
  """A spike at spike.step: the state rolls back to a snapshot, the data stream rewinds to its step
  (replay) or goes on after the spike's batch (skip), anticipatory routing starts, the checkpoints
  of the abandoned steps are deleted; -> (state, step) to continue from."""
  c = cfg.stability
  target, action = controller.plan_rollback(spike, c.routing_steps)
  state = controller.restore(target)
  if action == "skip":
    target.data_state = stream.position()   # the batch after the spike's: step target.step reads it now
  stream.reset(target.step, target.data_state)
  if controller.too_many():
    anticipation.deactivate()
    what = (f"stopping: {controller.in_a_row} rollbacks in a row (stability.max_rollbacks_in_a_row = "
            f"{c.max_rollbacks_in_a_row}); the train state is back at step {target.step}")
  else:
    anticipation.activate(target.step, c.routing_steps)
    data = ("replaying the batches from there" if action == "replay"
            else f"skipping the batches up to step {spike.step}'s")
    period = (f"; anticipatory routing for {c.routing_steps} steps (delay {c.routing_delay})" if c.routing_steps
              else "")
    what = f"rolled back to step {target.step}, {data}{period}"
  ckpt.delete_after(target.step, log)
  grad = spike.grad_norm_threshold
  _event(metrics, events, log, spike.step, event="spike", reason=spike.reason, loss=spike.loss,
         threshold=grad if spike.reason == "grad_norm" else spike.threshold, loss_threshold=spike.threshold,
         median=spike.median, grad_norm=spike.grad_norm, grad_norm_threshold=grad, rollback_to=target.step,
         data=action, anticipation_steps=0 if controller.too_many() else c.routing_steps,
         action=what)
  return state, target.step
