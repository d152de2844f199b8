"""Loss-spike detection and recovery: robust running statistics, in-memory snapshots, rollback.

Detector (`SpikeDetector`): the training loss (and log gradient norm) of the last `window` steps of
the current curriculum stage; with m their median and σ = 1.4826 · median(|x − m|) (the MAD, scaled
to a Gaussian's standard deviation), a step is a spike when

  loss > m + max(loss_deviations · σ, loss_min_rise · m)                    (or the loss is not finite)
  log g > m_g + max(grad_norm_deviations · σ_g, log(1 + grad_norm_min_rise))  (g: gradient norm; off at 0)

once `min_history` steps are known. Spikes do not enter the statistics. The history restarts at each
curriculum stage (another sequence length has another loss) and is cut back on a rollback.

Steps are numbered as in metrics.jsonl and checkpoints: step n is the n-th update, its loss is that
of the state after n − 1 updates on the n-th batch.

Recovery (`StabilityController`, driven by loop.py): the train state is copied to host memory every
`rollback_steps` steps (and when a process starts), the newest two copies kept. On a spike at step n
the state goes back to the newest copy of a state ≤ n − 1 − rollback_steps (or the oldest one), the
data stream rewinds to that step (`replay`) or continues after the spike's batch (`skip`, and for
any spike while still recovering: in the replayed steps or the anticipation period of an earlier
rollback), and anticipatory routing (anticipatory.py) runs for `routing_steps` steps. More than
`max_rollbacks_in_a_row` rollbacks before one recovery completes stop the run (SpikeRecoveryError).
Every event is logged on one line and written to metrics.jsonl (kind "event").

Everything but the snapshots is saved with checkpoints (`state_dict` / `load`): a resumed run
continues detection, counters and an active period exactly; it has no snapshot older than its first
step, so a spike within about 2 · rollback_steps steps of a resume rolls back less far than it
would have without the interruption.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from dsv4_jax.config.stability import StabilityConfig

MAD_TO_SIGMA = 1.4826


class SpikeRecoveryError(RuntimeError):
  """Rollbacks did not stop the spikes: too many in a row (stability.max_rollbacks_in_a_row)."""


@dataclasses.dataclass(frozen=True)
class Spike:
  """A detected spike: the step, its loss and gradient norm, the thresholds they were held against
  (NaN while a statistic is not armed), the reason ("loss", "grad_norm", "non-finite") and the median loss."""
  step: int
  loss: float
  threshold: float
  grad_norm: float
  grad_norm_threshold: float
  reason: str
  median: float


def robust_stats(values) -> tuple[float, float]:
  """(median, 1.4826 · median absolute deviation) of `values`."""
  v = np.asarray(values, np.float64)
  median = float(np.median(v))
  return median, MAD_TO_SIGMA * float(np.median(np.abs(v - median)))


class SpikeDetector:
  """Robust running statistics of the loss and log gradient norm (see the module docstring)."""

  def __init__(self, cfg: StabilityConfig):
    self.cfg = cfg
    self.stage: int | None = None
    self.history: list[tuple[int, float, float]] = []   # (step, loss, gradient norm), oldest first

  def thresholds(self) -> tuple[float, float, float]:
    """(loss threshold, gradient-norm threshold, median loss); NaN while not armed (or a check is off)."""
    recent = self.history[-self.cfg.window:]
    if len(recent) < self.cfg.min_history:
      return math.nan, math.nan, math.nan
    c = self.cfg
    median, sigma = robust_stats([loss for _, loss, _ in recent])
    loss_threshold = median + max(c.loss_deviations * sigma, c.loss_min_rise * abs(median))
    grad_threshold = math.nan
    norms = [math.log(g) for _, _, g in recent if g > 0]
    if c.grad_norm_deviations > 0 and len(norms) >= c.min_history:
      g_median, g_sigma = robust_stats(norms)
      grad_threshold = math.exp(g_median + max(c.grad_norm_deviations * g_sigma, math.log1p(c.grad_norm_min_rise)))
    return loss_threshold, grad_threshold, median

  def observe(self, step: int, stage: int, loss: float, grad_norm: float) -> Spike | None:
    """Judges the loss / gradient norm of step number `step` (of curriculum stage `stage`); a spike is
    returned and left out of the history, anything else is added to it."""
    if stage != self.stage:
      self.stage, self.history = stage, []
    loss_threshold, grad_threshold, median = self.thresholds()
    reason = None
    if not (math.isfinite(loss) and math.isfinite(grad_norm)):
      reason = "non-finite"
    elif loss > loss_threshold:   # False while NaN (not armed)
      reason = "loss"
    elif grad_norm > grad_threshold:
      reason = "grad_norm"
    if reason is not None:
      return Spike(step, loss, loss_threshold, grad_norm, grad_threshold, reason, median)
    self.history.append((step, loss, grad_norm))
    del self.history[:-self.cfg.window]
    return None

  def truncate(self, step: int) -> None:
    """Forgets the steps after `step` (a rollback to the state after `step` updates)."""
    self.history = [h for h in self.history if h[0] <= step]

  def state_dict(self) -> dict:
    return {"stage": self.stage, "history": [list(h) for h in self.history]}

  def load(self, state: dict) -> None:
    self.stage = state.get("stage")
    self.history = [(int(s), float(loss), float(g)) for s, loss, g in state.get("history", [])]


@dataclasses.dataclass
class Snapshot:
  """A host copy of the train state after `step` updates (its leaves), and the data position of the
  next batch."""
  step: int
  state: Any
  data_state: dict | None


class StabilityController:
  """Detector, snapshots, counters and the rollback decision (the loop applies it)."""

  def __init__(self, cfg: StabilityConfig):
    self.cfg = cfg
    self.detector = SpikeDetector(cfg)
    self.snapshots: list[Snapshot] = []
    self.shardings, self.treedef = None, None   # of the train state's leaves
    self.spikes = 0
    self.rollbacks = 0
    self.in_a_row = 0              # rollbacks since the last completed recovery
    self.recovering_until = -1     # a spike at a step ≤ this one happens while recovering from the last
    self.fault_done = False

  # --- snapshots ------------------------------------------------------------------------------------
  def maybe_snapshot(self, step: int, state, data_state: dict | None, *, first: bool = False) -> bool:
    """`state` after `step` updates, whose next batch is read from `data_state`: copied to the host every
    rollback_steps steps (and at a process's first step), the newest two copies kept."""
    if not self.cfg.enabled or not (first or step % self.cfg.rollback_steps == 0):
      return False
    if any(s.step == step for s in self.snapshots):
      return False
    leaves, self.treedef = jax.tree.flatten(state)
    self.shardings = [getattr(x, "sharding", None) for x in leaves]   # None: a host array
    self.snapshots.append(Snapshot(step, [_to_host(x) for x in leaves], data_state))
    self.snapshots = self.snapshots[-2:]
    return True

  def rollback_target(self, spike_step: int) -> Snapshot:
    """The newest snapshot at least rollback_steps updates before the state whose loss spiked at step
    `spike_step` (else the oldest one)."""
    if not self.snapshots:
      raise SpikeRecoveryError(f"step {spike_step}: a loss spike, and no snapshot of the train state to roll back to")
    old_enough = [s for s in self.snapshots if s.step <= spike_step - 1 - self.cfg.rollback_steps]
    return old_enough[-1] if old_enough else self.snapshots[0]

  def restore(self, snapshot: Snapshot):
    """The snapshot's train state back on the devices (with the shardings it had); later snapshots
    (of the abandoned steps) are dropped."""
    self.snapshots = [s for s in self.snapshots if s.step <= snapshot.step]
    return self.treedef.unflatten([_to_device(host, sharding)
                                   for host, sharding in zip(snapshot.state, self.shardings, strict=True)])

  # --- decisions ------------------------------------------------------------------------------------
  def observe(self, step: int, stage: int, loss: float, grad_norm: float) -> Spike | None:
    """After training `step`: a Spike when recovery is needed (counted), else None."""
    if not self.cfg.enabled:
      return None
    spike = self.detector.observe(step, stage, loss, grad_norm)
    if spike is not None:
      self.spikes += 1
    elif step > self.recovering_until:   # the replay and the anticipation period went by without a spike
      self.in_a_row = 0
    return spike

  def plan_rollback(self, spike: Spike, anticipation_steps: int) -> tuple[Snapshot, str]:
    """-> (the snapshot to restore, "replay" or "skip"), counted. The caller restores it, then stops the
    run if there were too many in a row (`too_many`), so that it stops on a clean state."""
    target = self.rollback_target(spike.step)
    action = "skip" if self.cfg.on_spike == "skip" or spike.step <= self.recovering_until else "replay"
    self.rollbacks += 1
    self.in_a_row += 1
    self.recovering_until = max(spike.step, target.step + anticipation_steps)
    self.detector.truncate(target.step)
    return target, action

  def too_many(self) -> bool:
    return self.in_a_row > self.cfg.max_rollbacks_in_a_row

  # --- fault injection (testing) --------------------------------------------------------------------
  def fault_due(self, step: int, kind: str) -> bool:
    """Whether the configured test fault of `kind` fires at step number `step` (once per run)."""
    c = self.cfg
    return c.fault_step is not None and not self.fault_done and c.fault_kind == kind and step == c.fault_step

  def corrupt_batch(self, batch: dict, vocab_size: int) -> dict:
    """fault_kind "batch": the batch with its targets replaced by uniformly random tokens."""
    self.fault_done = True
    rng = np.random.default_rng(self.cfg.fault_step)
    targets = rng.integers(0, vocab_size, np.shape(batch["targets"])).astype(np.asarray(batch["targets"]).dtype)
    return {**batch, "targets": targets}

  def scale_update(self, before, after):
    """fault_kind "update": params θ + fault_scale · (θ' − θ) from the params before / after the step."""
    self.fault_done = True
    scale = self.cfg.fault_scale
    return jax.tree.map(lambda a, b: (a + scale * (b - a)).astype(b.dtype), before, after)

  # --- checkpointing --------------------------------------------------------------------------------
  def state_dict(self) -> dict:
    return {"detector": self.detector.state_dict(), "spikes": self.spikes, "rollbacks": self.rollbacks,
            "in_a_row": self.in_a_row, "recovering_until": self.recovering_until, "fault_done": self.fault_done}

  def load(self, state: dict | None) -> None:
    if not state:
      return
    self.detector.load(state.get("detector", {}))
    self.spikes, self.rollbacks = int(state.get("spikes", 0)), int(state.get("rollbacks", 0))
    self.in_a_row, self.recovering_until = int(state.get("in_a_row", 0)), int(state.get("recovering_until", -1))
    self.fault_done = bool(state.get("fault_done", False))


@dataclasses.dataclass
class _Shards:
  """Host copies of this process's shards of an array that spans processes."""
  shape: tuple[int, ...]
  data: list[tuple[Any, np.ndarray]]   # (device, shard)


def _to_host(x):
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    return _Shards(x.shape, [(shard.device, np.asarray(shard.data)) for shard in x.addressable_shards])
  return np.asarray(jax.device_get(x))


def _to_device(host, sharding):
  if isinstance(host, _Shards):
    return jax.make_array_from_single_device_arrays(
        host.shape, sharding, [jax.device_put(data, device) for device, data in host.data])
  return jax.device_put(host, sharding)


def copy_params(params):
  """A device copy of `params` (the train step donates its input)."""
  return jax.tree.map(jnp.copy, params)
