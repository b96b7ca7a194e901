"""Vocabulary built from the training split, saved as JSON next to the model."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch

from latentlm.io import atomic_write_text
from latentlm.errors import CheckpointError

PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIALS = (PAD, BOS, EOS, UNK)
# Corpora spell the unknown word in several ways; all map to our <unk>.
UNK_ALIASES = frozenset({"<unk>", "<UNK>", "_UNK", "UNK"})


class Vocab:
    """Token <-> id map. Ids 0..3 are ``<pad> <s> </s> <unk>``.

    ``source``: for parallel text, the vocabulary of the source side (this one is the
    target's, the side a model predicts); saved with it in the same JSON file.
    """

    pad_id, bos_id, eos_id, unk_id = 0, 1, 2, 3

    def __init__(self, tokens: Sequence[str], source: "Vocab | None" = None):
        self.source = source
        if tuple(tokens[:4]) != SPECIALS:
            raise ValueError(f"a vocabulary must start with {SPECIALS}, got {tuple(tokens[:4])}")
        self.itos: list[str] = list(tokens)
        self.stoi: dict[str, int] = {t: i for i, t in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise ValueError("duplicate tokens in vocabulary")

    @classmethod
    def build(
        cls, sentences: Iterable[Sequence[str]], max_size: int | None = None, min_count: int = 1
    ) -> "Vocab":
        """Most frequent words first (ties broken alphabetically, so the result is deterministic)."""
        counts = Counter(tok for sent in sentences for tok in sent if tok not in UNK_ALIASES)
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        words = [w for w in words if w not in SPECIALS]
        if max_size is not None:
            words = words[: max(0, max_size - len(SPECIALS))]
        return cls(list(SPECIALS) + words)

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: Sequence[str]) -> list[int]:
        unk = self.unk_id
        return [self.stoi.get(t, unk) for t in tokens]

    def encode_sentence(self, tokens: Sequence[str]) -> torch.Tensor:
        """``<s> tokens </s>`` as a LongTensor."""
        return torch.tensor([self.bos_id, *self.encode(tokens), self.eos_id], dtype=torch.long)

    def decode(self, ids: Iterable[int], strip: bool = True) -> list[str]:
        out = []
        for i in ids:
            i = int(i)
            if strip and i == self.eos_id:
                break
            if strip and i in (self.pad_id, self.bos_id):
                continue
            out.append(self.itos[i])
        return out

    def save(self, path: str | Path) -> None:
        data = {"tokens": self.itos}
        if self.source is not None:
            data["source_tokens"] = self.source.itos
        atomic_write_text(Path(path), json.dumps(data, ensure_ascii=False))

    @classmethod
    def load(cls, path: str | Path) -> "Vocab":
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
            source = cls(data["source_tokens"]) if "source_tokens" in data else None
            return cls(data["tokens"], source=source)
        except (OSError, ValueError, KeyError, TypeError) as err:
            raise CheckpointError(f"{path}: not a latentlm vocabulary ({err})") from None
