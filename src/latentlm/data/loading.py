"""Corpus loading for every data format, behind one dataset interface.

``data.format`` selects the reader:

- ``text``: one whitespace-tokenized sentence per line (``{split}.txt`` in a corpus folder);
  examples are token :class:`~latentlm.data.batching.Batch` es.
- ``documents``: JSON Lines documents (``text``, optional ``label``) read into their bag of
  words; examples are :class:`~latentlm.data.documents.BowBatch` es of word counts.
- ``tagged``: ``token<TAB>tag`` or CoNLL-U sentences; the words are a text dataset, the gold
  tags ride along (``dataset.tags``) for scoring only.
- ``parallel``: ``{split}.{source_lang}`` / ``{split}.{target_lang}`` sentence pairs (Multi30K);
  the dataset is the target sentences with the sources beside them, the vocabulary the
  target's with ``vocab.source`` the source's (both built from train, same ``min_count`` /
  ``max_vocab``).

Every dataset has the same surface (:class:`Dataset`): ``len``, ``num_tokens``, ``vocab``,
``batch_indices(batch_size, shuffle, seed, epoch)``, ``make_batch(indices)``,
``batches(batch_size, ...)`` and ``head(n)``, so the trainer, ``validate`` and ``evaluate``
never ask which format they hold.

Split files: ``data.files`` maps a split to a file (relative to the corpus folder found from
``data.name`` / ``data.data_dir``, or absolute); without it a text corpus uses its
``{split}.txt`` files. A split that is missing can be carved from train
(``data.valid_fraction``) or be another split's file (``files: {valid: train.tsv}``: POS
induction and clustering score the sentences they were fit on).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from latentlm.data.batching import TextDataset
from latentlm.data.conll import TaggedCorpus, read_conllu, read_tagged_tsv
from latentlm.data.corpus import SPLITS, find_corpus, read_lines, split_path
from latentlm.data.documents import BagOfWords, load_documents, rescale_lengths
from latentlm.data.parallel import ParallelDataset, read_parallel
from latentlm.data.vocab import SPECIALS, Vocab
from latentlm.errors import ConfigError, CorpusError

if TYPE_CHECKING:  # the config is a plain dataclass; data must not import upward at run time
    from latentlm.config import DataConfig

FORMATS = ("text", "documents", "tagged", "parallel")


@runtime_checkable
class Dataset(Protocol):
    """What the training loop and evaluation need of a split, whatever its format."""

    vocab: Vocab

    def __len__(self) -> int: ...

    @property
    def num_tokens(self) -> int: ...

    def batch_indices(self, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0) -> list[list[int]]: ...

    def make_batch(self, indices): ...

    def batches(self, batch_size: int, **kwargs): ...

    def head(self, n: int) -> "Dataset": ...


class TaggedDataset(TextDataset):
    """The words of tagged sentences as a :class:`TextDataset`; ``tags`` are the gold tags
    (one list per sentence), never seen by a model, used by ``latentlm tag``."""

    def __init__(self, sentences, vocab: Vocab, tags: list[list[str]]):
        super().__init__(sentences, vocab)
        if len(tags) != len(sentences):
            raise ValueError(f"{len(tags)} tag sequences for {len(sentences)} sentences")
        self.sentences = [list(s) for s in sentences]
        self.tags = tags

    def head(self, n: int) -> "TaggedDataset":
        return TaggedDataset(self.sentences[:n], self.vocab, self.tags[:n])


def _resolve(folder: Path | None, name: str) -> Path:
    path = Path(name).expanduser()
    if path.is_absolute() or folder is None:
        return path
    return folder / path


def _corpus_folder(d: "DataConfig") -> Path | None:
    """The folder split files are relative to: the text corpus folder, else ``data_dir``/name."""
    if d.format == "text" and not d.files:
        return find_corpus(d.name, d.data_dir)
    candidates = []
    for base in (d.data_dir, os.environ.get("LATENTLM_DATA")):
        if base:
            candidates += [Path(base).expanduser() / d.name, Path(base).expanduser()]
    candidates.append(Path(__file__).resolve().parents[3].parent / "shared" / "data" / d.name)
    files = list((d.files or {}).values())
    if d.format == "parallel" and not files:
        files = [f"train.{d.source_lang}", f"train.{d.target_lang}"]
    for c in candidates:
        if c.is_dir() and all(_resolve(c, f).is_file() for f in files):
            return c
    if files and all(Path(f).expanduser().is_absolute() for f in files):
        return None
    looked = "\n  ".join(str(c) for c in candidates)
    raise CorpusError(f"data files {files} of corpus {d.name!r} not found. Looked in:\n  {looked}\n"
                      f"pass --data-dir, set LATENTLM_DATA, or give absolute paths in data.files")


def _split_file(d: "DataConfig", folder: Path | None, split: str) -> Path | None:
    if d.format == "parallel" and not d.files:  # the source side's file; the target's is beside it
        return _resolve(folder, f"{split}.{d.source_lang}")
    if d.files:
        return _resolve(folder, d.files[split]) if split in d.files else None
    return split_path(folder, split, must_exist=False) if folder is not None else None


def _limit(d: "DataConfig", split: str) -> int | None:
    return {"train": d.train_limit, "valid": d.valid_limit, "test": d.test_limit}[split]


def _carve(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(train rows, valid rows), sorted: a ``fraction`` of ``n`` rows chosen by ``seed``."""
    order = np.random.default_rng(seed).permutation(n)
    k = max(1, round(fraction * n))
    return np.sort(order[k:]), np.sort(order[:k])


