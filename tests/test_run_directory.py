"""One run per run directory: `dsv4 train` refuses to mix a new run into an old one (--overwrite starts
over), --resume needs a checkpoint (--resume=auto does not), a corrupt newest checkpoint is named and the
previous one resumes bit-exactly, and resuming a finished run says so."""

import glob
import json
import os
import shutil

import numpy as np
import pytest
import yaml

from dsv4_jax.config import TrainConfig
from dsv4_jax.train.checkpoint import (CheckpointRestoreError, RunDirectoryError, TrainCheckpointer,
                                       flatten_named)
from dsv4_jax.train.loop import init_state, train
from helpers import train_cli

STEPS = 6
RUN = {
    "model": dict(vocab_size=260, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, head_dim=32,
                  q_lora_rank=16, o_groups=2, o_lora_rank=8, qk_rope_head_dim=8, sliding_window=16,
                  compress_ratios=[0, 0], index_n_heads=4, index_head_dim=16, index_topk=4,
                  n_routed_experts=2, num_experts_per_tok=1, moe_intermediate_size=16, num_hash_layers=0,
                  attention_chunk_size=128),
    "data": {"source": "stdlib", "prefetch_batches": 0, "num_threads": 1},
    "optimizer": {"learning_rate": 1e-3, "warmup_steps": 2},
    "curriculum": [{"seq_len": 128, "steps": STEPS, "attention": "dense"}],
    "train": {"tokens_per_batch": 256, "log_every": 1, "eval_every": 0, "checkpoint_every": 2,
              "keep_checkpoints": 3},
}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
  root = tmp_path_factory.mktemp("run_directory")
  (root / "run.yaml").write_text(yaml.safe_dump(RUN))
  return root


def _cli(workdir, run_dir, *flags):
  """`dsv4 train` in a subprocess (sharing one persistent compilation cache) -> (return code, output)."""
  result = train_cli(workdir / "run.yaml", run_dir, workdir / "cache", *flags)
  return result.returncode, result.stdout + result.stderr


@pytest.fixture(scope="module")
def finished_run(workdir):
  """A complete run of STEPS steps (checkpoints at 2, 4, 6) started by --resume=auto in a directory that
  does not exist yet -> (run directory, to be copied and never changed; the command's output)."""
  run_dir = workdir / "finished"
  code, out = _cli(workdir, run_dir, "--resume=auto")
  assert code == 0, out[-3000:]
  return run_dir, out


@pytest.fixture(scope="module")
def finished(finished_run):
  return finished_run[0]


def _copy(run_dir, tmp_path, name="run"):
  return shutil.copytree(run_dir, tmp_path / name)


def _config(run_dir):
  return TrainConfig.from_dict({**RUN, "train": {**RUN["train"], "run_dir": str(run_dir)}})


def _snapshot(root):
  """Every path under root with its mtime (and a file's bytes)."""
  found = {}
  for dirpath, _, filenames in os.walk(root):
    found[os.path.relpath(dirpath, root)] = os.stat(dirpath).st_mtime_ns
    for name in filenames:
      path = os.path.join(dirpath, name)
      with open(path, "rb") as f:
        found[os.path.relpath(path, root)] = (os.stat(path).st_mtime_ns, f.read())
  return found


def _records(run_dir, kind="train"):
  with open(os.path.join(run_dir, "metrics.jsonl")) as f:
    return [r for r in map(json.loads, f) if r["kind"] == kind]


def _final_state(run_dir, step=STEPS):
  _, target, _ = init_state(_config(run_dir))
  ckpt = TrainCheckpointer(os.path.join(run_dir, "checkpoints"), keep=3, save_every=2)
  try:
    state, data_state, _ = ckpt.restore(step, target)
  finally:
    ckpt.close()
  return flatten_named(state), data_state


def test_fresh_run_refuses_a_directory_holding_a_run_and_changes_nothing(finished, workdir, tmp_path):
  run_dir = _copy(finished, tmp_path)
  before = _snapshot(run_dir)
  code, out = _cli(workdir, run_dir)
  assert code != 0
  assert "already holds a run" in out and "--resume" in out and "--overwrite" in out, out[-3000:]
  assert f"checkpoints at steps [2, 4, 6], metrics.jsonl with {STEPS} records" in out
  assert _snapshot(run_dir) == before
  with pytest.raises(RunDirectoryError, match="already holds a run"):   # the same through the API
    train(_config(run_dir), progress=False)
  with pytest.raises(RunDirectoryError, match="use one of them"):
    train(_config(run_dir), resume=True, overwrite=True, progress=False)
  assert _snapshot(run_dir) == before
  assert issubclass(RunDirectoryError, CheckpointRestoreError)


def test_overwrite_starts_clean(finished, workdir, tmp_path):
  run_dir = _copy(finished, tmp_path)
  (run_dir / "notes.txt").write_text("mine")
  old_tb = set(os.listdir(run_dir / "tb"))
  code, out = _cli(workdir, run_dir, "--overwrite", "--max_steps=1")
  assert code == 0, out[-3000:]
  assert "--overwrite: removed the previous run's checkpoints, metrics.jsonl, tb, config.json" in out
  assert [r["step"] for r in _records(run_dir)] == [1]
  assert sorted(os.listdir(run_dir / "checkpoints")) == ["1"]   # the final checkpoint of a stopped run
  assert not old_tb & set(os.listdir(run_dir / "tb"))
  assert (run_dir / "notes.txt").read_text() == "mine"   # not the run's: kept


