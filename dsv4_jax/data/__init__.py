"""Data pipeline on Grain: sources, tokenizers, aligned packing, the checkpointable loader."""

from dsv4_jax.config import DataConfig
from dsv4_jax.data.corpus import (bits_per_byte, corpus_unigram_byte_entropy, split_source,
                                  stdlib_root, unigram_byte_entropy, validation_score)
from dsv4_jax.data.errors import DataError
from dsv4_jax.data.loader import DataIterator, make_dataset, tokenize_document, validation_sample
from dsv4_jax.data.packing import AlignedPackIterDataset
from dsv4_jax.data.tokenizer import ByteTokenizer, HFTokenizer, Tokenizer, load_tokenizer

__all__ = [
    "AlignedPackIterDataset", "ByteTokenizer", "DataConfig", "DataError", "DataIterator", "HFTokenizer",
    "Tokenizer", "bits_per_byte", "corpus_unigram_byte_entropy", "load_tokenizer",
    "make_dataset", "split_source", "stdlib_root", "tokenize_document", "unigram_byte_entropy",
    "validation_sample", "validation_score",
]
