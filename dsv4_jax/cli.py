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
