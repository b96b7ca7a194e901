"""Padded, length-bucketed batches of token ids.

A :class:`Batch` holds ``<s> w_1 .. w_n </s>`` rows padded with ``<pad>``; the model
reads ``inputs`` (all but the last position) and predicts ``targets`` (all but the
first). ``lengths`` counts predicted tokens: the words plus ``</s>``.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from latentlm.data.vocab import Vocab


@dataclass
class Batch:
    tokens: torch.Tensor   # (B, T+1) long: <s> w_1..w_n </s> <pad>...
    lengths: torch.Tensor  # (B,) long: number of target tokens (n + 1)
    index: torch.Tensor    # (B,) long: position of each example in its dataset

    @property
    def inputs(self) -> torch.Tensor:  # (B, T)
        return self.tokens[:, :-1]

    @property
    def targets(self) -> torch.Tensor:  # (B, T)
        return self.tokens[:, 1:]

    @property
    def mask(self) -> torch.Tensor:  # (B, T) bool, True on real target tokens
        return torch.arange(self.tokens.size(1) - 1, device=self.tokens.device)[None, :] < self.lengths[:, None]

    @property
    def size(self) -> int:
        return self.tokens.size(0)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.tokens.to(device), self.lengths.to(device), self.index.to(device))


def collate(sequences: Sequence[torch.Tensor], index: Sequence[int], pad_id: int = Vocab.pad_id) -> Batch:
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    tokens = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)
    for row, seq in enumerate(sequences):
        tokens[row, : len(seq)] = seq
    return Batch(tokens, lengths - 1, torch.as_tensor(list(index), dtype=torch.long))


class TextDataset:
    """Encoded sentences of one split; ``batches(...)`` yields length-bucketed batches."""

    def __init__(self, sentences: Sequence[Sequence[str]], vocab: Vocab):
        self.vocab = vocab
        self.examples = [vocab.encode_sentence(s) for s in sentences]
        self.lengths = [len(e) - 1 for e in self.examples]

    def __len__(self) -> int:
        return len(self.examples)

    def head(self, n: int) -> "TextDataset":
        """The first ``n`` examples as a dataset (encoded examples shared, not copied)."""
        out = TextDataset.__new__(TextDataset)
        out.vocab, out.examples, out.lengths = self.vocab, self.examples[:n], self.lengths[:n]
        return out

    @property
    def num_tokens(self) -> int:
        return sum(self.lengths)

    def batch_indices(
        self, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0, bucket: int = 50
    ) -> list[list[int]]:
        """The epoch's batches as index lists, a pure function of (seed, epoch).

        Shuffled batches come from sorting chunks of ``bucket * batch_size`` random
        examples by length, so each batch has similar lengths (little padding) while the
        epoch order stays random. Unshuffled batches are sorted by length.
        """
        order = list(range(len(self)))
        if shuffle:
            rng = random.Random(seed * 1_000_003 + epoch)
            rng.shuffle(order)
            chunk = batch_size * bucket
            order = [
                i
                for start in range(0, len(order), chunk)
                for i in sorted(order[start : start + chunk], key=self.lengths.__getitem__)
            ]
        else:
            order.sort(key=self.lengths.__getitem__)
        batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        if shuffle:
            rng.shuffle(batches)
        return batches

    def make_batch(self, indices: Sequence[int]) -> Batch:
        return collate([self.examples[i] for i in indices], indices, self.vocab.pad_id)

    def batches(self, batch_size: int, **kwargs) -> Iterator[Batch]:
        for idx in self.batch_indices(batch_size, **kwargs):
            yield self.make_batch(idx)

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(len(self) / batch_size)
