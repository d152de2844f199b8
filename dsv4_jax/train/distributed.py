"""Runs over several processes (one per host, or per GPU): joining them, and what they must agree on.

`initialize` joins the processes of a run with `jax.distributed.initialize` before JAX is used:
  explicit   coordinator address, process count and this process's id (flags of `dsv4 train`);
  auto       coordinator "auto": JAX's cluster detection (what launch/tpu_pod.sh passes);
  detected   under SLURM with more than one task, and on a Cloud TPU VM slice of more than one worker, JAX
             finds all three itself (its cluster detection);
  otherwise  one process: nothing to do.
On CPU the processes exchange collectives over Gloo (TCP), which is what the loopback tests use.
After it, `jax.devices()` lists every process's devices; each process feeds only its own (the batch rows
of its data shards, train/placement.py) and process 0 alone prints, writes metrics and commits checkpoints
(Orbax: every process writes the shards it holds).
"""

from __future__ import annotations

import json
import os

import jax
import numpy as np
from jax.experimental import multihost_utils

from dsv4_jax.config import ConfigError


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, heartbeat_timeout_seconds: int = 100) -> None:
  """Joins this process to its run (see the module docstring). A process that stops answering for
  `heartbeat_timeout_seconds` makes the others fail instead of waiting for it forever."""
  if coordinator == "auto":   # a cluster JAX detects itself (Cloud TPU slice, SLURM, ...)
    if num_processes is not None or process_id is not None:
      raise ConfigError("--coordinator=auto: JAX finds the process count and ids; drop --num_processes and --process_id")
    jax.distributed.initialize(heartbeat_timeout_seconds=heartbeat_timeout_seconds)
    return
  explicit = (coordinator, num_processes, process_id)
  if any(value is not None for value in explicit) and None in explicit:
    raise ConfigError("--coordinator, --num_processes and --process_id: give all three, or none (SLURM and Cloud "
                      f"TPU are detected), got {dict(zip(('coordinator', 'num_processes', 'process_id'), explicit))}")
  if coordinator is None and not _cluster_detected():
    return
  if coordinator is not None and not 0 <= process_id < num_processes:
    raise ConfigError(f"--process_id: expected 0 <= process_id < --num_processes ({num_processes}), got {process_id}")
  jax.config.update("jax_cpu_collectives_implementation", "gloo")   # CPU devices only; GPUs / TPUs keep theirs
  jax.distributed.initialize(coordinator, num_processes, process_id,
                             heartbeat_timeout_seconds=heartbeat_timeout_seconds)


def _cluster_detected() -> bool:
  """A SLURM job of several tasks, or a Cloud TPU VM of a multi-worker slice."""
  if int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    return True
  return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")


def is_primary() -> bool:
  """Whether this is process 0, the one that prints and writes the run's files."""
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process gets here (nothing to wait for with one process)."""
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices(name)


def all_processes(value) -> list:
  """Every process's `value` (anything JSON can hold), in process order; [value] with one process."""
  if jax.process_count() == 1:
    return [value]
  text = np.frombuffer(json.dumps(value).encode(), np.uint8)
  longest = int(np.max(multihost_utils.process_allgather(np.array([text.size]))))
  padded = np.zeros(longest, np.uint8)
  padded[:text.size] = text
  gathered = np.asarray(multihost_utils.process_allgather(padded)).reshape(jax.process_count(), longest)
  return [json.loads(bytes(row).rstrip(b"\0").decode()) for row in gathered]


def check_agreement(what: str, value) -> None:
  """ConfigError unless every process holds the same `value` (e.g. the config's fingerprint)."""
  values = all_processes(value)
  differing = {index: v for index, v in enumerate(values) if v != values[0]}
  if differing:
    raise ConfigError(f"the processes disagree on the {what}: process 0 has {values[0]!r}, "
                      + ", ".join(f"process {index} has {v!r}" for index, v in differing.items())
                      + "; start every process with the same config and flags")