def _check(d: "DataConfig") -> None:
    if d.format not in FORMATS:
        raise ConfigError(f"data.format must be one of {list(FORMATS)}, got {d.format!r}")
    if d.files is not None:
        unknown = sorted(set(d.files) - set(SPLITS))
        if unknown or "train" not in d.files:
            raise ConfigError(f"data.files maps splits {list(SPLITS)} to files and needs 'train'; got {d.files}")
    if not 0.0 <= d.valid_fraction < 1.0:
        raise ConfigError(f"data.valid_fraction must be in [0, 1), got {d.valid_fraction}")


def _read(d: "DataConfig", path: Path, split: str, vocab: Vocab | None):
    """(raw examples, gold tags or None) of one split file in the config's format."""
    limit = _limit(d, split)
    if d.format == "documents":
        return path, None
    if d.format == "parallel":
        target = path.with_name(path.name.removesuffix(f".{d.source_lang}") + f".{d.target_lang}")
        if not target.is_file():
            raise CorpusError(f"{target}: file not found (the {d.target_lang} side of {path})")
        return read_parallel(path, target, d.max_tokens, limit, d.lowercase), None
    if d.format == "tagged":
        corpus: TaggedCorpus = read_conllu(path, d.tagset) if path.suffix == ".conllu" else read_tagged_tsv(path)
        words, tags = corpus.words, corpus.tags
        if d.lowercase:
            words = [[w.lower() for w in s] for s in words]
        if limit is not None:
            words, tags = words[:limit], tags[:limit]
        return words, tags
    lines = read_lines(path, d.max_tokens, limit).lines
    return ([[w.lower() for w in s] for s in lines] if d.lowercase else lines), None


def _documents(d: "DataConfig", path: Path, split: str, vocab: Vocab | None) -> BagOfWords:
    words = None if d.max_vocab is None else d.max_vocab - len(SPECIALS)
    bow = load_documents(path, vocab=vocab, max_size=words, min_df=d.min_df, limit=_limit(d, split))
    if d.skip_empty:
        bow = bow.subset(np.flatnonzero(bow.lengths > 0))
    return bow


def load_corpus(d: "DataConfig", vocab: Vocab | None = None, splits=("train", "valid", "test"),
                seed: int = 0) -> tuple[Vocab, dict[str, Dataset]]:
    """Read the splits ``d`` names; build the vocabulary from train unless ``vocab`` is given.

    Returns ``(vocab, {split: dataset})``. ``seed`` chooses the rows of a carved valid split.
    """
    _check(d)
    folder = _corpus_folder(d)
    carve = d.valid_fraction > 0 and bool({"train", "valid"} & set(splits))
    need = set(splits)
    if carve:  # both train and valid are rows of the train file
        need.add("train")
    if vocab is None:
        need.add("train")
    paths = {}
    for split in sorted(need, key=SPLITS.index):
        if carve and split == "valid":
            continue
        path = _split_file(d, folder, split)
        if path is None:
            raise CorpusError(f"split {split!r} has no file: add it to data.files"
                              + (" or set data.valid_fraction" if split == "valid" else ""))
        if not path.is_file():
            raise CorpusError(f"{path}: file not found (split {split!r})")
        paths[split] = path

    if d.format == "documents":
        train_bow = _documents(d, paths["train"], "train", vocab) if "train" in paths else None
        vocab = vocab or train_bow.vocab
        bows: dict[str, BagOfWords] = {}
        for split in paths:
            same_as_train = split != "train" and paths[split] == paths["train"] if "train" in paths else False
            bows[split] = train_bow if split == "train" or same_as_train else _documents(d, paths[split], split, vocab)
        if carve:
            rows_train, rows_valid = _carve(len(bows["train"]), d.valid_fraction, seed)
            bows["valid"], bows["train"] = bows["train"].subset(rows_valid), bows["train"].subset(rows_train)
        if d.rescale_power is not None:  # a model change (tempered likelihood), see rescale_lengths
            bows = {s: rescale_lengths(b, power=d.rescale_power) for s, b in bows.items()}
        return vocab, {s: bows[s] for s in splits}

    raw = {s: _read(d, p, s, vocab) for s, p in paths.items()}
    if d.format == "parallel":
        return _parallel(d, raw, vocab, splits, carve, seed)
    if vocab is None:
        vocab = Vocab.build(raw["train"][0], d.max_vocab, d.min_count)
    if carve:
        words, tags = raw["train"]
        rows_train, rows_valid = _carve(len(words), d.valid_fraction, seed)
        raw["valid"] = ([words[i] for i in rows_valid], None if tags is None else [tags[i] for i in rows_valid])
        raw["train"] = ([words[i] for i in rows_train], None if tags is None else [tags[i] for i in rows_train])
    out: dict[str, Dataset] = {}
    for split in splits:
        words, tags = raw[split]
        out[split] = TaggedDataset(words, vocab, tags) if tags is not None else TextDataset(words, vocab)
    return vocab, out


def _parallel(d: "DataConfig", raw, vocab: Vocab | None, splits, carve: bool, seed: int):
    if vocab is None:
        sources, targets = raw["train"][0]
        vocab = Vocab.build(targets, d.max_vocab, d.min_count)
        vocab.source = Vocab.build(sources, d.max_vocab, d.min_count)
    if carve:
        sources, targets = raw["train"][0]
        rows_train, rows_valid = _carve(len(sources), d.valid_fraction, seed)
        raw["valid"] = (([sources[i] for i in rows_valid], [targets[i] for i in rows_valid]), None)
        raw["train"] = (([sources[i] for i in rows_train], [targets[i] for i in rows_train]), None)
    return vocab, {split: ParallelDataset(*raw[split][0], vocab) for split in splits}
