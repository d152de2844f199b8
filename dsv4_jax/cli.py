"""`dsv4 <command>`: the command-line entry point (absl flags)."""

from __future__ import annotations

import sys

COMMANDS = {}


def command(name):
  def register(fn):
    COMMANDS[name] = fn
    return fn
  return register


@command("info")
def info(argv):
  """dsv4 info --config CONFIG: layer kinds and parameter counts of a config."""
  from absl import flags
  from dsv4_jax.config import ModelConfig
  from dsv4_jax.convert import expected_tensors
  import numpy as np

  flags.DEFINE_string("config", None, "YAML config or hub config.json", required=True)
  flags.FLAGS(argv)
  path = flags.FLAGS.config
  cfg = ModelConfig.from_hf_config(path) if path.endswith(".json") else ModelConfig.from_yaml(path)
  kinds = {0: "window", 4: "CSA", 128: "HCA"}
  layers = [kinds.get(r, f"ratio {r}") for r in cfg.compress_ratios]
  total = sum(int(np.prod(shape)) for shape, _ in expected_tensors(cfg).values())
  print(f"layers: {layers[:cfg.num_hidden_layers]}  mtp: {layers[cfg.num_hidden_layers:]}")
  print(f"parameters: {total:,}")


@command("train")
def train(argv):
  """dsv4 train --config CONFIG [--set key=value ...] [--resume]: train (see configs/tiny.yaml)."""
  from absl import flags
  flags.DEFINE_string("config", "configs/tiny.yaml", "training YAML (model, data, optimizer, curriculum, train)")
  flags.DEFINE_multi_string("set", [], "override, e.g. --set optimizer.learning_rate=1e-3 --set curriculum.0.steps=50")
  flags.DEFINE_bool("resume", False, "continue from the latest checkpoint in the run directory")
  flags.DEFINE_integer("max_steps", None, "stop after this many steps (the schedule still spans the full run)")
  flags.DEFINE_bool("progress", True, "show a progress bar")
  flags.FLAGS(argv)
  from dsv4_jax.config import TrainConfig
  from dsv4_jax.train.loop import train as run_training

  overrides = {}
  for item in flags.FLAGS.set:
    if "=" not in item:
      raise SystemExit(f"--set {item!r}: expected key=value")
    key, value = item.split("=", 1)
    overrides[key] = value
  cfg = TrainConfig.from_yaml(flags.FLAGS.config, overrides)
  run_training(cfg, resume=flags.FLAGS.resume, max_steps=flags.FLAGS.max_steps, progress=flags.FLAGS.progress)


@command("plot")
def plot(argv):
  """dsv4 plot RUN_DIR: write loss/throughput curves of a run as PNG."""
  from dsv4_jax.train.metrics import plot_run
  if len(argv) != 2:
    raise SystemExit("usage: dsv4 plot RUN_DIR")
  print(plot_run(argv[1]))


@command("verify-kernels")
def verify_kernels(argv):
  """dsv4 verify-kernels: prove the Pallas kernels' index arithmetic with Z3 (PROVED / counterexample)."""
  from pallas_kernels.verify import main as verify_main
  return verify_main()


def main(argv=None):
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] not in COMMANDS:
    print("usage: dsv4 <command> [flags]\ncommands:")
    for name, fn in COMMANDS.items():
      print(f"  {name:16s} {(fn.__doc__ or '').strip().splitlines()[0]}")
    return 2
  return COMMANDS[argv[1]]([f"dsv4 {argv[1]}"] + argv[2:]) or 0


if __name__ == "__main__":
  sys.exit(main())
