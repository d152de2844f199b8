"""Loading DeepSeek's released FP8 / FP4 block-scaled checkpoints, built here from known values.

The synthetic checkpoint follows the release: attention / shared-expert / MTP projections as FP8 e4m3
with 128×128 ue8m0 block scales (one with fp32 scales), routed experts as FP4 e2m1 packed two per
int8 byte (low nibble first) with 1×32 ue8m0 scales (one layer as safetensors F4), norms in bf16,
tid2eid as int32. The expected real values come from ml_dtypes' own fp8/fp4 decoding and np.repeat
block expansion, independent of the loader's index arithmetic.
"""

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file

from dsv4_jax.convert import CheckpointError, load_model, save_checkpoint
from dsv4_jax.convert.names import path_to_name, to_released
from dsv4_jax.convert.quant import StoredTensor, scale_to_float32, unpack_fp4
from dsv4_jax.convert.safetensors_reader import SafetensorsFile
from helpers import forward_fn, tiny_model

HIDDEN = 160  # 128 + 32: FP8 scale grids with a partial last block
FP8_NAME = re.compile(r"\.(wq_a|wq_b|wkv|wo_a|wo_b|e_proj|h_proj)\.weight$|shared_experts\.w[123]\.weight$")
EXPERT_NAME = re.compile(r"\.ffn\.experts\.\d+\.w[123]\.weight$")
FP32_SCALED = "layers.2.attn.wq_b.weight"  # fp32 (not power-of-two) block scales
F4_LAYER = "layers.3."  # its experts use the safetensors F4 dtype instead of int8


def _write_safetensors(path, tensors):
  """tensors: name -> (safetensors dtype string, logical shape, raw bytes)."""
  header, offset, blobs = {}, 0, []
  for name, (dtype, shape, raw) in sorted(tensors.items()):
    header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + len(raw)]}
    offset += len(raw)
    blobs.append(raw)
  encoded = json.dumps(header).encode()
  encoded += b" " * (-len(encoded) % 8)
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(encoded)) + encoded + b"".join(blobs))


