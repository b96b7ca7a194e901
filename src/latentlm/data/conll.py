"""Readers for tagged corpora: ``token<TAB>tag`` files and Universal Dependencies CoNLL-U.

Both return :class:`TaggedCorpus` — parallel lists of word and tag sequences — for
unsupervised tag induction, where the words train the model and the tags only score it.
Every malformed line is a :class:`CorpusError` naming the file and the line number.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from latentlm.data.corpus import read_utf8
from latentlm.errors import CorpusError

UD_COLUMNS = {"upos": 3, "xpos": 4}


@dataclass
class TaggedCorpus:
    words: list[list[str]]  # one list of tokens per sentence
    tags: list[list[str]]   # the gold tag of each token

    def __len__(self) -> int:
        return len(self.words)

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.words)

    @property
    def tagset(self) -> list[str]:
        return sorted({t for s in self.tags for t in s})


def _tagged_sentences(path, parse) -> TaggedCorpus:
    """Group (word, tag) lines into sentences at blank lines; ``parse(line, lineno)`` returns
    a (word, tag) pair, or None for a line to skip."""
    path, text = read_utf8(path)
    words: list[list[str]] = []
    tags: list[list[str]] = []
    sw: list[str] = []
    st: list[str] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            if sw:
                words.append(sw)
                tags.append(st)
                sw, st = [], []
            continue
        pair = parse(line, lineno, path)
        if pair is not None:
            sw.append(pair[0])
            st.append(pair[1])
    if sw:
        words.append(sw)
        tags.append(st)
    if not words:
        raise CorpusError(f"{path}: no sentences")
    return TaggedCorpus(words, tags)


def read_tagged_tsv(path: str | os.PathLike) -> TaggedCorpus:
    """``token<TAB>tag`` per line, a blank line after each sentence (the last blank is optional)."""

    def parse(line, lineno, where):
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise CorpusError(f"{where}:{lineno}: expected 'token<TAB>tag', got {line!r}")
        return parts[0], parts[1]

    return _tagged_sentences(path, parse)


def read_conllu(path: str | os.PathLike, tagset: str = "upos", lowercase: bool = False) -> TaggedCorpus:
    """Word-level FORM and UPOS or XPOS of a CoNLL-U file.

    Multiword-token lines (``3-4``) and empty nodes (``8.1``) are skipped: the syntactic words
    carry the tags.
    """
    if tagset not in UD_COLUMNS:
        raise ValueError(f"tagset must be one of {sorted(UD_COLUMNS)}, got {tagset!r}")
    col = UD_COLUMNS[tagset]

    def parse(line, lineno, where):
        if line.startswith("#"):
            return None
        parts = line.split("\t")
        if len(parts) != 10:
            raise CorpusError(f"{where}:{lineno}: expected 10 tab-separated CoNLL-U columns, got {len(parts)}")
        if "-" in parts[0] or "." in parts[0]:
            return None
        if not parts[0].isdigit():
            raise CorpusError(f"{where}:{lineno}: bad token id {parts[0]!r}")
        return (parts[1].lower() if lowercase else parts[1]), parts[col]

    return _tagged_sentences(path, parse)
