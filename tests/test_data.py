"""Data pipeline tests: packing conservation and isolation, alignment, exact resume (also across a
change of seq_len / batch size), sharding, document and row shuffling, sources, tokenizers, errors, corpus split.

References are independent of the packer: documents are built so every token names its document
and index (token = 1000·doc + k), and rows are checked against the documents, a hand-laid example
and a naive segment attention mask.
"""

from __future__ import annotations

import dataclasses
import json
import pathlib
import sysconfig

import grain
import numpy as np
import pytest

from dsv4_jax.data import (AlignedPackIterDataset, ByteTokenizer, DataConfig, HFTokenizer,
                           bits_per_byte, load_tokenizer, make_dataset, split_source,
                           unigram_byte_entropy, validation_sample)
from dsv4_jax.data.corpus import STDLIB_EXCLUDE_DIRS, stdlib_root

PAD = 9999


def _synthetic_documents(lengths):
  """Document d = [1000·d + k for k in range(L_d)] (L_d tokens, so L_d − 1 input/target pairs)."""
  return [{"tokens": (1000 * d + np.arange(n)).astype(np.int32),
           "token_bytes": np.ones(n, np.int32)} for d, n in enumerate(lengths)]


def _pack(documents, seq_len, align):
  dataset = AlignedPackIterDataset(grain.MapDataset.source(documents).to_iter_dataset(),
                                   seq_len=seq_len, align=align, pad_id=PAD)
  return list(dataset)


def _pieces(row):
  """[(start, end, segment id)] of the maximal runs of equal non-zero segment id."""
  seg = row["segment_ids"]
  pieces, t = [], 0
  while t < len(seg):
    if seg[t] == 0:
      t += 1
      continue
    end = t
    while end < len(seg) and seg[end] == seg[t]:
      end += 1
    pieces.append((t, end, int(seg[t])))
    t = end
  return pieces


