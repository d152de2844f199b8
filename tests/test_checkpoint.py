"""save_checkpoint / load_model round trip and the errors for malformed checkpoints."""

import json
import os
import shutil

import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

from dsv4_jax.convert import CheckpointError, expected_tensors, load_model, save_checkpoint
from helpers import forward_fn, tiny_config, tiny_model


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  path = tmp_path_factory.mktemp("ckpt")
  model = tiny_model(seed=3)
  save_checkpoint(model, path, max_shard_bytes=1 << 20)  # several shards
  return model, str(path)


def _copy(src, tmp_path):
  dst = tmp_path / "ckpt"
  shutil.copytree(src, dst)
  return dst


def _edit_tensor(path, name, fn):
  """Applies fn(dict of the shard's tensors) to the shard that holds `name`."""
  with open(path / "model.safetensors.index.json") as f:
    index = json.load(f)
  file = path / index["weight_map"][name]
  tensors = load_file(file)
  fn(tensors, index)
  save_file(tensors, file)
  with open(path / "model.safetensors.index.json", "w") as f:
    json.dump(index, f)


def test_round_trip_gives_identical_logits(saved):
  model, path = saved
  assert len([f for f in os.listdir(path) if f.endswith(".safetensors")]) > 1
  loaded = load_model(path, attention_chunk_size=model.cfg.attention_chunk_size)  # not in config.json
  ids = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (2, 150))
  np.testing.assert_array_equal(np.asarray(forward_fn(loaded)(ids).logits),
                                np.asarray(forward_fn(model)(ids).logits))


def test_released_names(saved):
  _, path = saved
  with open(os.path.join(path, "model.safetensors.index.json")) as f:
    names = set(json.load(f)["weight_map"])
  for name in ["embed.weight", "head.weight", "norm.weight", "hc_head_fn", "hc_head_base", "hc_head_scale",
               "layers.1.attn.compressor.wkv.weight", "layers.1.attn.indexer.compressor.ape",
               "layers.1.attn.indexer.weights_proj.weight", "layers.2.attn.compressor.ape",
               "layers.0.ffn.experts.7.w1.weight", "layers.0.ffn.gate.tid2eid", "layers.1.ffn.gate.bias",
               "layers.3.hc_ffn_fn", "layers.3.attn.attn_sink", "mtp.0.e_proj.weight", "mtp.0.hc_head_fn",
               "mtp.0.attn.wq_a.weight", "mtp.0.ffn.shared_experts.w2.weight"]:
    assert name in names, name
  assert names == set(expected_tensors(tiny_config()))
  assert not any(".experts.w" in n or "freqs" in n for n in names)


def test_missing_tensor(saved, tmp_path):
  path = _copy(saved[1], tmp_path)
  name = "layers.2.attn.compressor.wgate.weight"

  def drop(tensors, index):
    del tensors[name]
    del index["weight_map"][name]

  _edit_tensor(path, name, drop)
  with pytest.raises(CheckpointError, match=r"missing tensor layers\.2\.attn\.compressor\.wgate\.weight: "
                                            r"expected shape \(32, 64\)"):
    load_model(path)


def test_unexpected_tensor(saved, tmp_path):
  path = _copy(saved[1], tmp_path)
  name = "norm.weight"

  def add(tensors, index):
    tensors["layers.9.attn.wq_a.weight"] = np.zeros((2, 2), np.float32)
    index["weight_map"]["layers.9.attn.wq_a.weight"] = index["weight_map"][name]

  _edit_tensor(path, name, add)
  with pytest.raises(CheckpointError, match=r"unexpected tensor layers\.9\.attn\.wq_a\.weight"):
    load_model(path)


def test_misshaped_tensor(saved, tmp_path):
  path = _copy(saved[1], tmp_path)
  name = "layers.3.attn.wkv.weight"
  _edit_tensor(path, name, lambda t, i: t.__setitem__(name, np.ascontiguousarray(t[name].T)))
  with pytest.raises(CheckpointError, match=r"layers\.3\.attn\.wkv\.weight: expected \(32, 64\), got \(64, 32\)"):
    load_model(path)


def test_scale_for_unquantised_weight_is_named(saved, tmp_path):
  """Block scales are only valid beside FP8 / FP4 weights (quantised loading: test_quantized_checkpoint.py)."""
  path = _copy(saved[1], tmp_path)
  name = "layers.3.attn.wq_a.weight"

  def add_scale(tensors, index):
    tensors["layers.3.attn.wq_a.scale"] = np.ones((1, 1), np.float32)
    index["weight_map"]["layers.3.attn.wq_a.scale"] = index["weight_map"][name]

  _edit_tensor(path, name, add_scale)
  with pytest.raises(CheckpointError, match=r"layers\.3\.attn\.wq_a\.scale: block scales given for "
                                            r"layers\.3\.attn\.wq_a\.weight, which is stored as F32"):
    load_model(path)


def test_missing_config(saved, tmp_path):
  path = _copy(saved[1], tmp_path)
  os.remove(path / "config.json")
  with pytest.raises(CheckpointError, match="missing config.json"):
    load_model(path)
