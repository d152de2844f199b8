"""`dsv4` on malformed input: one line `dsv4 <command>: error: <message>`, exit 2 (usage) or 1 (runtime),
no traceback unless --debug / DSV4_DEBUG=1. Each case runs the CLI in a subprocess, as a user would."""

import os
import re
import subprocess
import sys

import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
ENV.pop("DSV4_DEBUG", None)


def dsv4(*args, env=ENV):
  return subprocess.run([sys.executable, "-m", "dsv4_jax.cli", *args], capture_output=True, text=True,
                        env=env, cwd=REPO, timeout=180)


def _tiny(**changes):
  """configs/tiny.yaml with `changes` ({section: {key: value}} merged, or {section: value} replaced)."""
  with open(os.path.join(REPO, "configs", "tiny.yaml")) as f:
    raw = yaml.safe_load(f)
  for section, change in changes.items():
    raw[section] = {**raw[section], **change} if isinstance(raw.get(section), dict) else change
  return yaml.safe_dump(raw)


FILES = {  # name -> text, written to the test's tmp directory ({tmp} in the table)
    "broken.yaml": "model: [\n  hidden_size: 64\n",
    "list.yaml": "- model\n- data\n",
    "section.yaml": _tiny(meshes={"data": 2}),
    "model_key.yaml": _tiny(model={"hiden_size": 64}),
    "data_key.yaml": _tiny(data={"sorce": "text"}),
    "optimizer_key.yaml": _tiny(optimizer={"lr": 1.0}),
    "train_key.yaml": _tiny(train={"log_evry": 5}),
    "curriculum_key.yaml": _tiny(curriculum=[{"seq_len": 256, "steps": 1, "atention": "dense"}]),
    "bad_lr.yaml": _tiny(optimizer={"learning_rate": "abc"}),
    "bad_steps.yaml": _tiny(curriculum=[{"seq_len": 256, "steps": "many"}]),
    "bad.jsonl": '{"text": "fine"}\nnot json\n',
    "empty/.keep": "",
}

# args ({tmp}: the directory holding FILES) -> exit code -> regex the stderr error line must match
CASES = [
    (["train", "--config", "{tmp}/nosuch.yaml"], 1, r"nosuch\.yaml: No such file or directory"),
    (["train", "--config", "{tmp}"], 1, r": Is a directory"),
    (["train", "--config", "{tmp}/broken.yaml"], 2, r'invalid YAML: .*broken\.yaml", line \d+'),
    (["train", "--config", "{tmp}/list.yaml"], 2, r"list\.yaml: expected a mapping of config sections .*got list"),
    (["train", "--config", "{tmp}/section.yaml"], 2, r"unknown config sections \['meshes'\]"),
    (["train", "--config", "{tmp}/model_key.yaml"], 2,
     r"unknown model keys \['hiden_size'\]; known keys: .*'hidden_size'"),
    (["train", "--config", "{tmp}/data_key.yaml"], 2, r"unknown data keys \['sorce'\]; known keys: .*'source'"),
    (["train", "--config", "{tmp}/optimizer_key.yaml"], 2,
     r"unknown optimizer keys \['lr'\]; known keys: .*'learning_rate'"),
    (["train", "--config", "{tmp}/train_key.yaml"], 2, r"unknown train keys \['log_evry'\]; known keys: .*'log_every'"),
    (["train", "--config", "{tmp}/curriculum_key.yaml"], 2, r"unknown curriculum\[0\] keys \['atention'\]"),
    (["train", "--config", "{tmp}/bad_lr.yaml"], 2, r"optimizer\.learning_rate: expected a float, got 'abc'"),
    (["train", "--config", "{tmp}/bad_steps.yaml"], 2,
     r"curriculum\[0\]\.steps: expected an integer or null, got 'many'"),
    (["train", "--set", "optimizer.learning_rate"], 2, r"--set 'optimizer\.learning_rate': expected key=value"),
    (["train", "--set", "optimizer.learning_rate=abc"], 2,
     r"--set optimizer\.learning_rate=abc: expected a float, got 'abc'"),
    (["train", "--set", "train.log_every=often"], 2, r"--set train\.log_every=often: expected an integer, got 'often'"),
    (["train", "--set", "data.shuffle=maybe"], 2, r"--set data\.shuffle=maybe: expected a boolean .*got 'maybe'"),
    (["train", "--set", "optimizer.lr=1e-3"], 2,
     r"--set optimizer\.lr=1e-3: unknown optimizer keys \['lr'\]; known keys: .*'learning_rate'"),
    (["train", "--set", "curriculum.9.steps=5"], 2,
     r"--set curriculum\.9\.steps=5: index 9 is out of range: the curriculum has 3 stages"),
    (["train", "--set", "mesh.data=2"], 2,
     r"mesh: axis sizes \{'data': 2, 'fsdp': 1, 'expert': 1, 'tensor': 1, 'context': 1\} multiply to 2, but 1 "
     r"devices are available; set one axis to -1 to take the rest"),
    (["train", "--set", "mesh.data=1", "--set", "mesh.fsdp=0"], 2, r"mesh: axis sizes must be positive"),
    (["train", "--mesh", "nosuch"], 2, r"--mesh nosuch: no such file, and not a shipped mesh preset \(data, fsdp, "),
    (["train", "--mesh", "{tmp}/model_key.yaml"], 2, r"model_key\.yaml: expected a mesh preset, a mapping with a `mesh:` section"),
    (["train", "--set", "data.source=jsonl", "--set", "data.paths={tmp}/bad.jsonl", "--set", "train.run_dir={tmp}/r1"],
     1, r"bad\.jsonl:2: invalid JSON \(Expecting value at column 1\); expected one JSON object per line"),
    (["train", "--set", "data.source=text", "--set", "data.paths={tmp}/empty", "--set", "train.run_dir={tmp}/r2"], 1,
     r"empty corpus: no documents for split 'train' from source 'text' at \['.*empty'\]"),
    (["train", "--bogus"], 2, r"Unknown command line flag 'bogus'"),
    (["info", "--config", "{tmp}/nosuch.yaml"], 1, r"nosuch\.yaml: No such file or directory"),
    (["info", "--config", "{tmp}/model_key.yaml"], 2, r"unknown model keys \['hiden_size'\]"),
    (["cache-size", "--context", "-5"], 2, r"--context=-5: -5 is not a positive integer"),
    (["cache-size", "--config", "nosuch"], 1, r"--config 'nosuch': expected flash, pro, a YAML file or a config\.json"),
    (["generate", "--prompt", "hi"], 2, r"--checkpoint must have a value"),
    (["plot", "{tmp}/no_run"], 1, r"no_run: no such run directory"),
    (["plot"], 2, r"usage: dsv4 plot RUN_DIR"),
]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
  root = tmp_path_factory.mktemp("cli_errors")
  for name, text in FILES.items():
    (root / name).parent.mkdir(exist_ok=True)
    (root / name).write_text(text)
  return str(root)


