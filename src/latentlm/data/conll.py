"""Readers for tagged corpora: ``token<TAB>tag`` files and Universal Dependencies CoNLL-U.

Both return :class:`TaggedCorpus` — parallel lists of word and tag sequences — for
unsupervised tag induction, where the words train the model and the tags only score it.
Every malformed line is a :class:`CorpusError` naming the file and the line number.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

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


def _read_text(path: str | os.PathLike) -> tuple[Path, list[str]]:
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as err:
        raise CorpusError(f"{path}: not UTF-8 ({err})") from None
    return path, text.splitlines()


def read_tagged_tsv(path: str | os.PathLike) -> TaggedCorpus:
    """``token<TAB>tag`` per line, a blank line after each sentence (the last blank is optional)."""
    path, lines = _read_text(path)
    words: list[list[str]] = []
    tags: list[list[str]] = []
    sw: list[str] = []
    st: list[str] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            if sw:
                words.append(sw)
                tags.append(st)
                sw, st = [], []
            continue
        parts = line.split("\t")
        if len(parts) != 2 or not parts[0] or not parts[1]:
            raise CorpusError(f"{path}:{lineno}: expected 'token<TAB>tag', got {line!r}")
        sw.append(parts[0])
        st.append(parts[1])
    if sw:
        words.append(sw)
        tags.append(st)
    if not words:
        raise CorpusError(f"{path}: no sentences")
    return TaggedCorpus(words, tags)


def read_conllu(path: str | os.PathLike, tagset: str = "upos", lowercase: bool = False) -> TaggedCorpus:
    """Word-level FORM and UPOS or XPOS of a CoNLL-U file.

    Multiword-token lines (``3-4``) and empty nodes (``8.1``) are skipped: the syntactic words
    carry the tags.
    """
    if tagset not in UD_COLUMNS:
        raise ValueError(f"tagset must be one of {sorted(UD_COLUMNS)}, got {tagset!r}")
    col = UD_COLUMNS[tagset]
    path, lines = _read_text(path)
    words: list[list[str]] = []
    tags: list[list[str]] = []
    sw: list[str] = []
    st: list[str] = []
    for lineno, line in enumerate(lines, 1):
        if not line.strip():
            if sw:
                words.append(sw)
                tags.append(st)
                sw, st = [], []
            continue
        if line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) != 10:
            raise CorpusError(f"{path}:{lineno}: expected 10 tab-separated CoNLL-U columns, got {len(parts)}")
        if "-" in parts[0] or "." in parts[0]:
            continue
        if not parts[0].isdigit():
            raise CorpusError(f"{path}:{lineno}: bad token id {parts[0]!r}")
        sw.append(parts[1].lower() if lowercase else parts[1])
        st.append(parts[col])
    if sw:
        words.append(sw)
        tags.append(st)
    if not words:
        raise CorpusError(f"{path}: no sentences")
    return TaggedCorpus(words, tags)
