"""`dsv4 <command>`: the command-line entry point (absl flags).

Expected errors (a bad flag or config, a missing file, a malformed checkpoint) print one line
`dsv4 <command>: error: <message>` and exit 2 (usage) or 1 (runtime); `--debug` anywhere on the command
line, or DSV4_DEBUG=1, shows their traceback instead. See `exit_code`.
"""

from __future__ import annotations

import os
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
  from dsv4_jax.config.shipped import resolve_config

  flags.DEFINE_string("config", None, "tiny, flash, pro (shipped), a YAML config or a hub config.json",
                      required=True)
  flags.FLAGS(argv)
  path = resolve_config(flags.FLAGS.config)
  cfg = ModelConfig.from_hf_config(path) if path.endswith(".json") else ModelConfig.from_yaml(path)
  import numpy as np
  from dsv4_jax.convert import expected_tensors  # imports JAX: only once the config is known to be good

  kinds = {0: "window", 4: "CSA", 128: "HCA"}
  layers = [kinds.get(r, f"ratio {r}") for r in cfg.compress_ratios]
  total = sum(int(np.prod(shape)) for shape, _ in expected_tensors(cfg).values())
  print(f"layers: {layers[:cfg.num_hidden_layers]}  mtp: {layers[cfg.num_hidden_layers:]}")
  print(f"parameters: {total:,}")


def _train_config(fl):
  """The TrainConfig of --config, with the --mesh preset's axes and then each --set key=value applied."""
  from dsv4_jax.config import MeshConfig, TrainConfig
  from dsv4_jax.config.shipped import resolve_config, resolve_mesh

  overrides = {}
  if fl.mesh:
    overrides = {f"mesh.{axis}": size for axis, size in MeshConfig.from_yaml(resolve_mesh(fl.mesh)).items()}
  for item in fl.set:
    if "=" not in item:
      raise SystemExit(f"--set {item!r}: expected key=value")
    key, value = item.split("=", 1)
    overrides[key] = value
  return TrainConfig.from_yaml(resolve_config(fl.config), overrides)


@command("train")
def train(argv):
  """dsv4 train --config CONFIG [--mesh PRESET] [--set key=value ...] [--resume[=auto] | --overwrite]: train."""
  from absl import flags
  flags.DEFINE_string("config", "tiny", "tiny, flash, pro (shipped) or a training YAML (model, data, optimizer, "
                      "curriculum, train); an existing path wins over a shipped name")
  flags.DEFINE_multi_string("set", [], "override, e.g. --set optimizer.learning_rate=1e-3 --set curriculum.0.steps=50")
  flags.DEFINE_string("mesh", None, "device mesh preset replacing the config's mesh section: data, fsdp, "
                      "fsdp_expert8, fsdp_context4 (shipped, configs/meshes/) or a YAML file with a mesh: section; "
                      "--set mesh.AXIS=N applies after it")
  flags.DEFINE_enum("resume", "false", ["true", "false", "auto"],
                    "continue the run in train.run_dir from its newest checkpoint that restores: bare --resume "
                    "(= true) requires a checkpoint; --resume=auto resumes if there is one and starts a new "
                    "run otherwise; false (--noresume): a new run, refused if the directory holds a run",
                    case_sensitive=False)
  flags.DEFINE_bool("overwrite", False, "start a new run in a directory that holds one: first delete that run's "
                    "checkpoints, metrics.jsonl, tb/ and config.json")
  flags.DEFINE_integer("max_steps", None, "stop after this many steps (the schedule still spans the full run)")
  flags.DEFINE_bool("progress", True, "show a progress bar")
  flags.DEFINE_string("coordinator", None, "several processes: host:port of process 0 (with --num_processes and "
                      "--process_id), or auto: JAX detects the cluster (SLURM and Cloud TPU slices are also "
                      "detected without the flag)")
  flags.DEFINE_integer("num_processes", None, "several processes: how many")
  flags.DEFINE_integer("process_id", None, "several processes: this one's index, 0 .. num_processes - 1")
  flags.DEFINE_integer("heartbeat_timeout", 100, "several processes: seconds after which a silent process makes "
                       "the others stop with an error")
  resume_args = []   # bare --resume / --noresume (a boolean flag before) -> --resume=true / false
  for arg in argv:
    if resume_args and resume_args[-1] == "--resume=true" and arg.lower() in ("true", "false", "auto"):
      resume_args[-1] = f"--resume={arg}"   # `--resume auto`
    else:
      resume_args.append({"--resume": "--resume=true", "-resume": "--resume=true", "--noresume": "--resume=false",
                          "-noresume": "--resume=false"}.get(arg, arg))
  flags.FLAGS(resume_args)
  cfg = _train_config(flags.FLAGS)
  from dsv4_jax.train import distributed  # imports JAX: only once the config is known to be good
  distributed.initialize(flags.FLAGS.coordinator, flags.FLAGS.num_processes, flags.FLAGS.process_id,
                         heartbeat_timeout_seconds=flags.FLAGS.heartbeat_timeout)
  from dsv4_jax.train.loop import train as run_training

  run_training(cfg, resume=flags.FLAGS.resume,
               overwrite=flags.FLAGS.overwrite, max_steps=flags.FLAGS.max_steps, progress=flags.FLAGS.progress)