def test_resume_without_checkpoint_is_an_error(workdir, tmp_path):
  empty = tmp_path / "empty"
  with pytest.raises(RunDirectoryError, match=r"--resume: no checkpoint in .*--resume=auto"):
    train(_config(empty), resume=True, progress=False)
  assert not empty.exists()
  code, out = _cli(workdir, empty, "--resume")   # the bare flag still means "must resume"
  assert code != 0 and "--resume: no checkpoint in" in out, out[-3000:]
  assert not empty.exists()
  # A directory with metrics but no checkpoint holds a run: resume=auto does not start over it.
  crashed = tmp_path / "crashed"
  crashed.mkdir()
  (crashed / "metrics.jsonl").write_text('{"step": 1, "kind": "train", "loss": 5.0}\n')
  with pytest.raises(RunDirectoryError, match=r"already holds a run \(metrics.jsonl with 1 records\)"):
    train(_config(crashed), resume="auto", progress=False)


def test_resume_auto_without_checkpoint_starts_a_new_run(finished_run):
  run_dir, out = finished_run
  assert "--resume=auto: no checkpoint in" in out and "starting a new run" in out, out[-3000:]
  assert "resumed from" not in out
  assert sorted(os.listdir(run_dir / "checkpoints")) == ["2", "4", "6"]
  assert [r["step"] for r in _records(run_dir)] == list(range(1, STEPS + 1))


def test_corrupt_newest_checkpoint_resumes_from_the_previous_one_bit_exactly(finished, workdir, tmp_path):
  run_dir = _copy(finished, tmp_path)
  state_files = [p for p in glob.glob(str(run_dir / "checkpoints" / "6" / "state" / "**"), recursive=True)
                 if os.path.isfile(p)]
  largest = max(state_files, key=os.path.getsize)   # an array's data: read on every restore
  with open(largest, "r+b") as f:
    f.truncate(os.path.getsize(largest) // 2)
  code, out = _cli(workdir, run_dir, "--resume")
  assert code == 0, out[-3000:]
  assert f"[checkpoint] step 6 is unusable: checkpoint {run_dir / 'checkpoints' / '6'}: restoring failed" in out
  assert "resuming from step 4, the newest checkpoint that restores" in out
  assert "resumed from step 4" in out and "metrics.jsonl: dropped 2 record(s) after step 4" in out
  assert os.path.isdir(run_dir / "unusable_checkpoints" / "6")
  assert sorted(os.listdir(run_dir / "checkpoints")) == ["2", "4", "6"]
  expected, resumed = _final_state(finished), _final_state(run_dir)
  assert expected[1] == resumed[1]   # the data iterator's state
  assert expected[0].keys() == resumed[0].keys()
  for name, value in expected[0].items():
    np.testing.assert_array_equal(np.asarray(resumed[0][name]), np.asarray(value), err_msg=name)
  def losses(run):   # metrics.jsonl holds steps 1..STEPS once each, the same values (timings aside)
    return [{k: v for k, v in r.items() if k != "tokens_per_second"} for r in _records(run)]
  assert losses(run_dir) == losses(finished) and [r["step"] for r in _records(run_dir)] == list(range(1, STEPS + 1))


# Orbax's restore, failing on one item, leaves a TensorStore callback for its closed event loop.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_no_checkpoint_restores(finished, tmp_path):
  run_dir = _copy(finished, tmp_path)
  os.remove(run_dir / "checkpoints" / "6" / "state" / "manifest.ocdbt")
  os.remove(run_dir / "checkpoints" / "4" / "meta" / "metadata")
  shutil.rmtree(run_dir / "checkpoints" / "2" / "data")
  before = _snapshot(run_dir)
  logged = []
  with pytest.raises(CheckpointRestoreError, match="can be restored") as error:   # and says why
    train(_config(run_dir), resume=True, progress=False, log=logged.append)
  message = str(error.value)
  for step, why in [(6, ""), (4, "restoring failed"), (2, "missing item(s) ['data']")]:
    assert f"step {step}: checkpoint {run_dir / 'checkpoints' / str(step)}: {why}" in message, message
    assert any(line.startswith(f"[checkpoint] step {step} is unusable") for line in logged)
  assert _snapshot(run_dir) == before


def test_resuming_a_finished_run_has_nothing_to_do(finished, tmp_path, capsys):
  run_dir = _copy(finished, tmp_path)
  before = _snapshot(run_dir)
  summary = train(_config(run_dir), resume=True, progress=False)   # the CLI prints the same lines, exits 0
  out = capsys.readouterr().out
  assert f"run already complete at step {STEPS}; nothing to do" in out
  assert "nan" not in out.lower() and "train loss" not in out
  assert summary["already_complete"] and summary["steps"] == STEPS
  assert summary["final_loss"] == _records(finished)[-1]["loss"]
  assert _snapshot(run_dir) == before
