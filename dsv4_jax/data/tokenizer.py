"""Tokenizers: text -> int32 ids, with the special ids the packer needs (BOS, EOS, PAD).

ByteTokenizer (default, no download): id b for byte b of the UTF-8 encoding (0..255), then
  BOS = 256, EOS = 257, PAD = 258; vocab_size = 259 (fits the tiny config's 512).
HFTokenizer: any Hugging Face `tokenizer.json` (e.g. the one shipped with DeepSeek's checkpoints)
  through the `tokenizers` library; special tokens found by name or given explicitly.

Both also report how many UTF-8 bytes of the text each token covers (`encode_with_byte_counts`),
so bits per byte = Σ loss (nats) / ln 2 / Σ bytes is exact for any tokenizer; special tokens cover 0.
"""

from __future__ import annotations

import os
from typing import Protocol, Sequence

import numpy as np

from dsv4_jax.data.errors import DataError


class Tokenizer(Protocol):
  vocab_size: int
  bos_id: int
  eos_id: int
  pad_id: int
  name: str

  def encode(self, text: str) -> np.ndarray: ...

  def encode_with_byte_counts(self, text: str) -> tuple[np.ndarray, np.ndarray]: ...

  def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255; BOS 256, EOS 257, PAD 258."""

  name = "byte"
  bos_id = 256
  eos_id = 257
  pad_id = 258
  vocab_size = 259

  def encode(self, text: str | bytes) -> np.ndarray:
    data = text.encode("utf-8") if isinstance(text, str) else bytes(text)
    return np.frombuffer(data, dtype=np.uint8).astype(np.int32)

  def encode_with_byte_counts(self, text: str | bytes) -> tuple[np.ndarray, np.ndarray]:
    ids = self.encode(text)
    return ids, np.ones_like(ids)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f"ByteTokenizer.decode: ids must lie in [0, {self.vocab_size}), got "
                       f"range [{ids.min()}, {ids.max()}]")
    return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


# Names tried in order when the caller does not name the special tokens (DeepSeek, Llama/SentencePiece,
# GPT-2/Qwen, Gemma conventions).
_BOS_NAMES = ("<｜begin▁of▁sentence｜>", "<s>", "<|begin_of_text|>", "<bos>", "[BOS]", "<|endoftext|>")
_EOS_NAMES = ("<｜end▁of▁sentence｜>", "</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "[EOS]")
_PAD_NAMES = ("<｜▁pad▁｜>", "<pad>", "[PAD]", "<|pad|>")


class HFTokenizer:
  """A Hugging Face `tokenizer.json`. Special-token strings inside documents are encoded as plain
  text (never as the special ids), so a corpus cannot inject BOS/EOS by accident."""

  def __init__(self, path: str, *, bos_token: str | None = None, eos_token: str | None = None,
               pad_token: str | None = None):
    import tokenizers  # imported lazily: only needed for this tokenizer.

    if os.path.isdir(path):
      path = os.path.join(path, "tokenizer.json")
    if not os.path.isfile(path):
      raise FileNotFoundError(
          f"tokenizer file {path!r} not found: expected a Hugging Face tokenizer.json "
          f"(or DataConfig.tokenizer='byte')")
    try:
      self._tok = tokenizers.Tokenizer.from_file(path)
    except Exception as e:  # the library raises a bare Exception on malformed JSON
      raise DataError(f"tokenizer file {path!r} is not a valid Hugging Face tokenizer.json: {e}") from e
    self._tok.encode_special_tokens = True
    self.name = os.path.abspath(path)
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    self.eos_id = self._special_id(eos_token, _EOS_NAMES, "EOS", path)
    # Without a BOS token, EOS doubles as the document separator at the start (GPT-2 style).
    self.bos_id = self._special_id(bos_token, _BOS_NAMES, "BOS", path, default=self.eos_id)
    self.pad_id = self._special_id(pad_token, _PAD_NAMES, "PAD", path, default=self.eos_id)

  def _special_id(self, given: str | None, candidates: Sequence[str], role: str, path: str,
                  default: int | None = None) -> int:
    names = (given,) if given is not None else candidates
    for name in names:
      token_id = self._tok.token_to_id(name)
      if token_id is not None:
        return token_id
    if given is None and default is not None:
      return default
    raise DataError(f"tokenizer {path!r}: no {role} token; tried {list(names)} "
                    f"(pass {role.lower()}_token=... to HFTokenizer)")

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def encode_with_byte_counts(self, text: str) -> tuple[np.ndarray, np.ndarray]:
    encoding = self._tok.encode(text, add_special_tokens=False)
    ids = np.asarray(encoding.ids, dtype=np.int32)
    if ids.size == 0:
      return ids, np.zeros(0, np.int32)
    # Offsets are character spans; map their ends to byte offsets and take first differences of
    # the running maximum, so the counts are non-negative and sum to the text's byte length.
    char_bytes = np.fromiter((len(c.encode("utf-8", errors="replace")) for c in text), np.int64,
                             count=len(text))
    byte_at_char = np.concatenate([[0], np.cumsum(char_bytes)])
    ends = np.array([end for _, end in encoding.offsets], dtype=np.int64)
    byte_ends = np.maximum.accumulate(byte_at_char[np.clip(ends, 0, len(text))])
    byte_ends[-1] = byte_at_char[-1]
    counts = np.diff(np.concatenate([[0], byte_ends]))
    return ids, counts.astype(np.int32)

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)


def load_tokenizer(spec: str = "byte") -> Tokenizer:
  """"byte" -> ByteTokenizer(); anything else is a path to a tokenizer.json (or its directory)."""
  if spec == "byte":
    return ByteTokenizer()
  return HFTokenizer(spec)