@command("plot")
def plot(argv):
  """dsv4 plot RUN_DIR: write loss/throughput curves of a run as PNG."""
  if len(argv) != 2 or argv[1] in ("-h", "--help"):
    raise SystemExit("expected one argument (usage: dsv4 plot RUN_DIR)")
  if not os.path.isdir(argv[1]):
    raise FileNotFoundError(f"{argv[1]}: no such run directory")
  from dsv4_jax.train.metrics import plot_run
  print(plot_run(argv[1]))


@command("verify-kernels")
def verify_kernels(argv):
  """dsv4 verify-kernels: prove the Pallas kernels' index arithmetic with Z3 (PROVED / counterexample)."""
  from pallas_kernels.verify import main as verify_main
  return verify_main()


@command("export")
def export(argv):
  """dsv4 export RUN_DIR OUT [--step N] [--overwrite]: write a training checkpoint in the released layout."""
  from absl import flags
  flags.DEFINE_integer("step", None, "the checkpoint's step (default: the latest that restores)")
  flags.DEFINE_bool("overwrite", False, "replace the contents of OUT when it exists and is not empty")
  rest = flags.FLAGS(argv)[1:]
  if len(rest) != 2:
    raise SystemExit(f"expected two arguments, got {len(rest)} (usage: dsv4 export RUN_DIR OUT [--step N])")
  run_dir, out_dir = rest
  from dsv4_jax.convert import save_checkpoint
  from dsv4_jax.train.export import export_run

  try:
    step = export_run(run_dir, out_dir, flags.FLAGS.step, save=save_checkpoint, overwrite=flags.FLAGS.overwrite)
  except FileExistsError as e:
    raise SystemExit(str(e)) from None
  print(f"exported step {step} of {run_dir} to {out_dir}")


@command("generate")
def generate(argv):
  """dsv4 generate --checkpoint DIR --prompt TEXT [--max_new_tokens --temperature --top_p --top_k --seed]: stream text."""
  from absl import flags
  flags.DEFINE_string("checkpoint", None, "checkpoint directory (config.json + safetensors), or a training run "
                      "directory (its latest checkpoint)", required=True)
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
  from dsv4_jax.train.export import is_run_dir, load_run_model

  fl = flags.FLAGS
  if is_run_dir(fl.checkpoint):   # a training run directory: its latest checkpoint, in memory
    model, step, run_cfg = load_run_model(fl.checkpoint, dtype=fl.dtype, log=lambda m: print(m, file=sys.stderr))
    print(f"[training run {fl.checkpoint}: checkpoint step {step}]", file=sys.stderr)
    tokenizer = ByteTokenizer() if run_cfg.data.tokenizer == "byte" else HFTokenizer(run_cfg.data.tokenizer)
  else:
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


