"""load_model on corrupted checkpoints: each corruption raises its documented class naming the file (and tensor / key).

A small valid checkpoint (several shards + index) is written with save_checkpoint, copied, corrupted in one
way, and loaded. Shard problems are SafetensorsError (a CheckpointError), index / shard mismatches
CheckpointError, config.json problems ConfigError.
"""

import json
import os
import re
import shutil
import struct

import pytest

from dsv4_jax.config import ConfigError
from dsv4_jax.convert import CheckpointError, load_model, save_checkpoint
from dsv4_jax.convert.safetensors_reader import SafetensorsError, SafetensorsFile
from helpers import tiny_model

INDEX = "model.safetensors.index.json"
TENSOR = "layers.3.attn.wkv.weight"  # F32 (32, 64)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  path = tmp_path_factory.mktemp("ckpt")
  save_checkpoint(tiny_model(seed=1), path, max_shard_bytes=1 << 20)
  return path


def _weight_map(path):
  with open(path / INDEX) as f:
    return json.load(f)["weight_map"]


def _read(file):
  raw = file.read_bytes()
  (n,) = struct.unpack("<Q", raw[:8])
  return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(file, header, data):
  encoded = header if isinstance(header, bytes) else json.dumps(header).encode()
  file.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


def _edit_header(path, fn, name=TENSOR):
  """fn(header dict) edits the header of the shard holding `name`; returns format args for the message."""
  file = path / _weight_map(path)[name]
  header, data = _read(file)
  extra = fn(header)
  extra = extra if isinstance(extra, dict) else {}
  _write(file, header, data)
  return {"file": str(file), "tensor": name, **extra}


# --- corruptions: each edits the copied checkpoint at `path` and returns the names its message must show --


def truncate_shard(path):
  file = path / _weight_map(path)[TENSOR]
  header, _ = _read(file)
  header.pop("__metadata__", None)
  last = max(header, key=lambda n: header[n]["data_offsets"][1])
  os.truncate(file, file.stat().st_size - 100)
  return {"file": str(file), "tensor": last}


def truncate_into_header(path):
  file = path / _weight_map(path)[TENSOR]
  os.truncate(file, 40)
  return {"file": str(file)}


def garble_header_length(path):
  file = path / _weight_map(path)[TENSOR]
  raw = bytearray(file.read_bytes())
  raw[:8] = struct.pack("<Q", 2 ** 40)
  file.write_bytes(bytes(raw))
  return {"file": str(file)}


def header_not_json(path):
  file = path / _weight_map(path)[TENSOR]
  header, data = _read(file)
  encoded = json.dumps(header).encode()
  _write(file, b"{'not': json" + b" " * (len(encoded) - 12), data)
  return {"file": str(file)}


def header_not_mapping(path):
  file = path / _weight_map(path)[TENSOR]
  header, data = _read(file)
  _write(file, [sorted(header)], data)
  return {"file": str(file)}


def wrong_dtype(path):
  return _edit_header(path, lambda h: h[TENSOR].update(dtype="F33"))


def entry_without_offsets(path):
  return _edit_header(path, lambda h: h[TENSOR].pop("data_offsets"))


def shape_bytes_mismatch(path):
  return _edit_header(path, lambda h: h[TENSOR].update(shape=[32, 65]))


def f4_bytes_mismatch(path):  # F4 packs two values per byte: (32, 64) needs 1024 bytes, not fp32's 8192
  return _edit_header(path, lambda h: h[TENSOR].update(dtype="F4"))


def offsets_reversed(path):
  return _edit_header(path, lambda h: h[TENSOR].update(data_offsets=h[TENSOR]["data_offsets"][::-1]))


def offsets_overlap(path):
  def edit(header):
    begin, end = header[TENSOR]["data_offsets"]
    other = next(n for n, e in sorted(header.items())
                 if n not in (TENSOR, "__metadata__") and e["data_offsets"][1] - e["data_offsets"][0] > end - begin)
    header[TENSOR]["data_offsets"] = [header[other]["data_offsets"][0] + 4, header[other]["data_offsets"][0] + 4
                                      + end - begin]
    return {"other": other}
  return _edit_header(path, edit)


def _edit_index(path, fn):
  with open(path / INDEX) as f:
    index = json.load(f)
  fn(index["weight_map"])
  with open(path / INDEX, "w") as f:
    json.dump(index, f)


def index_missing_shard(path):
  _edit_index(path, lambda m: m.update({TENSOR: "model-00099-of-00099.safetensors"}))
  return {"file": str(path / INDEX), "shard": "model-00099-of-00099.safetensors", "tensor": TENSOR}


def index_missing_tensor(path):
  other = next(f for f in sorted(set(_weight_map(path).values())) if f != _weight_map(path)[TENSOR])
  _edit_index(path, lambda m: m.update({TENSOR: other}))
  return {"file": str(path / INDEX), "shard": other, "tensor": TENSOR}


def index_not_json(path):
  (path / INDEX).write_text('{"weight_map": {')
  return {"file": str(path / INDEX)}


def duplicate_without_index(path):
  os.remove(path / INDEX)
  shard = sorted(f for f in os.listdir(path) if f.endswith(".safetensors"))[0]
  shutil.copy(path / shard, path / "zz-copy.safetensors")
  return {"file": str(path), "tensor": SafetensorsFile(path / shard).keys()[0], "shard": shard}