def _check_rows(rows, documents, align):
  """Every property of the packing contract, against the source documents."""
  remaining = [(d, 0) for d in range(len(documents))]   # (document, next pair) queue
  cursor = 0
  for row in rows:
    seq_len = len(row["input_ids"])
    pad = row["segment_ids"] == 0
    assert np.all(row["loss_mask"] == (~pad).astype(np.float32))
    assert np.all(row["positions"][pad] == 0)
    assert np.all(row["input_ids"][pad] == PAD) and np.all(row["targets"][pad] == PAD)
    assert np.all(row["target_bytes"][pad] == 0)
    pieces = _pieces(row)
    assert [p[2] for p in pieces] == list(range(1, len(pieces) + 1)), "segments number 1, 2, ..."
    for i, (start, end, _) in enumerate(pieces):
      assert start % align == 0, f"piece starts at {start}, not a multiple of {align}"
      if i + 1 < len(pieces):  # gap to the next piece is only the alignment padding
        assert pieces[i + 1][0] == -(-end // align) * align
      np.testing.assert_array_equal(row["positions"][start:end], np.arange(end - start))
      d, k = remaining[cursor]
      tokens = documents[d]["tokens"]
      n = end - start
      # No token is lost, duplicated or reordered: the piece is the next run of this document.
      np.testing.assert_array_equal(row["input_ids"][start:end], tokens[k:k + n])
      np.testing.assert_array_equal(row["targets"][start:end], tokens[k + 1:k + n + 1])
      assert np.all(row["targets"][start:end] // 1000 == d), "a target crosses documents"
      if k + n == len(tokens) - 1:
        cursor += 1
      else:
        assert end == seq_len, "only a piece that fills the row to its end may be cut"
        remaining[cursor] = (d, k + n)
    # Isolation under the model's rule (same segment and causal): an allowed (query, key) pair
    # never joins two documents.
    seg = row["segment_ids"]
    allowed = (seg[:, None] == seg[None, :]) & (seg[:, None] > 0) & np.tri(seq_len, dtype=bool)
    doc_of = np.where(seg > 0, row["input_ids"] // 1000, -1)
    assert not np.any(allowed & (doc_of[:, None] != doc_of[None, :]))
  assert cursor == len(documents), f"only {cursor} of {len(documents)} documents were emitted"


def test_packing_hand_laid_example():
  # seq_len 16, align 4; documents with 5, 2 and 20 pairs (6, 3, 21 tokens).
  documents = _synthetic_documents([6, 3, 21])
  rows = _pack(documents, seq_len=16, align=4)
  assert len(rows) == 2
  np.testing.assert_array_equal(rows[0]["segment_ids"],
                                [1, 1, 1, 1, 1, 0, 0, 0, 2, 2, 0, 0, 3, 3, 3, 3])
  np.testing.assert_array_equal(rows[0]["positions"],
                                [0, 1, 2, 3, 4, 0, 0, 0, 0, 1, 0, 0, 0, 1, 2, 3])
  np.testing.assert_array_equal(rows[0]["input_ids"][12:], [2000, 2001, 2002, 2003])
  np.testing.assert_array_equal(rows[0]["targets"][12:], [2001, 2002, 2003, 2004])
  # The long document continues in the next row, positions restarting at 0, segment 1.
  np.testing.assert_array_equal(rows[1]["segment_ids"], np.ones(16))
  np.testing.assert_array_equal(rows[1]["positions"], np.arange(16))
  np.testing.assert_array_equal(rows[1]["input_ids"], 2004 + np.arange(16))
  np.testing.assert_array_equal(rows[1]["targets"], 2005 + np.arange(16))


@pytest.mark.parametrize("seq_len,align", [(32, 8), (256, 128), (24, 1)])
def test_packing_conserves_tokens_and_isolates_documents(seq_len, align):
  rng = np.random.default_rng(seq_len)
  lengths = np.concatenate([[2, seq_len + 1, seq_len, 3 * seq_len + 5, align + 1],
                            rng.integers(2, 3 * seq_len, size=60)])
  documents = _synthetic_documents(lengths.tolist())
  rows = _pack(documents, seq_len, align)
  _check_rows(rows, documents, align)


def _write_corpus(directory: pathlib.Path, count: int, seed: int = 0) -> list[str]:
  rng = np.random.default_rng(seed)
  texts = []
  for i in range(count):
    words = [f"w{rng.integers(1000)}" for _ in range(int(rng.integers(5, 120)))]
    text = f"document {i} é " + " ".join(words) + "\n"
    (directory / f"doc{i:03d}.txt").write_text(text, encoding="utf-8")
    texts.append(text)
  return texts


def _real_stream(batches):
  """The loss-bearing input tokens of batches, row-major: the packed token stream."""
  return np.concatenate([b["input_ids"][b["loss_mask"] > 0] for b in batches])


def test_loader_round_trip_on_text_files(tmp_path):
  texts = _write_corpus(tmp_path, 40)
  config = DataConfig(source="text", paths=(str(tmp_path),), validation_fraction=0.0, shuffle=False,
                      align=16)
  iterator = make_dataset(config, seq_len=64, batch_size=3, split="train", num_epochs=1)
  batches = list(iterator)
  tok = ByteTokenizer()
  for b in batches:
    assert {k: (v.shape, v.dtype.kind) for k, v in b.items()} == {
        "input_ids": ((3, 64), "i"), "targets": ((3, 64), "i"), "loss_mask": ((3, 64), "f"),
        "segment_ids": ((3, 64), "i"), "positions": ((3, 64), "i"), "target_bytes": ((3, 64), "i")}
  # Documents in file-name order, each [BOS] + UTF-8 bytes (the EOS is the last target).
  expected = np.concatenate([np.concatenate([[tok.bos_id], tok.encode(t)]) for t in texts])
  np.testing.assert_array_equal(_real_stream(batches), expected)
  assert sum(int(b["target_bytes"].sum()) for b in batches) == sum(len(t.encode()) for t in texts)
  assert sum(int((b["targets"] == tok.eos_id).sum()) for b in batches) == len(texts)
  stats = iterator.packing_stats()
  total_padding = sum(int((b["loss_mask"] == 0).sum()) for b in batches)
  assert stats["documents"] == len(texts) and stats["tokens"] == len(expected)
  # The last batch's fill rows are added after packing, so they are not counted as packer waste.
  fill_rows = sum(int(np.all(b["segment_ids"] == 0, axis=1).sum()) for b in batches)
  assert stats["padding"] == total_padding - fill_rows * 64
  assert 0 < stats["waste"] < 1


def test_stdlib_batches_start_documents_at_multiples_of_128():
  config = DataConfig()
  iterator = make_dataset(config, seq_len=512, batch_size=4, split="validation")
  starts = []
  for _ in range(30):
    batch = next(iterator)
    for r in range(4):
      row = {k: v[r] for k, v in batch.items()}
      starts += [start for start, _, _ in _pieces(row)]
      # Targets are the next input inside a piece.
      same = row["segment_ids"][1:] == row["segment_ids"][:-1]
      np.testing.assert_array_equal(row["targets"][:-1][same & (row["segment_ids"][1:] > 0)],
                                    row["input_ids"][1:][same & (row["segment_ids"][1:] > 0)])
  assert starts and all(s % 128 == 0 for s in starts)
  assert any(s > 0 for s in starts), "expected some documents starting inside a row"
  assert iterator.tokenizer.vocab_size <= 512   # fits the tiny model's vocabulary


@pytest.mark.parametrize("prefetch_batches,row_shuffle_tokens", [(0, 0), (2, 0), (2, 131072)])
def test_restored_iterator_resumes_at_the_same_example(prefetch_batches, row_shuffle_tokens):
  config = DataConfig(prefetch_batches=prefetch_batches, seed=7, row_shuffle_tokens=row_shuffle_tokens)
  iterator = make_dataset(config, seq_len=256, batch_size=4)
  for _ in range(13):
    next(iterator)
  state = json.loads(json.dumps(iterator.get_state()))   # survives a JSON checkpoint
  if row_shuffle_tokens:
    assert 0 < state["pipeline"]["consumed"] < row_shuffle_tokens // 256, "test should cut inside a window"
  else:
    assert state["pipeline"]["in_document"], "test should cut inside a document"
  expected = [next(iterator) for _ in range(5)]
  restored = make_dataset(config, seq_len=256, batch_size=4)
  restored.set_state(state)
  for want in expected:
    got = next(restored)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  assert restored.packing_stats() == iterator.packing_stats()


def _rows(batches):
  return [tuple(row) for b in batches for row, real in zip(b["input_ids"], b["loss_mask"].any(axis=1)) if real]


def test_row_shuffle_permutes_rows_within_each_window():
  window = 16
  shuffled = make_dataset(DataConfig(seed=5, row_shuffle_tokens=window * 256), 256, 4)
  in_order = make_dataset(DataConfig(seed=5, row_shuffle_tokens=0), 256, 4)
  got = _rows([next(shuffled) for _ in range(3 * window // 4)])
  want = _rows([next(in_order) for _ in range(3 * window // 4)])
  for k in range(3):
    assert sorted(got[k * window:(k + 1) * window]) == sorted(want[k * window:(k + 1) * window])
  first_batch = sorted(want.index(row) for row in got[:4])
  assert first_batch[-1] - first_batch[0] > 3, "a shuffled batch should not be consecutive rows"


def test_orbax_checkpoint_round_trip(tmp_path):
  ocp = pytest.importorskip("orbax.checkpoint")
  iterator = make_dataset(DataConfig(), 256, 2)
  for _ in range(3):
    next(iterator)
  manager = ocp.CheckpointManager(tmp_path / "ckpt")
  manager.save(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(iterator)))
  manager.wait_until_finished()
  expected = next(iterator)
  restored = make_dataset(DataConfig(), 256, 2)
  manager.restore(3, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(restored)))
  got = next(restored)
  for key in expected:
    np.testing.assert_array_equal(got[key], expected[key], err_msg=key)


def test_new_stage_continues_the_token_stream():
  config = DataConfig(seed=3, row_shuffle_tokens=0)
  reference = _real_stream([b for b, _ in zip(make_dataset(config, 256, 4), range(12))])
  first_stage = make_dataset(config, seq_len=256, batch_size=4)
  consumed = [next(first_stage) for _ in range(5)]
  state = first_stage.get_state()
  second_stage = make_dataset(config, seq_len=512, batch_size=2)   # same tokens per batch
  second_stage.set_state(state)
  continued = [next(second_stage) for _ in range(4)]
  stream = np.concatenate([_real_stream(consumed), _real_stream(continued)])
  np.testing.assert_array_equal(stream, reference[:len(stream)])
  assert len(stream) > len(_real_stream(consumed))


def test_new_stage_with_row_shuffle_recuts_the_current_window():
  """With row shuffling the next stage starts at the first token of the current window: its first
  window holds exactly the rows an unshuffled iterator at the new seq_len packs from there."""
  config = DataConfig(seed=3, row_shuffle_tokens=8 * 512)
  first_stage = make_dataset(config, seq_len=256, batch_size=4)
  for _ in range(5):   # 20 rows: 4 into the third 16-row window
    next(first_stage)
  state = first_stage.get_state()
  assert state["pipeline"]["consumed"] == 4
  second_stage = make_dataset(config, seq_len=512, batch_size=2)
  second_stage.set_state(state)
  got = _rows([next(second_stage) for _ in range(4)])   # one 8-row window at seq_len 512
  unshuffled = make_dataset(dataclasses.replace(config, row_shuffle_tokens=0), seq_len=512, batch_size=2)
  unshuffled.set_state({**unshuffled.get_state(), "pipeline": state["pipeline"]["window_start"]})
  want = _rows([next(unshuffled) for _ in range(4)])
  assert sorted(got) == sorted(want) and got != want


def test_validation_sample_is_a_fixed_uniform_sample_of_rows(tmp_path):
  _write_corpus(tmp_path, 60)
  config = DataConfig(source="text", paths=(str(tmp_path),), validation_fraction=0.5, align=16)
  all_rows = _rows(make_dataset(config, 64, 1, split="validation"))
  sample = validation_sample(config, 64, 3, 10)
  assert [b["input_ids"].shape for b in sample] == [(3, 64)] * 4   # 10 rows, the last batch padded
  rows = _rows(sample)
  positions = [all_rows.index(row) for row in rows]
  assert len(rows) == 10 and positions == sorted(positions)
  assert positions[-1] > len(all_rows) // 2, "a sample should reach beyond the split's first rows"
  assert _rows(validation_sample(config, 64, 3, 10)) == rows   # the same rows every time
  assert len(_rows(validation_sample(config, 64, 4, 10 * len(all_rows)))) == len(all_rows)


def test_state_from_another_stream_is_refused():
  state = make_dataset(DataConfig(seed=1), 256, 2).get_state()
  other = make_dataset(DataConfig(seed=2), 256, 2)
  with pytest.raises(ValueError, match="seed: saved 1, now 2"):
    other.set_state(state)


def _documents_seen(batches, tokenizer):
  names = set()
  for b in batches:
    for r in range(b["input_ids"].shape[0]):
      for start, end, _ in _pieces({k: v[r] for k, v in b.items()}):
        if b["positions"][r, start] == 0 and b["input_ids"][r, start] == tokenizer.bos_id:
          names.add(tokenizer.decode(b["input_ids"][r, start:end]).split(" é")[0])
  return names


def test_shards_are_disjoint_and_cover_the_split(tmp_path):
  _write_corpus(tmp_path, 30)
  config = DataConfig(source="text", paths=(str(tmp_path),), validation_fraction=0.0, align=16)
  tok = ByteTokenizer()
  seen = [_documents_seen(make_dataset(config, 128, 2, shard_index=i, shard_count=3, num_epochs=1),
                          tok) for i in range(3)]
  assert all(seen) and not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])
  assert set().union(*seen) == {f"document {i}" for i in range(30)}


def test_shuffle_is_seeded(tmp_path):
  _write_corpus(tmp_path, 30)
  config = DataConfig(source="text", paths=(str(tmp_path),), validation_fraction=0.0, align=16)

  def order(seed):
    batches = make_dataset(config, 128, 2, seed=seed, num_epochs=1)
    return _real_stream(list(batches))

  a, b, c = order(0), order(0), order(1)
  np.testing.assert_array_equal(a, b)
  assert len(a) == len(c) and not np.array_equal(a, c)
  np.testing.assert_array_equal(np.sort(a), np.sort(c))   # same tokens, another order


def test_validation_ends_with_padded_batch(tmp_path):
  _write_corpus(tmp_path, 5)
  config = DataConfig(source="text", paths=(str(tmp_path),), validation_fraction=0.0, align=16)
  batches = list(make_dataset(config, 512, 8, num_epochs=1))
  assert len(batches) == 1 and batches[0]["input_ids"].shape == (8, 512)
  assert np.all(batches[0]["segment_ids"][-1] == 0)   # fill rows are all padding, no loss


def test_jsonl_parquet_and_array_record_sources(tmp_path):
  texts = ["first document", "second ünïcode", "third"]
  (tmp_path / "d.jsonl").write_text(
      "\n".join(json.dumps({"body": t, "id": i}) for i, t in enumerate(texts)) + "\n\n")
  configs = [DataConfig(source="jsonl", paths=(str(tmp_path / "d.jsonl"),), text_field="body",
                        validation_fraction=0.0, shuffle=False)]
  pyarrow = pytest.importorskip("pyarrow")
  import pyarrow.parquet as pq
  pq.write_table(pyarrow.table({"content": texts}), tmp_path / "d.parquet", row_group_size=2)
  configs.append(DataConfig(source="parquet", paths=(str(tmp_path / "d.parquet"),),
                            text_field="content", validation_fraction=0.0, shuffle=False))
  from array_record.python.array_record_module import ArrayRecordWriter
  writer = ArrayRecordWriter(str(tmp_path / "d.array_record"), "group_size:1")
  for t in texts:
    writer.write(t.encode("utf-8"))
  writer.close()
  configs.append(DataConfig(source="array_record", paths=(str(tmp_path / "d.array_record"),),
                            validation_fraction=0.0, shuffle=False))
  tok = ByteTokenizer()
  expected = np.concatenate([np.concatenate([[tok.bos_id], tok.encode(t)]) for t in texts])
  for config in configs:
    stream = _real_stream(list(make_dataset(config, 128, 2, num_epochs=1)))
    np.testing.assert_array_equal(stream, expected, err_msg=config.source)


def test_explicit_validation_paths(tmp_path):
  (tmp_path / "train.txt").write_text("train text")
  (tmp_path / "val.txt").write_text("held out")
  config = DataConfig(source="text", paths=(str(tmp_path / "train.txt"),),
                      validation_paths=(str(tmp_path / "val.txt"),))
  assert [split_source(config, s)[0] for s in ("train", "validation")] == ["train text", "held out"]


# --- malformed inputs -------------------------------------------------------------------------


def test_missing_file_error_names_path(tmp_path):
  missing = str(tmp_path / "nope.txt")
  with pytest.raises(FileNotFoundError, match="nope.txt"):
    make_dataset(DataConfig(source="text", paths=(missing,)), 128, 1)


def test_empty_corpus_errors(tmp_path):
  (tmp_path / "empty").mkdir()
  (tmp_path / "empty" / "zero.txt").write_text("")
  with pytest.raises(ValueError, match="empty corpus.*split 'train'"):
    make_dataset(DataConfig(source="text", paths=(str(tmp_path / "empty"),)), 128, 1)
  (tmp_path / "blank.jsonl").write_text("\n  \n")
  with pytest.raises(ValueError, match="empty corpus"):
    make_dataset(DataConfig(source="jsonl", paths=(str(tmp_path / "blank.jsonl"),)), 128, 1)


def test_bad_jsonl_line_error_names_file_and_line(tmp_path):
  path = tmp_path / "bad.jsonl"
  path.write_text('{"text": "ok"}\n\n{"text": "fine"}\n{"text": broken}\n')
  config = DataConfig(source="jsonl", paths=(str(path),), validation_fraction=0.0, shuffle=False)
  with pytest.raises(ValueError, match=r"bad\.jsonl:4: invalid JSON"):
    list(make_dataset(config, 128, 4, num_epochs=1))
  path.write_text('{"text": "ok"}\n{"body": "no text field"}\n')
  with pytest.raises(ValueError, match=r"bad\.jsonl:2: no field 'text'"):
    list(make_dataset(config, 128, 4, num_epochs=1))


def test_missing_tokenizer_file_error(tmp_path):
  missing = str(tmp_path / "tokenizer.json")
  with pytest.raises(FileNotFoundError, match="tokenizer file .*tokenizer.json"):
    HFTokenizer(missing)
  with pytest.raises(FileNotFoundError, match="tokenizer file"):
    make_dataset(DataConfig(tokenizer=missing), 128, 1)


def test_bad_lengths_and_config_errors():
  with pytest.raises(ValueError, match="multiple of data.align 128, got 200"):
    make_dataset(DataConfig(), 200, 1)
  with pytest.raises(ValueError, match="data.source"):
    DataConfig(source="csv")
  with pytest.raises(ValueError, match="data.paths"):
    DataConfig(source="jsonl")


# --- tokenizers -------------------------------------------------------------------------------


def test_byte_tokenizer_round_trip_and_special_ids():
  tok = ByteTokenizer()
  text = "héllo wörld ✓\n"
  ids = tok.encode(text)
  assert ids.tolist() == list(text.encode("utf-8"))
  assert tok.decode(np.concatenate([[tok.bos_id], ids, [tok.eos_id, tok.pad_id]])) == text
  assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (256, 257, 258, 259)
  assert isinstance(load_tokenizer("byte"), ByteTokenizer)


def test_hf_tokenizer(tmp_path):
  tokenizers = pytest.importorskip("tokenizers")
  model = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token=None))
  model.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
  model.decoder = tokenizers.decoders.ByteLevel()
  trainer = tokenizers.trainers.BpeTrainer(
      vocab_size=300, special_tokens=["<s>", "</s>"],
      initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
  model.train_from_iterator(["def f(x):\n  return x + 1\n"] * 50, trainer=trainer)
  path = tmp_path / "tokenizer.json"
  model.save(str(path))
  tok = load_tokenizer(str(path))
  assert (tok.bos_id, tok.eos_id) == (model.token_to_id("<s>"), model.token_to_id("</s>"))
  assert tok.pad_id == tok.eos_id and tok.vocab_size == model.get_vocab_size()
  text = "def g(y):\n  return y * 2  # ünï </s>\n"
  ids, counts = tok.encode_with_byte_counts(text)
  assert tok.decode(ids) == text
  assert tok.eos_id not in ids.tolist()   # special-token text in a document stays plain text
  assert counts.sum() == len(text.encode("utf-8")) and np.all(counts >= 0)


# --- corpus -----------------------------------------------------------------------------------


def _looks_binary(path: pathlib.Path) -> bool:
  with path.open("rb") as f:
    return b"\0" in f.read(8192)


def test_stdlib_split_is_deterministic_disjoint_and_complete():
  config = DataConfig()
  train, validation = split_source(config, "train"), split_source(config, "validation")
  train_keys = {train.key(i) for i in range(len(train))}
  validation_keys = {validation.key(i) for i in range(len(validation))}
  assert not train_keys & validation_keys
  again = split_source(config, "validation")
  assert [again.key(i) for i in range(len(again))] == sorted(validation_keys)
  root = pathlib.Path(sysconfig.get_paths()["stdlib"])
  assert str(root) == stdlib_root()
  expected = set()
  for path in root.rglob("*.py"):
    rel = path.relative_to(root)
    if (set(rel.parts[:-1]) & set(STDLIB_EXCLUDE_DIRS) or any(p.startswith(".") for p in rel.parts)
        or path.stat().st_size == 0 or _looks_binary(path)):
      continue
    expected.add(rel.as_posix())
  assert train_keys | validation_keys == expected
  assert 0.02 < len(validation_keys) / len(expected) < 0.10   # validation_fraction 0.05


def test_unigram_byte_entropy_closed_forms():
  assert unigram_byte_entropy(["abab"]) == pytest.approx(1.0)
  assert unigram_byte_entropy([bytes(range(256))]) == pytest.approx(8.0)
  assert unigram_byte_entropy(["aaaa"]) == pytest.approx(0.0)
  assert unigram_byte_entropy(["aab", "b"]) == pytest.approx(1.0)   # pooled histogram
  assert bits_per_byte(8 * np.log(2.0), 4) == pytest.approx(2.0)
