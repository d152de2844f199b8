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


@command("generate")
def generate(argv):
  """dsv4 generate --checkpoint DIR --prompt TEXT [--max_new_tokens --temperature --top_p --top_k --seed]: stream text."""
  from absl import flags
  flags.DEFINE_string("checkpoint", None, "checkpoint directory (config.json + safetensors)", required=True)
  flags.DEFINE_string("prompt", None, "prompt text", required=True)
  flags.DEFINE_integer("max_new_tokens", 64, "tokens to generate at most")
  flags.DEFINE_float("temperature", 0.0, "sampling temperature; 0 = greedy")
  flags.DEFINE_float("top_p", 1.0, "nucleus sampling mass (1 = off)")
  flags.DEFINE_integer("top_k", 0, "keep only the k most likely tokens (0 = off)")
  flags.DEFINE_integer("seed", 0, "sampling seed")
  flags.DEFINE_multi_integer("stop_token", [], "extra stop token ids (the tokenizer's EOS always stops)")
  flags.DEFINE_string("dtype", "float32", "parameter / compute dtype: float32 or bfloat16")
  flags.DEFINE_string("cache_storage", None, "KV cache storage: float32, bf16 or mixed (default: dtype)")
  flags.FLAGS(argv)
  import os
  import time
  from dsv4_jax.convert import load_model
  from dsv4_jax.data import ByteTokenizer, HFTokenizer
  from dsv4_jax.inference.sampling import stream

  fl = flags.FLAGS
  model = load_model(fl.checkpoint, dtype=fl.dtype)
  has_tokenizer = os.path.exists(os.path.join(fl.checkpoint, "tokenizer.json"))
  tokenizer = HFTokenizer(fl.checkpoint) if has_tokenizer else ByteTokenizer()
  prompt = [int(i) for i in tokenizer.encode(fl.prompt)]
  if not prompt:
    raise SystemExit("--prompt: the prompt encodes to no tokens")
  limit = min(tokenizer.vocab_size, model.cfg.vocab_size)
  if max(prompt) >= model.cfg.vocab_size:
    raise SystemExit(f"--prompt: token id {max(prompt)} is outside the model's vocabulary ({model.cfg.vocab_size})")
  print(fl.prompt, end="", flush=True)
  generated, shown = [], ""
  start = time.perf_counter()
  for tokens in stream(model, [prompt], max_new_tokens=fl.max_new_tokens, temperature=fl.temperature,
                       top_k=fl.top_k, top_p=fl.top_p, seed=fl.seed,
                       stop_tokens=[tokenizer.eos_id] + list(fl.stop_token), storage=fl.cache_storage):
    token = int(tokens[0])
    if token < 0:
      break
    generated.append(token)
    text = tokenizer.decode([t for t in generated if t < limit])
    if text.endswith("\ufffd"):  # an incomplete UTF-8 sequence: wait for its remaining bytes
      continue
    print(text[len(shown):], end="", flush=True)
    shown = text
  elapsed = time.perf_counter() - start
  text = tokenizer.decode([t for t in generated if t < limit])
  print(text[len(shown):], flush=True)
  print(f"[{len(generated)} tokens in {elapsed:.2f} s, compilation included]", file=sys.stderr)


@command("cache-size")
def cache_size(argv):
  """dsv4 cache-size --config flash|pro|PATH --context N [--storage bf16|mixed]: KV cache bytes vs baselines."""
  from absl import flags
  flags.DEFINE_string("config", "flash", "flash, pro, a YAML config or a hub config.json")
  flags.DEFINE_integer("context", 1 << 20, "context length in tokens")
  flags.DEFINE_enum("storage", "mixed", ["bf16", "mixed", "float32"],
                    "cache storage: bf16, or mixed (FP8 non-RoPE dims + BF16 RoPE dims, as released)")
  flags.FLAGS(argv)
  from dsv4_jax.inference.cache_size import format_report, load_config, report

  fl = flags.FLAGS
  cfg = load_config(fl.config)
  print(format_report(cfg, report(cfg, fl.context, fl.storage), fl.config))


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