def _edit_config(path, fn):
  config = json.loads((path / "config.json").read_text())
  fn(config)
  (path / "config.json").write_text(json.dumps(config))
  return {"file": str(path / "config.json")}


def config_without_hidden_size(path):
  return _edit_config(path, lambda c: c.pop("hidden_size"))


def config_without_compress_ratios(path):
  return _edit_config(path, lambda c: c.pop("compress_ratios"))


def config_without_several(path):
  return _edit_config(path, lambda c: [c.pop(k) for k in ("vocab_size", "num_hash_layers", "hc_mult")])


def config_wrong_type(path):
  return _edit_config(path, lambda c: c.update(hidden_size="64"))


def config_not_json(path):
  (path / "config.json").write_text('{"hidden_size": 64,')
  return {"file": str(path / "config.json")}


CASES = [  # corruption, expected class, message regex ({file}, {tensor}, ... are filled in escaped)
    (truncate_shard, SafetensorsError,
     r"{file}: truncated: tensor {tensor} needs data bytes \d+\.\.\d+ but the file has only \d+ after its header "
     r"\(1 tensor\(s\) cut off; file is \d+ bytes, expected at least \d+\)"),
    (truncate_into_header, SafetensorsError, r"{file}: header length \d+ exceeds the 32 bytes after the length field"),
    (garble_header_length, SafetensorsError, r"{file}: header length 1099511627776 exceeds the \d+ bytes"),
    (header_not_json, SafetensorsError, r"{file}: the \d+-byte header is not valid JSON"),
    (header_not_mapping, SafetensorsError, r"{file}: the header is a JSON list, expected an object"),
    (wrong_dtype, SafetensorsError, r"{file}: tensor {tensor}: unknown dtype 'F33'; supported: BF16, BOOL, F16"),
    (entry_without_offsets, SafetensorsError, r"{file}: tensor {tensor}: header entry lacks data_offsets"),
    (shape_bytes_mismatch, SafetensorsError,
     r"{file}: tensor {tensor} \(F32 \[32, 65\]\) needs 8320 bytes \(prod\(shape\) × 4 bytes\), "
     r"data_offsets \[\d+, \d+\] hold 8192"),
    (f4_bytes_mismatch, SafetensorsError,
     r"{file}: tensor {tensor} \(F4 \[32, 64\]\) needs 1024 bytes \(prod\(shape\) / 2 packed bytes\), .* hold 8192"),
    (offsets_reversed, SafetensorsError, r"{file}: tensor {tensor}: data_offsets \[\d+, \d+\] end before they begin"),
    (offsets_overlap, SafetensorsError, r"{file}: tensors {other} \(data bytes \d+\.\.\d+\) and {tensor} .* overlap"),
    (index_missing_shard, CheckpointError,
     r"{file}: the index does not match the shards:\n  shard {shard} does not exist "
     r"\(the index assigns it 1 tensor\(s\): {tensor}\)"),
    (index_missing_tensor, CheckpointError,
     r"{file}: the index does not match the shards:\n  shard {shard} does not contain tensor\(s\) {tensor} "
     r"\(1 of the \d+ the index assigns to it\)"),
    (index_not_json, CheckpointError, r"{file}: not valid JSON"),
    (duplicate_without_index, CheckpointError, r"{file}: tensor {tensor} is in both {shard} and zz-copy\.safetensors"),
    (config_without_hidden_size, ConfigError,
     r"{file}: missing 'hidden_size' \(architecture keys with no safe default\)"),
    (config_without_compress_ratios, ConfigError, r"{file}: missing 'compress_ratios' \("),
    (config_without_several, ConfigError, r"{file}: missing 'vocab_size', 'num_hash_layers', 'hc_mult' \("),
    (config_wrong_type, ConfigError, r"{file}: hidden_size: expected an integer, got '64'"),
    (config_not_json, ConfigError, r"{file}: not valid JSON \(Expecting"),
]


@pytest.mark.parametrize("corrupt, error, message", CASES, ids=[c[0].__name__ for c in CASES])
def test_corruption_is_named(saved, tmp_path, corrupt, error, message):
  path = tmp_path / "ckpt"
  shutil.copytree(saved, path)
  names = corrupt(path)
  with pytest.raises(error, match=message.format(**{k: re.escape(v) for k, v in names.items()})):
    load_model(path)


def test_one_class_to_catch():
  """Every checkpoint-file problem is a CheckpointError; config.json problems are ConfigErrors (both ValueErrors)."""
  assert issubclass(SafetensorsError, CheckpointError) and issubclass(CheckpointError, ValueError)
  assert issubclass(ConfigError, ValueError)


def test_valid_copy_loads(saved, tmp_path):
  """The corruptions above start from a checkpoint that loads (and a header padded with spaces still reads)."""
  path = tmp_path / "ckpt"
  shutil.copytree(saved, path)
  file = path / _weight_map(path)[TENSOR]
  header, data = _read(file)
  _write(file, json.dumps(header).encode() + b" " * 7, data)
  load_model(path, attention_chunk_size=64)
