"""Logits parity with Hugging Face transformers' PyTorch DeepSeek-V4 (an independent implementation).

Our random weights are written with `save_checkpoint` in the released layout and loaded by
`DeepseekV4ForCausalLM.from_pretrained`, which converts the released names itself.
"""

import numpy as np
import pytest

from helpers import forward_fn, tiny_model

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

pytestmark = pytest.mark.parity


@pytest.fixture(scope="module")
def models(tmp_path_factory):
  path = tmp_path_factory.mktemp("ckpt")
  ours = tiny_model(seed=0)
  from dsv4_jax.convert import save_checkpoint
  save_checkpoint(ours, path)
  ref = transformers.DeepseekV4ForCausalLM.from_pretrained(
      path, dtype=torch.float32, attn_implementation="eager").eval()
  return ours, ref


def _reference_logits(ref, ids):
  with torch.no_grad():
    return ref(input_ids=torch.tensor(ids), use_cache=False).logits.numpy()


def test_every_layer_kind_is_present(models):
  ours, _ = models
  cfg = ours.cfg
  kinds = set(cfg.compress_ratios[:cfg.num_hidden_layers])
  assert kinds == {0, 4, 128} and cfg.num_hash_layers >= 1 and cfg.index_n_heads >= 16


@pytest.mark.parametrize("seq_len", [37, 600])
def test_logits_match_transformers(models, seq_len):
  """S = 600: far past the window (16), 4 complete HCA blocks, 150 CSA entries for top-8."""
  ours, ref = models
  ids = np.random.default_rng(seq_len).integers(0, ours.cfg.vocab_size, (2, seq_len))
  expected = _reference_logits(ref, ids)
  got = np.asarray(forward_fn(ours)(ids).logits)
  assert got.shape == expected.shape
  rel = np.abs(got - expected).max() / np.abs(expected).max()
  assert rel <= 1e-4, f"max |Δ| / max |ref| = {rel:.3g}"
