"""Bits per byte of a model on a held-out text set: every document of the set, exactly once.

  bits/byte = Σ_t −ln p(x_t+1 | x_≤t) / ln 2 / Σ_t bytes(x_t+1)

summed over every target of every document ([BOS] + text + [EOS], packed into rows of `seq_len`
in file order by the training loader's aligned packer: no token is dropped). bytes(EOS) = 0: the
end-of-document prediction is scored but covers no text, as in the training loop's validation.
As in training, a document that does not fit in what is left of a row continues at the start of the
next row without the context before it: the number depends on `seq_len` and `align` (each document
starts at a multiple of `align`), and approaches whole-document scoring as rows grow longer.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np

from dsv4_jax.config import DataConfig
from dsv4_jax.config.errors import ConfigError
from dsv4_jax.data import DataError, bits_per_byte, make_dataset, split_source
from dsv4_jax.data.tokenizer import Tokenizer
from dsv4_jax.train.step import make_eval_step, split_model

SOURCE_BY_SUFFIX = {".jsonl": "jsonl", ".parquet": "parquet", ".array_record": "array_record"}


def source_kind(paths: Sequence[str]) -> str:
  """The DataConfig source of `paths` from their file names: *.jsonl, *.parquet, *.array_record,
  else "text" (text files, or directories of text files). Mixed kinds are an error."""
  kinds = {SOURCE_BY_SUFFIX.get(os.path.splitext(p)[1].lower(), "text") for p in paths}
  if len(kinds) != 1:
    raise ConfigError(f"--data: expected files of one kind, got {sorted(kinds)} from {list(paths)} "
                      f"(pass --source to read them all as one kind)")
  return kinds.pop()


def heldout_data_config(paths: Sequence[str], *, source: str, tokenizer: str, align: int,
                        text_field: str = "text", file_glob: str = "*") -> DataConfig:
  """A DataConfig whose validation split is every document under `paths`."""
  for path in paths:
    if not os.path.exists(path):
      raise FileNotFoundError(f"--data {path}: no such file or directory")
  return DataConfig(source=source, paths=tuple(paths), validation_paths=tuple(paths), text_field=text_field,
                    file_glob=file_glob, tokenizer=tokenizer, align=align)


def check_heldout(data_config: DataConfig, seq_len: int, batch_size: int) -> None:
  """Raises ConfigError for a row shape the packer cannot use, DataError for a held-out set without
  documents; cheap (lists the documents, reads none), so it can run before a model is loaded."""
  if seq_len < 1 or seq_len % data_config.align:
    raise ConfigError(f"--seq_len: expected a positive multiple of {data_config.align} (packed documents start "
                      f"at multiples of data.align, or of the model's largest compression ratio), got {seq_len}")
  if batch_size < 1:
    raise ConfigError(f"--batch_size: expected a positive integer, got {batch_size}")
  split_source(data_config, "validation")


def evaluate_heldout(model, data_config: DataConfig, *, seq_len: int, batch_size: int, attention: str,
                     tokenizer: Tokenizer | None = None) -> dict:
  """Evaluates `model` on the whole validation split of `data_config`, one pass.

  model: a Transformer (training checkpoint or released layout). attention: "dense" | "sparse".
  Returns {"bits_per_byte", "loss" (nats per target), "targets", "bytes", "documents", "rows"}.
  """
  check_heldout(data_config, seq_len, batch_size)
  batches = make_dataset(data_config, seq_len, batch_size, tokenizer, split="validation", num_epochs=1)
  if batches.tokenizer.vocab_size > model.cfg.vocab_size:
    raise ConfigError(f"tokenizer {data_config.tokenizer!r} has {batches.tokenizer.vocab_size} ids; the model's "
                      f"vocabulary has only {model.cfg.vocab_size}")
  graphdef, params, extra = split_model(model)
  evaluate = make_eval_step(graphdef)
  loss_sum = targets = n_bytes = 0.0
  for batch in batches:
    s, c, b = evaluate(params, extra, batch, attention)
    loss_sum, targets, n_bytes = loss_sum + float(s), targets + float(c), n_bytes + float(b)
  stats = batches.packing_stats()
  if n_bytes == 0:
    raise DataError(f"held-out set {list(data_config.validation_paths)}: its documents hold no text bytes")
  return {"bits_per_byte": bits_per_byte(loss_sum, n_bytes), "loss": loss_sum / targets, "targets": int(targets),
          "bytes": int(n_bytes), "documents": stats["documents"], "rows": stats["rows"]}
