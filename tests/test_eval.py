"""`dsv4 eval`: bits/byte of a trained model on a held-out set, against an independent per-document
forward (no packing, no loader), from a training run and from its export; clear errors."""

import dataclasses
import json
import math
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from dsv4_jax.config import TrainConfig
from dsv4_jax.data import ByteTokenizer
from dsv4_jax.train.evaluation import evaluate_heldout, heldout_data_config
from dsv4_jax.train.export import load_run_model
from dsv4_jax.train.loop import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = {**os.environ, "JAX_PLATFORMS": "cpu"}
ENV.pop("DSV4_DEBUG", None)

# Held-out documents, each shorter than a row of 128 tokens, of different lengths (some share a row).
HELDOUT = ["def add(a, b):\n    return a + b\n", "x = [i * i for i in range(10)]\n",
           "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y\n", "print('héllo')\n"]


def dsv4(*args):
  return subprocess.run([sys.executable, "-m", "dsv4_jax.cli", *args], capture_output=True, text=True,
                        env=ENV, cwd=REPO, timeout=300)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  """A 2-step training run on text files with an explicit validation directory (HELDOUT)."""
  root = tmp_path_factory.mktemp("eval")
  (root / "train").mkdir()
  (root / "heldout").mkdir()
  for i in range(6):
    (root / "train" / f"t{i}.py").write_text(f"value_{i} = {i} * 2\nprint(value_{i})\n" * 3)
  for i, text in enumerate(HELDOUT):
    (root / "heldout" / f"h{i}.py").write_text(text)
  with open(root / "heldout.jsonl", "w") as f:
    for text in HELDOUT:
      f.write(json.dumps({"text": text}) + "\n")
  raw = {
      "model": dict(vocab_size=260, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, head_dim=32,
                    q_lora_rank=16, o_groups=2, o_lora_rank=8, qk_rope_head_dim=8, sliding_window=16,
                    compress_ratios=[4, 0, 0], index_n_heads=4, index_head_dim=16, index_topk=4,
                    n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, num_hash_layers=1,
                    attention_chunk_size=128),
      "data": {"source": "text", "paths": [str(root / "train")], "validation_paths": [str(root / "heldout")],
               "prefetch_batches": 0, "num_threads": 1},
      "optimizer": {"learning_rate": 1e-2, "warmup_steps": 1},
      "curriculum": [{"seq_len": 128, "steps": 2, "attention": "dense"}],
      "train": {"tokens_per_batch": 256, "log_every": 1, "eval_every": 0, "eval_tokens": 128,
                "checkpoint_every": 2, "run_dir": str(root / "run")},
  }
  train(TrainConfig.from_dict(raw), progress=False, log=lambda *a: None)
  return root


def per_document_bits_per_byte(model, texts):
  """Σ −log p over each document's [BOS] + bytes + [EOS], one document per row (right-padded: causal, so
  the padding changes no scored logit), / Σ bytes / ln 2. No loader, no packing."""
  tok = ByteTokenizer()
  docs = [np.concatenate([[tok.bos_id], tok.encode(t), [tok.eos_id]]).astype(np.int32) for t in texts]
  ids = np.full((len(docs), 128), tok.pad_id, np.int32)
  for i, doc in enumerate(docs):
    ids[i, :len(doc)] = doc
  graphdef, state = nnx.split(model)
  forward = jax.jit(lambda state, ids: nnx.merge(graphdef, state)(ids, attention_mode="dense", with_mtp=False).logits)
  logits = np.asarray(forward(state, ids), np.float64)
  nats = 0.0
  for i, doc in enumerate(docs):
    row = logits[i, :len(doc) - 1]
    row = row - row.max(-1, keepdims=True)
    logp = row - np.log(np.exp(row).sum(-1, keepdims=True))
    nats -= logp[np.arange(len(row)), doc[1:]].sum()
  return nats / math.log(2) / sum(len(t.encode()) for t in texts)


def test_bits_per_byte_equals_per_document_forward(run):
  model, step, cfg = load_run_model(run / "run", log=lambda *a: None)
  assert step == 2
  result = evaluate_heldout(model, cfg.data, seq_len=128, batch_size=3, attention="dense")
  expected = per_document_bits_per_byte(model, HELDOUT)
  assert result["documents"] == len(HELDOUT)
  assert result["bytes"] == sum(len(t.encode()) for t in HELDOUT)
  assert result["targets"] == sum(len(t.encode()) + 1 for t in HELDOUT)   # every byte and each EOS
  np.testing.assert_allclose(result["bits_per_byte"], expected, rtol=1e-5)
  assert 1.0 < expected < 9.0   # a 2-step model: near the uniform 8.02 bits/byte, not degenerate


