"""The built wheel, not the checkout: build it from a copy of the sources, install it without
dependencies into a directory outside the repository, and run `dsv4 train --config tiny` and
`dsv4 cache-size --config flash` from it (every package and the shipped configs must be in the wheel).

The editable install's import hook (a .pth file in site-packages) would find the checkout instead, so
the wheel's code runs under `python -S` (no site, no .pth files) with sys.path = the cwd (a temporary
directory), the install directory, then the venv's site-packages for the dependencies."""

import glob
import json
import os
import shutil
import subprocess
import sys
import sysconfig

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOURCES = ("setup.py", "README.md", "configs", "dsv4_jax", "pallas_kernels")
# Two steps of a one-layer, window-only configs/tiny.yaml at 2 x 128 tokens: compiles in seconds.
SMALL = [f"--set={kv}" for kv in ("curriculum.0.seq_len=128", "train.tokens_per_batch=256",
                                   "model.num_hidden_layers=1", "model.num_nextn_predict_layers=0",
                                   "model.compress_ratios=[0]", "model.hc_sinkhorn_iters=2")]


def _can_build_wheels() -> bool:
  try:
    import setuptools
  except ImportError:
    return False
  try:
    import wheel  # noqa: F401  (setuptools < 70.1 needs it for bdist_wheel)
    return True
  except ImportError:
    return tuple(int(p) for p in setuptools.__version__.split(".")[:2]) >= (70, 1)


def _run(args, cwd, env, timeout=240):
  proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, f"{args}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
  return proc


@pytest.mark.skipif(not _can_build_wheels(), reason="needs setuptools >= 70.1 (or wheel) to build a wheel offline")
def test_wheel_installs_and_runs_outside_the_checkout(tmp_path):
  src, dist, target, cwd = (tmp_path / d for d in ("src", "dist", "target", "cwd"))
  src.mkdir()
  cwd.mkdir()
  for name in SOURCES:  # a copy: the build writes build/ and *.egg-info next to setup.py
    path = os.path.join(REPO, name)
    if os.path.isdir(path):
      shutil.copytree(path, src / name, ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    else:
      shutil.copy(path, src / name)
  env = {**os.environ, "JAX_PLATFORMS": "cpu", "PIP_NO_INPUT": "1", "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
  env.pop("PYTHONPATH", None)
  env.pop("DSV4_DEBUG", None)
  pip = [sys.executable, "-m", "pip"]
  _run(pip + ["wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(dist), str(src)], cwd, env)
  (wheel,) = glob.glob(str(dist / "dsv4_jax-*.whl"))
  _run(pip + ["install", "-q", "--no-deps", "--target", str(target), wheel], cwd, env)
  for package in ("dsv4_jax/train", "dsv4_jax/configs"):
    assert os.path.isfile(target / package / "__init__.py"), package

  site = dict.fromkeys(sysconfig.get_paths()[k] for k in ("purelib", "platlib"))
  run_env = {**env, "PYTHONPATH": os.pathsep.join([str(target), *site])}
  python = [sys.executable, "-S"]
  proc = _run(python + ["-c", "import dsv4_jax, dsv4_jax.train, dsv4_jax.config.shipped as s; "
                        "print(dsv4_jax.__file__); print(s.resolve_config('tiny'))"], cwd, run_env)
  module, tiny = proc.stdout.split()
  assert module == str(target / "dsv4_jax" / "__init__.py"), module
  assert tiny == str(target / "dsv4_jax" / "configs" / "tiny.yaml"), tiny

  run_dir = tmp_path / "run"
  _run(python + ["-m", "dsv4_jax.cli", "train", "--config", "tiny", "--mesh", "fsdp", "--max_steps", "2", "--progress=false",
                 "--set", f"train.run_dir={run_dir}", "--set", "train.eval_every=0",
                 *SMALL], cwd, run_env)
  with open(run_dir / "config.json") as f:
    assert json.load(f)["mesh"]["fsdp"] == -1   # the shipped preset configs/meshes/fsdp.yaml
  proc = _run(python + ["-m", "dsv4_jax.cli", "cache-size", "--config", "flash", "--context", "4096"],
              cwd, run_env)
  assert proc.stdout.strip()
