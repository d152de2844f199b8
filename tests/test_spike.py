"""Loss spikes: the detector's statistics and recovery decisions, and real `dsv4 train` runs of the
(shrunk) tiny config: a clean 200-step run raises no alarm; the same run with a corrupted batch at a
known step detects it there, rolls back, routes anticipatorily for the configured period, then stops,
and ends within 5% of the clean run's loss; stopped in the middle of that period and resumed, it
continues bit-exactly.

To save time the faulty run starts from the clean run's checkpoint of step 100 (`--resume` with the
fault configured: the stability section is not part of the config fingerprint): up to there the two
runs are the same run (training is deterministic), so nothing is lost. Checkpoints every 25 steps,
all kept: the faulty run writes one at step 125, in the middle of its anticipatory-routing period."""

from __future__ import annotations

import math
import os
import shutil

import jax.numpy as jnp
import numpy as np
import pytest
import yaml

from dsv4_jax.config import ConfigError, StabilityConfig, TrainConfig
from dsv4_jax.train.checkpoint import TrainCheckpointer, flatten_named
from dsv4_jax.train.loop import init_state
from dsv4_jax.train.metrics import plot_run, read_metrics, stability_periods
from dsv4_jax.train.spike import SpikeDetector, StabilityController
from helpers import train_cli
from test_anticipatory import small_tiny_run

FAULT = ("--set=stability.fault_step=120", "--set=stability.routing_steps=20")   # kind "batch", delay 2


# --- the detector and the controller on their own ------------------------------------------------

def test_detector_threshold_is_median_plus_scaled_mad():
  cfg = StabilityConfig(window=8, min_history=5, loss_deviations=4.0, loss_min_rise=0.05, grad_norm_deviations=0)
  detector = SpikeDetector(cfg)
  losses = [3.0, 2.9, 3.1, 2.8, 3.05, 2.95, 2.7, 2.85, 2.9, 2.75]
  for step, loss in enumerate(losses[:4], 1):   # not armed before min_history steps
    assert detector.observe(step, 0, 100.0 if step == 4 else loss, 1.0) is None
  detector = SpikeDetector(cfg)
  for step, loss in enumerate(losses, 1):
    assert detector.observe(step, 0, loss, 1.0) is None
  recent = np.array(losses[-8:])
  median = np.median(recent)
  sigma = 1.4826 * np.median(np.abs(recent - median))
  threshold = median + max(4.0 * sigma, 0.05 * median)
  assert detector.thresholds()[0] == pytest.approx(threshold, rel=1e-12)
  assert detector.observe(11, 0, threshold * 0.999, 1.0) is None
  spike = detector.observe(12, 0, threshold * 1.01 + 0.1, 1.0)
  assert spike is not None and spike.reason == "loss" and spike.step == 12
  assert [h[0] for h in detector.history][-1] == 11   # the spike is kept out of the statistics
  assert detector.observe(13, 0, math.nan, 1.0).reason == "non-finite"
  assert detector.observe(14, 0, 2.9, math.inf).reason == "non-finite"
  detector.truncate(8)
  assert [h[0] for h in detector.history][-1] == 8
  assert detector.observe(15, 1, 50.0, 1.0) is None and len(detector.history) == 1   # a new stage: new history


def test_detector_gradient_norm_check_and_its_floor():
  cfg = StabilityConfig(window=16, min_history=8, grad_norm_deviations=3.0, grad_norm_min_rise=1.0)
  detector = SpikeDetector(cfg)
  norms = [1.0, 1.1, 0.9, 1.05, 0.95, 1.0, 1.02, 0.98]
  for step, g in enumerate(norms, 1):
    assert detector.observe(step, 0, 3.0, g) is None
  logs = np.log(norms)
  m = np.median(logs)
  sigma = 1.4826 * np.median(np.abs(logs - m))
  expected = math.exp(m + max(3.0 * sigma, math.log(2.0)))   # the floor: twice the median here
  assert detector.thresholds()[1] == pytest.approx(expected, rel=1e-12) and expected == pytest.approx(2.0, rel=0.05)
  assert detector.observe(9, 0, 3.0, 1.9) is None
  assert detector.observe(10, 0, 3.0, 2.2).reason == "grad_norm"