def test_a_document_longer_than_a_row_is_scored_whole(run, tmp_path):
  model, _, cfg = load_run_model(run / "run", log=lambda *a: None)
  long_text = "abcdefghij" * 40   # 400 bytes: four rows of 128
  (tmp_path / "long.txt").write_text(long_text)
  data = heldout_data_config([str(tmp_path / "long.txt")], source="text", tokenizer="byte", align=128)
  result = evaluate_heldout(model, data, seq_len=128, batch_size=2, attention="dense")
  assert (result["documents"], result["bytes"], result["targets"]) == (1, 400, 401)
  assert result["rows"] == math.ceil(402 / 128)


def test_cli_run_directory_and_export_agree(run, tmp_path):
  model, _, cfg = load_run_model(run / "run", log=lambda *a: None)
  expected = evaluate_heldout(model, cfg.data, seq_len=128, batch_size=4, attention="dense")["bits_per_byte"]

  from_run = dsv4("eval", "--checkpoint", str(run / "run"))   # the run's validation split, its last stage
  assert from_run.returncode == 0, from_run.stderr[-3000:]
  assert "checkpoint step 2" in from_run.stderr and "rows of 128 tokens, dense attention" in from_run.stderr
  assert re.search(rf"^4 documents, .* {expected:.4f} bits/byte$", from_run.stdout.strip()), from_run.stdout

  # The export of the run on the same documents as JSONL: packed aligned to the model's largest compression
  # ratio (4) instead of the run's data.align (128), so documents share rows (2 instead of 4).
  exported = dsv4("export", str(run / "run"), str(tmp_path / "hub"))
  assert exported.returncode == 0, exported.stderr[-3000:]
  from_hub = dsv4("eval", "--checkpoint", str(tmp_path / "hub"), "--data", str(run / "heldout.jsonl"),
                  "--seq_len", "128", "--batch_size", "1", "--attention", "dense")
  assert from_hub.returncode == 0, from_hub.stderr[-3000:]
  assert "[held-out: jsonl" in from_hub.stderr
  jsonl = heldout_data_config([str(run / "heldout.jsonl")], source="jsonl", tokenizer="byte", align=4)
  expected = evaluate_heldout(model, jsonl, seq_len=128, batch_size=1, attention="dense")
  assert expected["rows"] == 2
  assert from_hub.stdout.strip() == (f"4 documents, 152 bytes, 156 targets in 2 rows: loss {expected['loss']:.4f} "
                                     f"nats/token, {expected['bits_per_byte']:.4f} bits/byte")


@pytest.mark.parametrize("args, code, message", [
    (["--checkpoint", "{hub}"], 2, r"--data: expected held-out files or directories"),
    (["--checkpoint", "{run}", "--seq_len", "100"], 2, r"--seq_len: expected a positive multiple of 128 .*got 100"),
    (["--checkpoint", "{run}", "--data", "{root}/nosuch"], 1, r"--data .*nosuch: no such file or directory"),
    (["--checkpoint", "{run}", "--data", "{root}/empty"], 1, r"empty corpus: no documents for split 'validation'"),
    (["--checkpoint", "{run}", "--data", "{root}/bad.jsonl"], 1, r"bad\.jsonl:2: invalid JSON"),
    (["--checkpoint", "{run}", "--data", "{root}/heldout.jsonl", "--data", "{root}/heldout"], 2,
     r"--data: expected files of one kind, got \['jsonl', 'text'\]"),
    (["--checkpoint", "{run}", "--step", "7"], 1, r"no checkpoint at step 7 \(checkpoints at steps \[2\]\)"),
])
def test_cli_errors(run, args, code, message):
  (run / "empty").mkdir(exist_ok=True)
  (run / "bad.jsonl").write_text('{"text": "ok"}\nnot json\n')
  hub = run / "not_a_run"
  hub.mkdir(exist_ok=True)
  proc = dsv4("eval", *(a.format(root=run, run=run / "run", hub=hub) for a in args))
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert proc.returncode == code, proc.stderr[-3000:]
  assert re.search(message, proc.stderr.strip().splitlines()[-1]), proc.stderr[-1000:]