@command("eval")
def evaluate(argv):
  """dsv4 eval --checkpoint DIR [--data PATH ...] [--seq_len N]: bits/byte of a model on a held-out set."""
  from absl import flags
  flags.DEFINE_string("checkpoint", None, "a training run directory (its latest checkpoint, or --step) or a "
                      "checkpoint directory in the released layout", required=True)
  flags.DEFINE_multi_string("data", [], "held-out files or directories, every document evaluated once (default "
                            "for a training run: its validation split)")
  flags.DEFINE_enum("source", "auto", ["auto", "text", "jsonl", "parquet", "array_record"],
                    "how to read --data; auto: *.jsonl, *.parquet, *.array_record by name, else text files")
  flags.DEFINE_string("text_field", "text", "JSONL field / Parquet column holding the text")
  flags.DEFINE_string("file_glob", "*", "file-name pattern for files found inside --data directories")
  flags.DEFINE_integer("seq_len", None, "row length (default: the run's last curriculum stage, else 4096)",
                       lower_bound=1)
  flags.DEFINE_integer("batch_size", 4, "rows per batch", lower_bound=1)
  flags.DEFINE_enum("attention", None, ["dense", "sparse"],
                    "attention of the CSA layers (default: the run's last stage, else sparse)")
  flags.DEFINE_integer("step", None, "a training run's checkpoint step (default: the latest that restores)")
  flags.DEFINE_string("dtype", None, "parameter / compute dtype: float32 or bfloat16 (default: as stored)")
  flags.FLAGS(argv)
  from dsv4_jax.config import ModelConfig
  from dsv4_jax.convert import load_model
  from dsv4_jax.train.evaluation import check_heldout, evaluate_heldout, heldout_data_config, source_kind
  from dsv4_jax.train.export import is_run_dir, load_run_model, read_run_config

  fl = flags.FLAGS
  from_run = is_run_dir(fl.checkpoint)
  if from_run:   # defaults from the run's config; its checkpoint is loaded once the data is known to be good
    run_cfg = read_run_config(fl.checkpoint)
    last_stage = run_cfg.curriculum[-1]
    seq_len, attention = fl.seq_len or last_stage.seq_len, fl.attention or last_stage.attention
    tokenizer, align, data_cfg = run_cfg.data.tokenizer, run_cfg.data.align, run_cfg.data
  else:
    if fl.step is not None:
      raise SystemExit(f"--step: {fl.checkpoint} is a checkpoint directory, not a training run")
    if not fl.data:
      raise SystemExit(f"--data: expected held-out files or directories ({fl.checkpoint} is not a training run, "
                       f"which would have a validation split)")
    model_cfg = ModelConfig.from_hf_config(fl.checkpoint)
    seq_len, attention = fl.seq_len or 4096, fl.attention or "sparse"
    has_tokenizer = os.path.exists(os.path.join(fl.checkpoint, "tokenizer.json"))
    tokenizer = os.path.join(fl.checkpoint, "tokenizer.json") if has_tokenizer else "byte"
    align = max([r for r in model_cfg.compress_ratios if r > 0], default=1)
  if fl.data:
    kind = source_kind(fl.data) if fl.source == "auto" else fl.source
    data_cfg = heldout_data_config(fl.data, source=kind, tokenizer=tokenizer, align=align,
                                   text_field=fl.text_field, file_glob=fl.file_glob)
  check_heldout(data_cfg, seq_len, fl.batch_size)
  if from_run:
    model, step, _ = load_run_model(fl.checkpoint, fl.step, dtype=fl.dtype, log=lambda m: print(m, file=sys.stderr))
    print(f"[training run {fl.checkpoint}: checkpoint step {step}]", file=sys.stderr)
  else:
    model = load_model(fl.checkpoint, dtype=fl.dtype or "float32")
  where = f"{kind} {list(fl.data)}" if fl.data else f"the run's validation split ({data_cfg.source})"
  print(f"[held-out: {where}; rows of {seq_len} tokens, {attention} attention]", file=sys.stderr)
  result = evaluate_heldout(model, data_cfg, seq_len=seq_len, batch_size=fl.batch_size, attention=attention)
  print(f"{result['documents']:,} documents, {result['bytes']:,} bytes, {result['targets']:,} targets in "
        f"{result['rows']:,} rows: loss {result['loss']:.4f} nats/token, {result['bits_per_byte']:.4f} bits/byte")


