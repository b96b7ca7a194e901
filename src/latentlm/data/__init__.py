"""Corpora, vocabularies and batches."""

from latentlm.data.batching import Batch, TextDataset, collate
from latentlm.data.corpus import SPLITS, TextFile, find_corpus, read_lines, split_path
from latentlm.data.vocab import BOS, EOS, PAD, UNK, Vocab

__all__ = [
    "Batch", "TextDataset", "collate", "SPLITS", "TextFile", "find_corpus", "read_lines",
    "split_path", "Vocab", "PAD", "BOS", "EOS", "UNK",
]