def _fp8(rng, shape, fp32_scale=False):
  """-> (stored entries, real values): random e4m3 codes (no NaN) times 128×128 block scales."""
  codes = rng.integers(0, 256, shape, dtype=np.uint8)
  codes[(codes & 0x7F) == 0x7F] = 0x3C  # 0x7F / 0xFF are NaN in e4m3fn
  values = codes.view(ml_dtypes.float8_e4m3fn).astype(np.float32)
  grid = (-(-shape[0] // 128), -(-shape[1] // 128))
  if fp32_scale:
    scale = rng.uniform(1e-3, 4e-3, grid).astype(np.float32)
    scale_entry = ("F32", grid, scale.tobytes())
  else:
    exponent = rng.integers(112, 119, grid, dtype=np.uint8)
    scale = np.ldexp(np.float32(1), exponent.astype(np.int32) - 127).astype(np.float32)
    scale_entry = ("F8_E8M0", grid, exponent.tobytes())
  full = np.repeat(np.repeat(scale, 128, axis=0), 128, axis=1)[:shape[0], :shape[1]]
  return {"weight": ("F8_E4M3", shape, codes.tobytes()), "scale": scale_entry}, values * full


def _fp4(rng, shape, as_f4=False):
  """-> (stored entries, real values): random e2m1 codes packed low nibble first, 1×32 block scales."""
  codes = rng.integers(0, 16, shape, dtype=np.uint8)
  values = codes.view(ml_dtypes.float4_e2m1fn).astype(np.float32)
  packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
  exponent = rng.integers(120, 125, (shape[0], shape[1] // 32), dtype=np.uint8)
  scale = np.ldexp(np.float32(1), exponent.astype(np.int32) - 127).astype(np.float32)
  weight = ("F4", shape, packed.tobytes()) if as_f4 else ("I8", packed.shape, packed.view(np.int8).tobytes())
  return {"weight": weight, "scale": ("F8_E8M0", scale.shape, exponent.tobytes())}, values * np.repeat(scale, 32, 1)


def _plain(value):
  kind = {np.dtype(np.float32): "F32", np.dtype(np.int64): "I64", np.dtype(np.int32): "I32",
          np.dtype(ml_dtypes.bfloat16): "BF16"}[value.dtype]
  return {"weight": (kind, value.shape, np.ascontiguousarray(value).tobytes())}


def _quantise_checkpoint(src, dst, seed=0):
  """Rewrites the fp32 checkpoint `src` into `dst` in the released formats. Returns name -> real values."""
  rng = np.random.default_rng(seed)
  os.makedirs(dst)
  shutil.copy(os.path.join(src, "config.json"), dst)
  with open(os.path.join(src, "model.safetensors.index.json")) as f:
    index = json.load(f)
  weight_map, expected, formats = {}, {}, {}
  for file in sorted(set(index["weight_map"].values())):
    stored = {}
    for name, value in load_file(os.path.join(src, file)).items():
      if FP8_NAME.search(name):
        entries, real = _fp8(rng, value.shape, fp32_scale=name == FP32_SCALED)
        formats[name] = "fp8"
      elif EXPERT_NAME.search(name):
        entries, real = _fp4(rng, value.shape, as_f4=name.startswith(F4_LAYER))
        formats[name] = "fp4"
      elif "norm" in name:
        value = value.astype(ml_dtypes.bfloat16)
        entries, real = _plain(value), value.astype(np.float32)
      elif name.endswith("tid2eid"):
        value = value.astype(np.int32)
        entries, real = _plain(value), value
      else:
        entries, real = _plain(value), value
      expected[name] = real
      stored[name] = entries["weight"]
      if "scale" in entries:
        stored[name[: -len("weight")] + "scale"] = entries["scale"]
    _write_safetensors(os.path.join(dst, file), stored)
    weight_map.update({name: file for name in stored})
  with open(os.path.join(dst, "model.safetensors.index.json"), "w") as f:
    json.dump({"metadata": {}, "weight_map": weight_map}, f)
  return expected, formats


@pytest.fixture(scope="module")
def quantised(tmp_path_factory):
  root = tmp_path_factory.mktemp("quant")
  model = tiny_model(seed=5, hidden_size=HIDDEN)
  save_checkpoint(model, root / "fp32", max_shard_bytes=1 << 19)
  expected, formats = _quantise_checkpoint(str(root / "fp32"), str(root / "released"))
  return str(root / "released"), expected, formats


def _loaded_values(model):
  """Released name -> loaded value (stacked experts split back per expert)."""
  out = {}
  for path, var in nnx.to_flat_state(nnx.state(model)):
    value = np.asarray(var[...])
    names = to_released(path_to_name(path), model.cfg.n_routed_experts)
    for e, name in enumerate(names):
      out[name] = value[e] if len(names) > 1 else value
  return out


def test_synthetic_release_loads_to_known_values(quantised):
  path, expected, formats = quantised
  kinds = {SafetensorsFile(os.path.join(path, f)).dtype(n) for f in os.listdir(path) if f.endswith(".safetensors")
           for n in SafetensorsFile(os.path.join(path, f)).keys()}
  assert {"F8_E4M3", "F8_E8M0", "I8", "F4", "BF16", "I32", "F32"} <= kinds, kinds
  assert sum(f == "fp8" for f in formats.values()) >= 20 and sum(f == "fp4" for f in formats.values()) >= 100
  assert "mtp.0.e_proj.weight" in formats and "mtp.0.ffn.experts.0.w2.weight" in formats

  model = load_model(path)
  loaded = _loaded_values(model)
  assert set(loaded) == set(expected)
  for name, value in expected.items():
    np.testing.assert_array_equal(loaded[name], value, err_msg=name)
  assert loaded["layers.0.ffn.gate.tid2eid"].dtype == np.int32
  ids = np.random.default_rng(0).integers(0, model.cfg.vocab_size, (1, 40))
  assert np.isfinite(np.asarray(forward_fn(model)(ids).logits)).all()


def test_dequantises_to_bfloat16(quantised):
  path, expected, _ = quantised
  loaded = _loaded_values(load_model(path, dtype="bfloat16"))
  for name in ("layers.1.attn.wq_a.weight", FP32_SCALED, "layers.1.ffn.experts.5.w2.weight",
               "layers.3.ffn.experts.2.w1.weight"):
    assert loaded[name].dtype == ml_dtypes.bfloat16, name
    np.testing.assert_array_equal(loaded[name], expected[name].astype(ml_dtypes.bfloat16), err_msg=name)
  # Norm weights stay fp32 (the model keeps norms in fp32); bf16-stored values convert exactly.
  np.testing.assert_array_equal(loaded["layers.2.attn.q_norm.weight"], expected["layers.2.attn.q_norm.weight"])


def test_fp4_nibble_order_and_e8m0_closed_form():
  # byte 0xF2: low nibble 2 (+1.0) is element 0, high nibble 0xF (−6.0) is element 1.
  np.testing.assert_array_equal(unpack_fp4(np.array([[0xF2, 0x71]], np.uint8)), [[1.0, -6.0, 0.5, 6.0]])
  raw = np.array([127, 128, 120, 0, 254, 255], np.uint8).view(ml_dtypes.float8_e8m0fnu)
  np.testing.assert_array_equal(scale_to_float32(raw)[:5], [1.0, 2.0, 2.0 ** -7, 2.0 ** -127, 2.0 ** 127])
  assert np.isnan(scale_to_float32(raw)[5])


def test_slices_read_only_their_part(quantised):
  """Any rectangular slice (odd FP4 column offsets, FP8 blocks straddled) equals the slice of the whole."""
  path, expected, _ = quantised
  with open(os.path.join(path, "model.safetensors.index.json")) as f:
    weight_map = json.load(f)["weight_map"]
  for name, fmt in (("layers.1.ffn.experts.3.w1.weight", "fp4"), ("layers.1.attn.wq_b.weight", "fp8"),
                    ("layers.1.ffn.shared_experts.w1.weight", "fp8")):
    file = SafetensorsFile(os.path.join(path, weight_map[name]))
    scale = name[: -len("weight")] + "scale"
    tensor = StoredTensor(name, file.get(name), fmt, expected[name].shape,
                          SafetensorsFile(os.path.join(path, weight_map[scale])).get(scale))
    for rows, cols in ((slice(3, 29), slice(7, 151)), (slice(0, 1), slice(1, 2)), (slice(5, 6), slice(127, 129))):
      np.testing.assert_array_equal(tensor.read((rows, cols)), expected[name][rows, cols], err_msg=name)


def _rewrite_entry(path, name, fn):
  """Applies fn(header entry dict, index weight_map) to `name`'s shard by rewriting it via the raw bytes."""
  with open(os.path.join(path, "model.safetensors.index.json")) as f:
    index = json.load(f)
  file = os.path.join(path, index["weight_map"][name])
  reader = SafetensorsFile(file)
  tensors = {n: (reader.dtype(n), reader.shape(n), np.ascontiguousarray(reader.get(n)).tobytes())
             for n in reader.keys()}
  fn(tensors, index["weight_map"])
  _write_safetensors(file, tensors)
  with open(os.path.join(path, "model.safetensors.index.json"), "w") as f:
    json.dump(index, f)


def _copy(path, tmp_path):
  shutil.copytree(path, tmp_path / "ckpt")
  return str(tmp_path / "ckpt")


def test_hub_scale_name_weight_scale_inv(quantised, tmp_path):
  """Scales may also be stored under the hub's `<name>.weight_scale_inv` (DeepSeek's convert.py renames it)."""
  path, expected, _ = quantised
  path = _copy(path, tmp_path)
  old, new = "layers.4.attn.wo_b.scale", "layers.4.attn.wo_b.weight_scale_inv"

  def rename(tensors, weight_map):
    tensors[new] = tensors.pop(old)
    weight_map[new] = weight_map.pop(old)

  _rewrite_entry(path, old, rename)
  np.testing.assert_array_equal(_loaded_values(load_model(path))["layers.4.attn.wo_b.weight"],
                                expected["layers.4.attn.wo_b.weight"])


def test_missing_scale_is_named(quantised, tmp_path):
  path = _copy(quantised[0], tmp_path)

  def drop(tensors, weight_map):
    del tensors["layers.4.attn.wq_a.scale"], weight_map["layers.4.attn.wq_a.scale"]

  _rewrite_entry(path, "layers.4.attn.wq_a.scale", drop)
  with pytest.raises(CheckpointError, match=r"layers\.4\.attn\.wq_a\.weight is stored as F8_E4M3 .*scale tensor "
                                            r"layers\.4\.attn\.wq_a\.scale is missing: expected shape \(1, 2\)"):
    load_model(path)


@pytest.mark.parametrize("name, bad, good", [
    ("layers.2.attn.wkv.scale", (2, 2), (1, 2)),
    ("layers.1.ffn.experts.6.w3.scale", (32, 10), (32, 5)),
])
def test_wrong_scale_shape_is_named(quantised, tmp_path, name, bad, good):
  path = _copy(quantised[0], tmp_path)

  def reshape(tensors, weight_map):
    kind = tensors[name][0]
    tensors[name] = (kind, bad, bytes(int(np.prod(bad))))

  _rewrite_entry(path, name, reshape)
  with pytest.raises(CheckpointError, match=rf"{re.escape(name)}: expected shape {re.escape(str(good))} .*"
                                            rf"got {re.escape(str(bad))}"):
    load_model(path)


def test_wrongly_packed_fp4_is_named(quantised, tmp_path):
  path = _copy(quantised[0], tmp_path)
  name = "layers.2.ffn.experts.0.w2.weight"  # logical [160, 32] -> int8 [160, 16]

  def unpack(tensors, weight_map):
    tensors[name] = ("I8", (160, 32), bytes(160 * 32))

  _rewrite_entry(path, name, unpack)
  with pytest.raises(CheckpointError, match=r"layers\.2\.ffn\.experts\.0\.w2\.weight: expected \(160, 16\) "
                                            r"\(FP4 e2m1 packed .* of logical shape \(160, 32\)\), got \(160, 32\)"):
    load_model(path)


MESH_SCRIPT = textwrap.dedent("""
    import sys
    import jax
    jax.config.update("jax_num_cpu_devices", 8)
    import numpy as np
    from flax import nnx
    from dsv4_jax.convert import load_model
    from dsv4_jax.convert import quant
    from dsv4_jax.parallel import make_mesh

    path = sys.argv[1]
    reads = []
    original_read = quant.StoredTensor.read
    def logged_read(self, index=None):
      value = original_read(self, index)
      reads.append((self.name, value.shape))
      return value
    quant.StoredTensor.read = logged_read

    reference = {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(load_model(path)))}
    reads.clear()
    mesh = make_mesh(fsdp=2, expert=2, tensor=2)
    model = load_model(path, mesh=mesh)
    state = dict(nnx.to_flat_state(nnx.state(model)))
    # What the logical axis rules say (vocab→tensor, embed→fsdp, heads→tensor+fsdp, experts→expert, mlp→tensor):
    specs = {("layers", 1, "attn", "wq_b", "weight"): (("tensor", "fsdp"), None),
             ("layers", 1, "attn", "wq_a", "weight"): (None, "fsdp"),
             ("layers", 1, "ffn", "experts", "w1"): ("expert", "tensor", "fsdp"),
             ("layers", 1, "ffn", "experts", "w2"): ("expert", "fsdp", "tensor"),
             ("embed", "weight"): ("tensor", "fsdp"),
             ("layers", 0, "ffn", "gate", "tid2eid"): ("tensor", None)}
    for p, spec in specs.items():
      assert tuple(state[p][...].sharding.spec) == spec, (p, state[p][...].sharding.spec)
    for p, var in state.items():
      value = var[...]
      assert value.dtype == reference[p].dtype, p
      np.testing.assert_array_equal(np.asarray(value), reference[p], err_msg=str(p))
      assert len(value.sharding.device_set) == 8, p
      for shard in value.addressable_shards:
        np.testing.assert_array_equal(np.asarray(shard.data), reference[p][shard.index], err_msg=str(p))
    w1 = [shape for name, shape in reads if name.startswith("layers.1.ffn.experts.") and name.endswith(".w1.weight")]
    # 8 devices, each holding 4 of the 8 experts' [32/2, 160/2] slices: each reads only those.
    assert len(w1) == 8 * 4 and set(w1) == {(16, 80)}, (len(w1), set(w1))
    print("OK", len(state))
""")


def test_loading_onto_a_mesh_reads_each_devices_slice(quantised):
  tests_dir = os.path.dirname(__file__)
  result = subprocess.run([sys.executable, "-c", MESH_SCRIPT, quantised[0]], cwd=tests_dir, capture_output=True,
                          text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=600)
  assert result.returncode == 0, result.stdout + result.stderr
  assert "OK" in result.stdout
