"""Finding and reading corpora: a folder with train/valid/test text files.

Each line is one sentence (or document), whitespace-tokenized. Both PTB's
``ptb.{split}.txt`` and plain ``{split}.txt`` names are recognized, plain or compressed
(``.txt.xz``, ``.txt.gz``: read transparently). Every problem with the files is reported
as a :class:`CorpusError` naming the file and the line.

Mikolov's PTB language-modelling text ships inside the package (``bundled/ptb``, xz, 1.4 MB;
source and terms in ``bundled/ptb/SOURCE.md``), so a bare clone trains and tests without
any data folder beside it.
"""

from __future__ import annotations

import gzip
import lzma
import os
import re
from dataclasses import dataclass
from pathlib import Path

from latentlm.errors import CorpusError

SPLITS = ("train", "valid", "test")
DEFAULT_MAX_TOKENS = 400


BUNDLED = Path(__file__).resolve().parent / "bundled"
_SUFFIXES = ("", ".xz", ".gz")  # plain, xz- or gzip-compressed text


def _repo_root() -> Path:
    # src/latentlm/data/corpus.py -> repo root is three levels above the package.
    return Path(__file__).resolve().parents[3]


def corpus_candidates(name: str, data_dir: str | os.PathLike | None = None) -> list[Path]:
    """The folders :func:`find_corpus` tries for ``name``, in order."""
    candidates: list[Path] = []
    for base in (data_dir, os.environ.get("LATENTLM_DATA")):
        if base:
            base = Path(base).expanduser()
            candidates += [base / name, base]
    candidates.append(_repo_root().parent / "shared" / "data" / name)
    candidates.append(BUNDLED / name)
    return candidates


def find_corpus(name: str, data_dir: str | os.PathLike | None = None) -> Path:
    """Locate corpus ``name``: ``data_dir`` first, then ``$LATENTLM_DATA``, then
    ``../shared/data/<name>`` beside the repository, then the copy bundled with the
    package (PTB only).

    ``data_dir`` may be the corpus folder itself or a folder that contains ``<name>/``.
    """
    candidates = corpus_candidates(name, data_dir)
    for path in candidates:
        if path.is_dir() and any(split_path(path, s, must_exist=False) for s in SPLITS):
            return path
    looked = "\n  ".join(str(c) for c in candidates)
    raise CorpusError(
        f"corpus {name!r} not found. Looked in:\n  {looked}\n"
        f"Put train/valid/test files (e.g. {name}.train.txt or train.txt, one sentence per line) "
        f"in one of these folders, or pass --data-dir / set LATENTLM_DATA."
    )


def split_path(folder: Path, split: str, must_exist: bool = True) -> Path | None:
    """The file of ``split`` in ``folder``: ``<folder>.<split>.txt`` or ``<split>.txt``
    (either may end in ``.xz`` / ``.gz``), else any ``*.<split>.txt``."""
    folder = Path(folder)
    for suffix in _SUFFIXES:
        for candidate in (folder / f"{folder.name}.{split}.txt{suffix}", folder / f"{split}.txt{suffix}"):
            if candidate.is_file():
                return candidate
    for suffix in _SUFFIXES:
        matches = sorted(folder.glob(f"*.{split}.txt{suffix}"))
        if matches:
            return matches[0]
    if must_exist:
        raise CorpusError(
            f"split {split!r} missing in {folder}: expected {folder.name}.{split}.txt or {split}.txt"
        )
    return None


@dataclass(frozen=True)
class TextFile:
    path: Path
    lines: list[list[str]]

    @property
    def num_tokens(self) -> int:
        return sum(len(s) for s in self.lines)


#: C0 controls but tab, newline and carriage return; DEL; C1 controls
_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f]")


def read_utf8(path: str | os.PathLike) -> tuple[Path, str]:
    """The text of a file; a missing file or bytes that are not UTF-8 raise a
    :class:`CorpusError` naming the file and the line of the first bad byte."""
    path = Path(path)
    if not path.is_file():
        raise CorpusError(f"{path}: file not found")
    raw = path.read_bytes()
    opener = {".xz": lzma.decompress, ".gz": gzip.decompress}.get(path.suffix)
    if opener is not None:
        try:
            raw = opener(raw)
        except (lzma.LZMAError, OSError, EOFError) as err:
            raise CorpusError(f"{path}: not a readable {path.suffix[1:]} file ({err})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line_no = raw[: err.start].count(b"\n") + 1
        raise CorpusError(
            f"{path}:{line_no}: bytes that are not UTF-8 ({raw[err.start:err.start + 4]!r} at byte "
            f"{err.start}); re-encode the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        ) from None
    text = text.removeprefix("\ufeff")  # a byte-order mark is not part of the first word
    bad = _CONTROL.search(text)
    if bad is not None:
        line_no = text.count("\n", 0, bad.start()) + 1
        raise CorpusError(f"{path}:{line_no}: control character {bad.group()!r} in the text (only tab, newline and "
                          f"carriage return are allowed); a binary or damaged file?")
    return path, text


def read_lines(
    path: str | os.PathLike,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    limit: int | None = None,
) -> TextFile:
    """Read a whitespace-tokenized file, one example per line.

    Raises :class:`CorpusError` for a missing or empty file, bytes that are not UTF-8,
    an empty line, or a line with more than ``max_tokens`` tokens, naming file and line.
    """
    path, text = read_utf8(path)
    lines: list[list[str]] = []
    for line_no, line in enumerate(text.splitlines(), start=1):
        tokens = line.split()
        if not tokens:
            raise CorpusError(f"{path}:{line_no}: empty line; every line must hold one example")
        if len(tokens) > max_tokens:
            raise CorpusError(
                f"{path}:{line_no}: line has {len(tokens)} tokens, over the cap of {max_tokens} "
                f"(raise data.max_tokens to allow it)"
            )
        lines.append(tokens)
        if limit is not None and len(lines) >= limit:
            break
    if not lines:
        raise CorpusError(f"{path}: file is empty; expected one example per line")
    return TextFile(path, lines)
