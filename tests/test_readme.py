"""The README cannot drift: its code blocks and commands are extracted and run.

- ```python blocks: run in order as one script (a fresh interpreter, a temporary directory holding
  `configs/`), as a reader would paste them.
- ```bash blocks: each in a fresh temporary directory, every line a command, run as written except:
  `pip install -e ...` is what this environment was set up with (`.ci/run`, a superset) and is not
  rerun; the test command is checked to be exactly the one `.ci/run` runs (running it here would run
  this test again); `dsv4 train` gets `--max_steps 2` and a one-layer architecture (SMALL), so that it
  takes seconds; `held_out/` (the README's stand-in for the reader's files) is created.
- `dsv4 ...` in the prose: either a usage synopsis (a placeholder such as RUN_DIR, or [optional] parts)
  or the start of a command of a bash block (so it runs there). `--set ...` examples parse against the
  config's types and change the fields they name.
"""

import os
import re
import shlex
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
with open(os.path.join(REPO, "README.md")) as f:
  README = f.read()
BLOCKS = re.findall(r"^```(\w+)\n(.*?)^```$", README, re.S | re.M)
PROSE = re.sub(r"^```.*?^```$", "", README, flags=re.S | re.M)
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
ENV.pop("DSV4_DEBUG", None)
SMALL = ["--max_steps", "2", "--progress=false", "--set=train.eval_every=0", "--set=curriculum.0.seq_len=128",
         "--set=train.tokens_per_batch=256", "--set=model.num_hidden_layers=1",
         "--set=model.num_nextn_predict_layers=0", "--set=model.compress_ratios=[0]"]


def _ci_test_command() -> str:
  with open(os.path.join(REPO, ".ci", "run")) as f:
    lines = [line.strip() for line in f if line.strip() and not line.startswith("#")]
  assert any(line.startswith('pip install -q -e ".[test]"') for line in lines), lines
  return lines[-1]


def _workdir(tmp_path):
  os.symlink(os.path.join(REPO, "configs"), tmp_path / "configs")
  return tmp_path


def _commands(block: str) -> list[str]:
  return [line.split("  #")[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


def test_readme_has_blocks_of_both_kinds():
  kinds = [kind for kind, _ in BLOCKS]
  assert kinds.count("python") >= 3 and kinds.count("bash") >= 2, kinds
  assert set(kinds) <= {"python", "bash"}, kinds   # an unknown block kind would go unrun


def test_python_blocks_run_in_order(tmp_path):
  script = "\n\n".join(code for kind, code in BLOCKS if kind == "python")
  script += "\nassert logits.shape[:2] == (2, 1) and streams.shape == (2, 16, cfg.hc_mult, cfg.hidden_size)\n"
  proc = subprocess.run([sys.executable, "-c", script], cwd=_workdir(tmp_path), env=ENV, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert os.path.isfile(tmp_path / "ckpt" / "config.json")


@pytest.mark.parametrize("index", [i for i, (kind, _) in enumerate(BLOCKS) if kind == "bash"])
def test_bash_block_runs(index, tmp_path):
  cwd = _workdir(tmp_path)
  (cwd / "held_out").mkdir()
  (cwd / "held_out" / "a.py").write_text("def main():\n    print('hello')\n")
  for line in _commands(BLOCKS[index][1]):
    for command in (c.strip() for c in line.split("&&")):
      if command.startswith("pip install -e "):
        continue   # the environment running this test was installed by .ci/run (pip install -e ".[test]")
      if command.startswith("python -m pytest"):
        assert command == _ci_test_command()
        continue
      args = shlex.split(command)
      env = dict(ENV)
      while re.fullmatch(r"[A-Z_]+=\S*", args[0]):   # VAR=value before the command
        key, value = args.pop(0).split("=", 1)
        env[key] = value
      assert args[0] == "dsv4", command
      args = [sys.executable, "-m", "dsv4_jax.cli", *args[1:]] + (SMALL if args[1] == "train" else [])
      proc = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
      assert proc.returncode == 0, f"{command}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"


def test_prose_commands_are_synopses_or_run_in_a_block():
  run = [c for kind, code in BLOCKS if kind == "bash" for line in _commands(code) for c in line.split("&&")]
  run = [re.sub(r"^([A-Z_]+=\S* )+", "", c.strip()) for c in run]
  spans = re.findall(r"`(dsv4 [^`]*)`", PROSE)
  assert len(spans) >= 8, spans
  for span in spans:
    synopsis = re.search(r"\b[A-Z][A-Z_]+\b|\[|<", span)
    assert synopsis or any(c.startswith(span) for c in run), f"README command {span!r} is run by no test"


def test_prose_overrides_parse():
  from dsv4_jax.config import TrainConfig

  spans = re.findall(r"`((?:--set \S+ ?)+)`", PROSE)
  assert spans, "the README shows no --set example"
  for span in spans:
    overrides = dict(item.split("=", 1) for item in span.replace("--set ", "").split())
    cfg = TrainConfig.from_yaml(os.path.join(REPO, "configs", "tiny.yaml"), overrides)
    for key, value in overrides.items():
      obj = cfg
      for part in key.split(".")[1 if key.startswith("train.") else 0:]:   # train.* are TrainConfig's own
        obj = obj[int(part)] if part.isdigit() else getattr(obj, part)
      assert str(obj) == value or obj == type(obj)(value), (key, value, obj)
