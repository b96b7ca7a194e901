"""Parallel text (``data.format: parallel``): line i of ``{split}.{source}`` translates to
line i of ``{split}.{target}`` (Multi30K's ``train.de`` / ``train.en``).

A :class:`PairBatch` is a target-side :class:`~latentlm.data.batching.Batch` (``<s> y </s>``:
``inputs``, ``targets``, ``lengths`` = predicted target tokens, so perplexities are per target
token as everywhere else) with the source sentences beside it (``source``: ``w_1 .. w_S </s>``
padded, ``source_lengths``). Batches are bucketed by target length, then source length.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from latentlm.data.batching import Batch, TextDataset, collate
from latentlm.data.corpus import read_lines
from latentlm.data.vocab import Vocab
from latentlm.errors import CorpusError


@dataclass
class PairBatch(Batch):
    source: torch.Tensor          # (B, S) long: w_1..w_S </s> <pad>...
    source_lengths: torch.Tensor  # (B,) long, incl. </s>

    @property
    def source_mask(self) -> torch.Tensor:  # (B, S) bool, True on real source positions
        return torch.arange(self.source.size(1), device=self.source.device)[None, :] < self.source_lengths[:, None]

    def to(self, device: torch.device | str) -> "PairBatch":
        return PairBatch(self.tokens.to(device), self.lengths.to(device), self.index.to(device),
                         self.source.to(device), self.source_lengths.to(device))


def encode_source(vocab: Vocab, tokens: Sequence[str]) -> torch.Tensor:
    """``w_1 .. w_S </s>``: the end marker gives an empty sentence one position to align to."""
    return torch.tensor([*vocab.encode(tokens), vocab.eos_id], dtype=torch.long)


def collate_pairs(sources: Sequence[torch.Tensor], targets: Sequence[torch.Tensor], index: Sequence[int],
                  pad_id: int = Vocab.pad_id) -> PairBatch:
    tgt = collate(targets, index, pad_id)
    src_lengths = torch.tensor([len(s) for s in sources], dtype=torch.long)
    src = torch.full((len(sources), int(src_lengths.max())), pad_id, dtype=torch.long)
    for row, seq in enumerate(sources):
        src[row, : len(seq)] = seq
    return PairBatch(tgt.tokens, tgt.lengths, tgt.index, src, src_lengths)


class ParallelDataset(TextDataset):
    """Sentence pairs; ``vocab`` is the target side's (with ``vocab.source`` the source's).
    Behaves as a :class:`TextDataset` of the target sentences (lengths, tokens, batching)."""

    def __init__(self, sources: Sequence[Sequence[str]], targets: Sequence[Sequence[str]], vocab: Vocab):
        if vocab.source is None:
            raise ValueError("a parallel dataset needs a vocabulary with a source side (Vocab(..., source=...))")
        if len(sources) != len(targets):
            raise ValueError(f"{len(sources)} source sentences for {len(targets)} target sentences")
        super().__init__(targets, vocab)
        self.source_words = [list(s) for s in sources]
        self.target_words = [list(t) for t in targets]  # the references as read (BLEU)
        self.sources = [encode_source(vocab.source, s) for s in sources]

    def head(self, n: int) -> "ParallelDataset":
        out = ParallelDataset.__new__(ParallelDataset)
        out.vocab, out.examples, out.lengths = self.vocab, self.examples[:n], self.lengths[:n]
        out.source_words, out.sources = self.source_words[:n], self.sources[:n]
        out.target_words = self.target_words[:n]
        return out

    def batch_indices(self, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0,
                      bucket: int = 50) -> list[list[int]]:
        if shuffle:
            return super().batch_indices(batch_size, shuffle=True, seed=seed, epoch=epoch, bucket=bucket)
        order = sorted(range(len(self)), key=lambda i: (self.lengths[i], len(self.sources[i])))
        return [order[i: i + batch_size] for i in range(0, len(order), batch_size)]

    def make_batch(self, indices: Sequence[int]) -> PairBatch:
        return collate_pairs([self.sources[i] for i in indices], [self.examples[i] for i in indices], indices,
                             self.vocab.pad_id)


def read_parallel(source_path: Path, target_path: Path, max_tokens: int, limit: int | None,
                  lowercase: bool = False) -> tuple[list[list[str]], list[list[str]]]:
    """The two sides of a split, checked line for line (every problem a ``CorpusError``)."""
    src = read_lines(source_path, max_tokens, limit).lines
    tgt = read_lines(target_path, max_tokens, limit).lines
    if len(src) != len(tgt):
        raise CorpusError(f"{source_path} has {len(src)} lines but {target_path} has {len(tgt)}; line i of one "
                          f"must translate line i of the other")
    if lowercase:
        src = [[w.lower() for w in s] for s in src]
        tgt = [[w.lower() for w in s] for s in tgt]
    return src, tgt