def test_controller_rollback_targets_skip_escalation_and_snapshot_restore():
  """Snapshots every rollback_steps steps, the newest two kept; the target is the newest at least
  rollback_steps updates before the spiking state; a spike while recovering skips; too many in a row
  is reported; a snapshot restores bit-exactly."""
  cfg = StabilityConfig(rollback_steps=5, max_rollbacks_in_a_row=2)
  controller = StabilityController(cfg)
  state = {"w": jnp.arange(6.0).reshape(2, 3), "n": jnp.int32(7)}
  for step in range(3, 24):
    controller.maybe_snapshot(step, {"w": state["w"] + step, "n": state["n"]}, {"at": step}, first=step == 3)
  assert [s.step for s in controller.snapshots] == [15, 20]
  target = controller.rollback_target(24)   # the state after 23 updates spiked: at most 23 − 5 = 18
  assert target.step == 15 and controller.rollback_target(27).step == 20
  restored = controller.restore(target)
  np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(state["w"] + 15))
  assert restored["n"].dtype == jnp.int32 and int(restored["n"]) == 7

  controller = StabilityController(cfg)
  controller.maybe_snapshot(10, state, {}, first=True)
  first, action = controller.plan_rollback(_spike(30), anticipation_steps=20)
  assert (first.step, action, controller.recovering_until) == (10, "replay", 30)
  _, action = controller.plan_rollback(_spike(25), anticipation_steps=20)   # while recovering
  assert action == "skip" and not controller.too_many()
  controller.plan_rollback(_spike(12), anticipation_steps=20)
  assert controller.too_many() and controller.rollbacks == 3


def _spike(step):
  from dsv4_jax.train.spike import Spike
  return Spike(step, 9.0, 5.0, 1.0, math.nan, "loss", 3.0)


def test_stability_section_is_typed_and_on_by_default():
  cfg = TrainConfig.from_dict(small_tiny_run())
  assert cfg.stability == StabilityConfig() and cfg.stability.enabled
  raw = small_tiny_run()
  raw["stability"] = {"routing_delay": 4, "on_spike": "skip"}
  assert TrainConfig.from_dict(raw).stability.routing_delay == 4
  for bad, message in [({"on_spike": "panic"}, r"stability\.on_spike: expected one of \('replay', 'skip'\)"),
                       ({"min_history": 100}, r"stability\.min_history: expected an integer in 1\.\.window"),
                       ({"routing_delay": "soon"}, r"stability\.routing_delay: expected an integer, got 'soon'"),
                       ({"delay": 3}, r"unknown stability keys \['delay'\]")]:
    with pytest.raises(ConfigError, match=message):
      TrainConfig.from_dict({**raw, "stability": bad})


# --- real runs ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  root = tmp_path_factory.mktemp("spike")
  raw = small_tiny_run(steps=200)
  raw["train"].update(checkpoint_every=25, keep_checkpoints=10)
  (root / "run.yaml").write_text(yaml.safe_dump(raw))
  return root


def _cli(workdir, run_dir, *flags):
  """`dsv4 train` in a subprocess (one persistent compilation cache for the module) -> its output."""
  result = train_cli(workdir / "run.yaml", run_dir, workdir / "cache", *flags)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


def _train(run_dir):
  """step -> the step's train record (the last one written: a rollback writes its steps again)."""
  return {r["step"]: r for r in read_metrics(run_dir) if r["kind"] == "train"}


def _events(run_dir):
  return [r for r in read_metrics(run_dir) if r["kind"] == "event"]


@pytest.fixture(scope="module")
def clean(workdir):
  out = _cli(workdir, workdir / "clean")
  return workdir / "clean", out


def _as_at(source, run_dir, step):
  """A copy of the run directory `source` as a run killed just after its checkpoint of `step` left it
  (the later checkpoints removed; the resumed run drops the later metrics records itself)."""
  shutil.copytree(source, run_dir)
  for name in os.listdir(run_dir / "checkpoints"):
    if int(name) > step:
      shutil.rmtree(run_dir / "checkpoints" / name)
  return run_dir


