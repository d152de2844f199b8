"""The training loop behind `dsv4 train`.

Per curriculum stage: a data iterator of that stage's shape (continuing the token stream), one
compilation per step kind (all compiled ahead on a background thread, compile_ahead.py), progress
with loss / tokens/s / ETA, periodic validation (loss and bits per byte on a fixed random sample of
held-out rows), asynchronous checkpoints. Ctrl-C stops cleanly with a final checkpoint; `resume=True`
continues from the latest checkpoint exactly (same data, same optimizer state, same curriculum stage).

A run directory holds one run: a fresh run refuses a directory that holds one (`overwrite=True`
deletes it first), `resume=True` requires a checkpoint (`resume="auto"`: resume if there is one), a
corrupt latest checkpoint is reported and the newest one that restores is used (checkpoint.py).
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

from dsv4_jax.config import TrainConfig
from dsv4_jax.data import (bits_per_byte, corpus_unigram_byte_entropy, load_tokenizer, make_dataset,
                           validation_sample)
from dsv4_jax.data.packing import empty_row
from dsv4_jax.layers.model import Transformer
from dsv4_jax.optim import build_optimizer
from dsv4_jax.optim.schedule import learning_rate_schedule
from dsv4_jax.train import curriculum
from dsv4_jax.train.checkpoint import RunDirectoryError, TrainCheckpointer, clear_run, prepare_run_directory
from dsv4_jax.train.compile_ahead import CompileAhead, shapes_of
from dsv4_jax.train.metrics import MetricsWriter, last_record
from dsv4_jax.train.step import TrainState, make_eval_step, make_train_step, split_model


def config_fingerprint(cfg: TrainConfig) -> str:
  """A hash of everything that must match for a checkpoint to resume this run."""
  return hashlib.sha256(repr((cfg.model, cfg.data, cfg.optimizer, cfg.curriculum, cfg.tokens_per_batch,
                              cfg.seed)).encode()).hexdigest()[:16]


def init_state(cfg: TrainConfig):
  """-> (graphdef, TrainState, optimizer): the model initialised from `cfg.seed`.

  Built eagerly: parameters are drawn on the host (layers/linear.py), which for the tiny config
  takes 0.7 s where compiling the initialiser under jit takes 13 s.
  """
  model = Transformer(cfg.model, rngs=nnx.Rngs(cfg.seed))
  graphdef, params, extra = split_model(model)
  tx = build_optimizer(cfg.optimizer, params)
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, extra=extra, opt_state=tx.init(params))
  return graphdef, state, tx


def _to_device(batch: dict) -> dict:
  return {k: jnp.asarray(v) for k, v in batch.items()}


def evaluate(evaluate_fn, state: TrainState, batches: list[dict]) -> dict:
  """Validation loss (nats/token) and bits per byte over `batches` (a `validation_sample`).

  evaluate_fn(params, extra, batch) -> (loss sum in nats, target count, target bytes).
  """
  loss_sum = count = n_bytes = 0.0
  for batch in batches:
    s, c, b = evaluate_fn(state.params, state.extra, _to_device(batch))
    loss_sum, count, n_bytes = loss_sum + float(s), count + float(c), n_bytes + float(b)
  return {"loss": loss_sum / max(count, 1.0), "bits_per_byte": bits_per_byte(loss_sum, n_bytes),
          "tokens": count, "seq_len": batches[0]["input_ids"].shape[1]}


def _batch_shapes(batch_size: int, seq_len: int) -> dict:
  return {key: jax.ShapeDtypeStruct((batch_size, seq_len), value.dtype)
          for key, value in empty_row(seq_len, 0).items()}


def _compile_ahead(cfg: TrainConfig, plans, step_fn, eval_fn, state: TrainState, first: int,
                   total: int) -> CompileAhead:
  """Queues, in the order the run needs them, the train steps of global steps [first, total) and
  the evaluations among them. Keys: ("train", stage index, step kind), ("eval", stage index, attention)."""
  compiler = CompileAhead()
  state_shapes = shapes_of(state)
  for plan in plans:
    batch = _batch_shapes(plan.batch_size, plan.stage.seq_len)
    for kind in plan.kinds(first, total):
      compiler.submit(("train", plan.index, kind), functools.partial(step_fn.lower, state_shapes, batch, kind))
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
  restore = prepare_run_directory(cfg.run_dir, resume=_resume_mode(resume), overwrite=overwrite, log=log)
  tokenizer = load_tokenizer(cfg.data.tokenizer)
  if tokenizer.vocab_size > cfg.model.vocab_size:
    raise ValueError(f"tokenizer vocab_size {tokenizer.vocab_size} exceeds model.vocab_size {cfg.model.vocab_size}")
  plans = curriculum.plan(cfg)
  graphdef, state, tx = init_state(cfg)
  schedule = learning_rate_schedule(cfg.optimizer)
  decay_start = cfg.optimizer.decay_start_step
  step_fn = make_train_step(graphdef, tx, cfg, decay_start)
  eval_fn = make_eval_step(graphdef)
  if overwrite:   # only now: a config that fails above leaves the old run in place
    clear_run(cfg.run_dir, log)
  os.makedirs(cfg.run_dir, exist_ok=True)
  ckpt = TrainCheckpointer(os.path.join(cfg.run_dir, "checkpoints"), keep=cfg.keep_checkpoints,
                           save_every=cfg.checkpoint_every)
  fingerprint = config_fingerprint(cfg)

  def same_config(meta: dict) -> None:
    if meta.get("fingerprint") != fingerprint:
      raise RunDirectoryError(f"--resume: the checkpoints in {cfg.run_dir} were written with a different "
                              f"config (fingerprint {meta.get('fingerprint')} != {fingerprint}); resume with "
                              f"that config, or start over (--overwrite or another train.run_dir)")

  data_state, resumed_at = None, None
  if restore:
    try:
      found = ckpt.restore_latest(state, check=same_config, log=log)
      if found is None:
        raise RunDirectoryError(f"--resume: Orbax lists no checkpoint in {ckpt.directory}")
    except BaseException:
      ckpt.close()
      raise
    resumed_at, state, data_state, meta = found
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

  with open(os.path.join(cfg.run_dir, "config.json"), "w") as f:
    json.dump(dataclasses.asdict(cfg), f, indent=2, default=str)
  metrics = MetricsWriter(cfg.run_dir, resumed_at=resumed_at)
  if metrics.dropped:
    log(f"metrics.jsonl: dropped {metrics.dropped} record(s) after step {resumed_at} (written after that "
        f"checkpoint; the resumed run writes them again)")
  compiled = _compile_ahead(cfg, plans, step_fn, eval_fn, state, step, total)
  history, last_eval, interrupted = [], None, False
  start_time, tokens_done = time.time(), 0
  bar = None
  if progress:
    from tqdm import tqdm
    bar = tqdm(total=total, initial=step, dynamic_ncols=True, desc="train")
  try:
    while step < total:
      plan = curriculum.stage_at(plans, step)
      log(f"[curriculum] {plan.describe()}")
      it = make_dataset(cfg.data, plan.stage.seq_len, plan.batch_size, tokenizer, split="train",
                        shard_index=jax.process_index(), shard_count=jax.process_count())
      if data_state is not None:
        it.set_state(data_state)
      eval_batches = None   # this stage's validation sample, drawn at its first evaluation
      window_start, window_tokens = time.time(), 0.0
      while step < min(plan.end, total):
        batch = _to_device(next(it))
        state, m = compiled.get(("train", plan.index, plan.kind(step)))(state, batch)
        step += 1
        window_tokens += float(m["tokens"])
        if step % cfg.log_every == 0 or step == total:
          elapsed = time.time() - window_start
          values = {k: float(v) for k, v in m.items() if k != "loss_sum"}
          values.update(lr=float(schedule(step - 1)), tokens_per_second=window_tokens / max(elapsed, 1e-9),
                        seq_len=plan.stage.seq_len)
          metrics.write(step, "train", values)
          history.append(values)
          tokens_done += window_tokens
          window_start, window_tokens = time.time(), 0.0
          if bar is not None:
            bar.set_postfix(loss=f"{values['loss']:.3f}", tok_s=f"{values['tokens_per_second']:.0f}")
        if bar is not None:
          bar.update(1)
        if cfg.eval_every and (step % cfg.eval_every == 0 or step == total):
          if eval_batches is None:
            eval_batches = validation_sample(cfg.data, plan.stage.seq_len, plan.batch_size,
                                             max(1, cfg.eval_tokens // plan.stage.seq_len), tokenizer)
          evaluate_fn = compiled.get(("eval", plan.index, plan.kind(step - 1).attention))
          last_eval = evaluate(evaluate_fn, state, eval_batches)
          metrics.write(step, "eval", last_eval)
          log(f"[eval] step {step}: loss {last_eval['loss']:.4f}, {last_eval['bits_per_byte']:.4f} bits/byte")
        data_state = it.get_state()
        ckpt.save(step, state, data_state, {"stage": plan.index, "fingerprint": fingerprint})
  except KeyboardInterrupt:
    interrupted = True
    log(f"interrupted at step {step}: saving a final checkpoint")
  finally:
    if bar is not None:
      bar.close()
    if data_state is not None and step > 0:
      plan = curriculum.stage_at(plans, step - 1)
      ckpt.save(step, state, data_state, {"stage": plan.index, "fingerprint": fingerprint}, force=True)
    ckpt.close()
    metrics.close()

  elapsed = time.time() - start_time
  summary = {"steps": step, "interrupted": interrupted, "seconds": elapsed,
             "tokens_per_second": tokens_done / max(elapsed, 1e-9),
             "final_loss": history[-1]["loss"] if history else math.nan, "history": history,
             "eval": last_eval}
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