@command("cache-size")
def cache_size(argv):
  """dsv4 cache-size --config flash|pro|PATH --context N [--storage bf16|mixed]: KV cache bytes vs baselines."""
  from absl import flags
  flags.DEFINE_string("config", "flash", "flash, pro, tiny (shipped), a YAML config or a hub config.json")
  flags.DEFINE_integer("context", 1 << 20, "context length in tokens (positive)", lower_bound=1)
  flags.DEFINE_enum("storage", "mixed", ["bf16", "mixed", "float32"],
                    "cache storage: bf16, or mixed (FP8 non-RoPE dims + BF16 RoPE dims, as released)")
  flags.FLAGS(argv)
  from dsv4_jax.inference.cache_size import format_report, load_config, report

  fl = flags.FLAGS
  cfg = load_config(fl.config)
  print(format_report(cfg, report(cfg, fl.context, fl.storage), fl.config))


@command("plan")
def plan(argv):
  """dsv4 plan --config CONFIG [--mesh PRESET] [--set k=v] --chip v5p|v6e|h100|h200|b200 --chips N [--seq_len S] [--mfu F]: memory, time and traffic per chip."""
  from absl import flags
  flags.DEFINE_string("config", None, "a training YAML (model, curriculum, train, mesh sections), e.g. "
                      "configs/flash_train.yaml", required=True)
  flags.DEFINE_string("mesh", None, "mesh preset replacing the config's mesh section (configs/meshes/, e.g. "
                      "tpu_v5p_pod, h200_cluster) or a YAML file with a mesh: section")
  flags.DEFINE_multi_string("set", [], "override, e.g. --set mesh.context=8 --set model.remat=full")
  flags.DEFINE_string("chip", None, "v5p, v6e, h100, h200 or b200", required=True)
  flags.DEFINE_integer("chips", None, "number of chips", required=True)
  flags.DEFINE_integer("seq_len", None, "plan only the curriculum stages of this sequence length (a sparse-attention "
                       "stage at tokens_per_batch / seq_len rows if none has it)", lower_bound=1)
  flags.DEFINE_float("mfu", 0.4, "model FLOPs utilisation assumed for the step time")
  flags.FLAGS(argv)
  fl = flags.FLAGS
  cfg = _train_config(fl)
  from dsv4_jax.train.plan import chip_spec, format_plan, plan as make_plan  # imports JAX

  chip_spec(fl.chip)
  plans = make_plan(cfg, fl.chip, fl.chips, seq_len=fl.seq_len, mfu=fl.mfu)
  print(format_plan(plans, fl.chip, fl.chips, fl.mfu, fl.config))


# Expected errors: (module, class name, exit status); 2 = usage (flags, --set, config files and values),
# 1 = runtime (missing files, checkpoints, data). Classes are looked up in sys.modules when an error is
# handled: an exception of a class whose module was never imported cannot occur, and `dsv4 --help` stays fast.
EXPECTED_ERRORS = (
    ("dsv4_jax.config.errors", "ConfigError", 2),
    ("absl.flags", "Error", 2),
    ("yaml", "YAMLError", 2),
    ("builtins", "FileNotFoundError", 1),
    ("builtins", "IsADirectoryError", 1),
    ("builtins", "NotADirectoryError", 1),
    ("builtins", "PermissionError", 1),
    ("dsv4_jax.data.errors", "DataError", 1),
    ("dsv4_jax.convert.errors", "CheckpointError", 1),  # SafetensorsError included (a subclass)
    ("dsv4_jax.train.checkpoint", "CheckpointRestoreError", 1),
    ("dsv4_jax.train.spike", "SpikeRecoveryError", 1),
)


def exit_code(exc: BaseException) -> int | None:
  """The exit status of an expected error, or None for one whose traceback should show."""
  if isinstance(exc, SystemExit):  # raised with a message by a command: a usage error
    return 2 if isinstance(exc.code, str) else None
  if isinstance(exc, KeyboardInterrupt):
    return 130
  for module, name, code in EXPECTED_ERRORS:
    cls = getattr(sys.modules.get(module), name, None)
    if isinstance(cls, type) and isinstance(exc, cls):
      return code
  return None