@pytest.fixture(scope="module")
def faulty(workdir, clean):
  run_dir = _as_at(clean[0], workdir / "faulty", 100)
  out = _cli(workdir, run_dir, *FAULT, "--resume")
  return run_dir, out


def test_clean_run_raises_no_alarm(clean):
  run_dir, out = clean
  assert "[stability]" not in out
  records = _train(run_dir)
  assert sorted(records) == list(range(1, 201)) and not _events(run_dir)
  assert all(r["spikes"] == 0 and r["rollbacks"] == 0 and r["anticipation"] == 0 for r in records.values())


def test_injected_spike_is_detected_rolled_back_and_recovered(clean, faulty):
  (clean_dir, _), (run_dir, out) = clean, faulty
  lines = [line for line in out.splitlines() if line.startswith("[stability]")]
  assert len(lines) == 3, out[-3000:]
  assert lines[0] == "[stability] step 120: fault injection (stability.fault_step): random targets in this batch"
  assert lines[1].startswith("[stability] step 120: loss spike, loss ") and " > threshold " in lines[1]
  assert lines[1].endswith(": rolled back to step 110, replaying the batches from there; anticipatory routing "
                           "for 20 steps (delay 2)")
  assert lines[2].startswith("[stability] step 130: recovered, loss ")

  spike, off = _events(run_dir)
  assert spike["event"] == "spike" and spike["step"] == 120 and spike["reason"] == "loss"
  assert spike["loss"] > spike["threshold"] > spike["median"] and spike["rollback_to"] == 110
  assert spike["data"] == "replay" and spike["anticipation_steps"] == 20
  assert off["event"] == "anticipation_off" and off["step"] == 130

  clean_records, records = _train(clean_dir), _train(run_dir)
  assert sorted(records) == list(range(1, 201))
  active = [step for step, r in records.items() if r["anticipation"]]
  assert active == list(range(111, 131))
  assert all(r["rollbacks"] == r["spikes"] == (step > 110) for step, r in records.items())
  for step in range(1, 112):   # the same run up to the fault; the rollback restored step 110 exactly, and
    assert records[step]["loss"] == clean_records[step]["loss"], step   # step 111 routes with θ_110, its own
  assert any(records[s]["loss"] != clean_records[s]["loss"] for s in range(112, 131))
  final, final_clean = records[200]["loss"], clean_records[200]["loss"]
  assert abs(final - final_clean) < 0.05 * final_clean, (final, final_clean)

  assert stability_periods(read_metrics(run_dir)) == [
      {"step": 120, "loss": spike["loss"], "rollback_to": 110, "active": (111, 130)}]
  assert os.path.getsize(plot_run(str(run_dir))) > 0


def test_resume_in_the_middle_of_anticipatory_routing_is_bit_exact(workdir, faulty, tmp_path):
  """The faulty run killed just after its checkpoint of step 125 (anticipatory routing active for steps
  111..130, the indices of steps 126 and 127 computed and stored) and resumed: the same records,
  events and final state as the uninterrupted run."""
  run_dir, _ = faulty
  split = _as_at(run_dir, tmp_path / "split", 125)
  assert (split / "checkpoints" / "125" / "routing").is_dir()
  _cli(workdir, split, *FAULT, "--resume")

  def comparable(records):
    return {s: {k: v for k, v in r.items() if k != "tokens_per_second"} for s, r in records.items()}

  assert comparable(_train(split)) == comparable(_train(run_dir))
  assert _events(split) == _events(run_dir)
  cfg = TrainConfig.from_dict(small_tiny_run(steps=200))
  _, target, _ = init_state(cfg)
  states = []
  for directory in (run_dir, split):
    ckpt = TrainCheckpointer(str(directory / "checkpoints"), keep=10, save_every=25)
    try:
      states.append(ckpt.restore(200, target))
    finally:
      ckpt.close()
  (a, data_a, meta_a), (b, data_b, meta_b) = states
  assert data_a == data_b and meta_a == meta_b
  for name, value in flatten_named(a).items():
    np.testing.assert_array_equal(np.asarray(value), np.asarray(flatten_named(b)[name]), err_msg=name)