@pytest.mark.parametrize("args, code, message", CASES, ids=[" ".join(c[0]) for c in CASES])
def test_error_is_one_line_with_exit_code(tmp, args, code, message):
  proc = dsv4(*(a.format(tmp=tmp) for a in args))
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert proc.returncode == code, proc.stderr[-3000:]
  lines = [line for line in proc.stderr.splitlines() if line.startswith(f"dsv4 {args[0]}: error: ")]
  assert len(lines) == 1, proc.stderr[-3000:]
  assert re.search(message, lines[0]), lines[0]


def test_typed_override_parses_without_training():
  """`--set optimizer.learning_rate=1e-3` is a float (YAML 1.1 would make it the string '1e-3')."""
  from dsv4_jax.config import TrainConfig
  cfg = TrainConfig.from_yaml(os.path.join(REPO, "configs", "tiny.yaml"), {"optimizer.learning_rate": "1e-3"})
  assert cfg.optimizer.learning_rate == 1e-3 and isinstance(cfg.optimizer.learning_rate, float)


@pytest.mark.parametrize("how", ["flag", "env"])
def test_debug_shows_the_traceback(tmp, how):
  args = ["info", "--config", f"{tmp}/nosuch.yaml"] + (["--debug"] if how == "flag" else [])
  proc = dsv4(*args, env={**ENV, "DSV4_DEBUG": "1"} if how == "env" else ENV)
  assert proc.returncode != 0
  assert "Traceback" in proc.stderr and "FileNotFoundError" in proc.stderr


def test_version():
  proc = dsv4("--version")
  assert proc.returncode == 0 and re.fullmatch(r"dsv4 \d+\.\d+\S*\n", proc.stdout), proc.stdout + proc.stderr


def test_unknown_command_prints_usage():
  proc = dsv4("trian")
  assert proc.returncode == 2
  assert "dsv4: error: unknown command 'trian'" in proc.stderr and "commands:" in proc.stderr


def test_command_help_lists_its_flags():
  proc = dsv4("cache-size", "--help")
  assert proc.returncode == 0 and "--context" in proc.stdout and "Traceback" not in proc.stderr


# A run that fails while its compile-ahead thread compiles, made deterministic: the compilation starts only at
# exit (atexit, before Python finalizes) and is still inside XLA when finalizing starts, and a slow module
# teardown keeps the interpreter finalizing until it returns. Python then kills the thread inside XLA's C++
# frames, which aborts the process ("FATAL: exception not rethrown", SIGABRT) unless `dsv4` exits without
# finalizing while a compilation runs.
RACE = """
import atexit, sys, threading, time
import jax
from dsv4_jax import cli

exiting = threading.Event()
@atexit.register
def start_compiling():
  exiting.set()
  time.sleep(0.5)   # the thread enters XLA (and releases the GIL) before finalizing starts

compile_ = jax.stages.Lowered.compile
def compile_at_exit(self, *args, **kwargs):
  exiting.wait()
  return compile_(self, *args, **kwargs)
jax.stages.Lowered.compile = compile_at_exit

class SlowTeardown:
  def __del__(self, sleep=time.sleep):
    sleep(10)
slow = SlowTeardown()
sys.argv = ["dsv4"] + sys.argv[1:]
cli.console()
"""


def test_an_error_while_compiling_ahead_exits_with_its_code_not_an_abort(tmp_path):
  (tmp_path / "bad.jsonl").write_text('{"text": "hello"}\nnot json\n')
  proc = subprocess.run([sys.executable, "-c", RACE, "train", "--config=tiny", "--noprogress",
                         f"--set=train.run_dir={tmp_path}/run", "--set=data.source=jsonl",
                         f"--set=data.paths={tmp_path}/bad.jsonl", "--set=model.num_hidden_layers=1",
                         "--set=model.compress_ratios=[0]", "--set=model.num_nextn_predict_layers=0"],
                        capture_output=True, text=True, env=ENV, timeout=300)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert proc.stderr.strip().splitlines()[-1].startswith("dsv4 train: error: ") and "bad.jsonl:2" in proc.stderr