def error_message(exc: BaseException) -> str:
  """One line: `path: reason` for OS errors, the message otherwise."""
  if isinstance(exc, SystemExit):
    text = str(exc.code)
  elif isinstance(exc, KeyboardInterrupt):
    text = "interrupted"
  elif isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
    text = f"{exc.filename}: {exc.strerror}"
  else:
    text = str(exc) or type(exc).__name__
    yaml_error = getattr(sys.modules.get("yaml"), "YAMLError", None)
    if isinstance(yaml_error, type) and isinstance(exc, yaml_error):
      text = f"invalid YAML: {text}"
  return " ".join(line.strip() for line in text.splitlines() if line.strip())


def version() -> str:
  """The installed distribution's version, else setup.py's (a source checkout)."""
  from importlib import metadata
  try:
    return metadata.version("dsv4_jax")
  except metadata.PackageNotFoundError:
    import re
    try:
      with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "setup.py")) as f:
        found = re.search(r"""version\s*=\s*["']([^"']+)["']""", f.read())
    except OSError:
      found = None
    return found.group(1) if found else "unknown"


def usage(file) -> None:
  print("usage: dsv4 [--version] [--debug] <command> [flags]\ncommands:", file=file)
  for name, fn in COMMANDS.items():
    print(f"  {name:16s} {(fn.__doc__ or '').strip().splitlines()[0]}", file=file)


def command_help(name: str, defined_before: set[str]) -> None:
  """`dsv4 <command> --help`: the command's doc line and the flags it defined."""
  from absl import flags
  print((COMMANDS[name].__doc__ or "").strip())
  new = [flags.FLAGS[f] for f in sorted(set(flags.FLAGS) - defined_before)]
  if new:
    print("flags:")
  for fl in new:
    default = f" (default: {fl.default_as_str})" if fl.default is not None else ""
    print(f"  --{fl.name}: {fl.help}{default}")


def main(argv=None):
  argv = list(sys.argv if argv is None else argv)
  debug = "--debug" in argv[1:] or os.environ.get("DSV4_DEBUG", "").lower() in ("1", "true", "yes")
  argv = argv[:1] + [a for a in argv[1:] if a != "--debug"]
  if len(argv) >= 2 and argv[1] == "--version":
    print(f"dsv4 {version()}")
    return 0
  if len(argv) >= 2 and argv[1] in ("-h", "--help", "help"):
    usage(sys.stdout)
    return 0
  if len(argv) < 2 or argv[1] not in COMMANDS:
    if len(argv) >= 2:
      print(f"dsv4: error: unknown command {argv[1]!r}", file=sys.stderr)
    usage(sys.stderr if len(argv) >= 2 else sys.stdout)
    return 2
  name = argv[1]
  from absl import flags
  defined_before = set(flags.FLAGS)
  try:
    return COMMANDS[name]([f"dsv4 {name}"] + argv[2:]) or 0
  except BaseException as exc:  # noqa: B036 -- SystemExit and KeyboardInterrupt included, see exit_code
    if isinstance(exc, flags.UnrecognizedFlagError) and exc.flagname in ("help", "h", "helpshort", "helpfull"):
      command_help(name, defined_before)
      return 0
    code = exit_code(exc)
    if code is None or debug:
      raise
    print(f"dsv4 {name}: error: {error_message(exc)}", file=sys.stderr)
    return code


def console() -> None:
  """The `dsv4` program: `main`, then exit. If a run's compile-ahead thread is still compiling (a run
  stopped early), finalizing the interpreter would kill that thread as it returns from XLA and abort
  the process (SIGABRT after the run's own output): exit without finalizing instead. Checkpoints,
  metrics and data are closed by then; a multi-process run leaves jax.distributed first."""
  code = main()
  ahead = sys.modules.get("dsv4_jax.train.compile_ahead")
  if ahead is not None and ahead.compiling():
    import jax
    if jax.distributed.is_initialized():
      jax.distributed.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
  sys.exit(code)


if __name__ == "__main__":
  console()
