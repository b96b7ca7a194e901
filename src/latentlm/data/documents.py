"""Labelled document collections and their bag-of-words view.

Document clustering (M1, E5) reads JSON Lines files — one document per line with fields
``id``, ``label``, ``label_id``, ``text`` (and ``subject`` or ``title``) — tokenizes them,
removes English stop words, keeps a capped vocabulary of words seen in enough documents,
and turns each document into a row of word counts. The count matrix is kept as a SciPy
CSR matrix (cheap to build, slice and hand to scikit-learn) and converted to a torch CSR
tensor per batch, so that a model computes ``counts @ log_probs.T`` as one sparse-dense
matmul instead of a loop over tokens.

The same view works for sentences (e.g. PTB) through :func:`sentences_to_bow`, using an
LM :class:`~latentlm.data.vocab.Vocab`; there out-of-vocabulary words count as ``<unk>``
and ``</s>`` can be counted so that perplexities are comparable with sequence models.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch

from latentlm.data.vocab import SPECIALS, Vocab
from latentlm.data.corpus import read_utf8
from latentlm.errors import CorpusError

# Words of at least two word characters with at least one letter, so "x11" and "486dx" are
# kept but bare numbers ("1993", "10") are not: in newsgroup posts numbers are mostly noise
# (dates, prices, line counts) and would crowd a 10k vocabulary.
DEFAULT_TOKEN_PATTERN = r"(?u)\b(?=\w*[^\W\d_])\w\w+\b"


def english_stop_words() -> frozenset[str]:
    """scikit-learn's English stop-word list (318 words)."""
    from sklearn.feature_extraction.text import ENGLISH_STOP_WORDS

    return frozenset(ENGLISH_STOP_WORDS)


# --------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Document:
    id: str
    text: str
    label: str | None = None
    label_id: int | None = None
    title: str | None = None  # ``subject`` (20 Newsgroups) or ``title`` (BBC)


def read_documents(path: str | os.PathLike, limit: int | None = None) -> list[Document]:
    """Read a JSON Lines document file.

    Blank lines are skipped. Raises :class:`CorpusError` naming the file (and line) for a
    missing or empty file, bytes that are not UTF-8, a line that is not a JSON object, a
    missing or non-string ``text``, or a ``label_id`` that is not an integer.
    """
    path = Path(path)
    if path.is_dir():
        found = sorted(p.name for p in path.glob("*.jsonl"))
        hint = f"; it holds {', '.join(found)}" if found else ""
        raise CorpusError(f"{path}: is a folder, expected a .jsonl file{hint}")
    path, text = read_utf8(path)
    docs: list[Document] = []
    # split on "\n" only: texts may hold "\r" and other separators inside JSON strings,
    # but raw control characters would already be invalid JSON.
    for line_no, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise CorpusError(f"{path}:{line_no}: not valid JSON ({err.msg} at column {err.colno})") from None
        if not isinstance(record, dict):
            raise CorpusError(f"{path}:{line_no}: expected a JSON object, got {type(record).__name__}")
        doc_text = record.get("text")
        if not isinstance(doc_text, str):
            what = "missing" if doc_text is None else f"a {type(doc_text).__name__}, not a string"
            raise CorpusError(f"{path}:{line_no}: field 'text' is {what}")
        label_id = record.get("label_id")
        if label_id is not None and (isinstance(label_id, bool) or not isinstance(label_id, int)):
            raise CorpusError(f"{path}:{line_no}: field 'label_id' must be an integer, got {label_id!r}")
        label = record.get("label")
        title = record.get("subject", record.get("title"))
        docs.append(Document(
            id=str(record.get("id", f"{path.name}:{line_no}")),
            text=doc_text,
            label=None if label is None else str(label),
            label_id=label_id,
            title=None if title is None else str(title),
        ))
        if limit is not None and len(docs) >= limit:
            break
    if not docs:
        raise CorpusError(f"{path}: file is empty; expected one JSON document per line")
    return docs


def label_ids(docs: Sequence[Document]) -> tuple[np.ndarray, list[str]] | None:
    """Gold label ids (N,) and names, or ``None`` when no document has a label.

    ``label_id`` is used when every labelled document has one; otherwise ids are the
    sorted label names' positions. Unlabelled documents get -1.
    """
    if all(d.label is None and d.label_id is None for d in docs):
        return None
    if all(d.label_id is not None for d in docs):
        ids = np.array([d.label_id for d in docs], dtype=np.int64)
        names: dict[int, str] = {}
        for d in docs:
            names.setdefault(d.label_id, d.label if d.label is not None else str(d.label_id))
        return ids, [names.get(i, str(i)) for i in range(int(ids.max()) + 1)]
    names_sorted = sorted({d.label for d in docs if d.label is not None})
    index = {n: i for i, n in enumerate(names_sorted)}
    ids = np.array([index.get(d.label, -1) if d.label is not None else -1 for d in docs], dtype=np.int64)
    return ids, names_sorted


# --------------------------------------------------------------------------------------
# Tokens and vocabulary
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tokenizer:
    """Lower-cased regex tokenizer with stop-word removal (scikit-learn's conventions)."""

    pattern: str = DEFAULT_TOKEN_PATTERN
    lowercase: bool = True
    stop_words: frozenset[str] = field(default_factory=english_stop_words)

    def __call__(self, text: str) -> list[str]:
        if self.lowercase:
            text = text.lower()
        stop = self.stop_words
        return [t for t in re.findall(self.pattern, text) if t not in stop]


def build_bow_vocab(
    token_lists: Iterable[Sequence[str]],
    max_size: int | None = 10_000,
    min_df: int = 3,
    max_df: float = 1.0,
) -> Vocab:
    """A vocabulary of at most ``max_size`` words (plus the 4 specials).

    Words must occur in at least ``min_df`` documents and in at most a ``max_df`` fraction
    of them; the most frequent (by total count, ties alphabetical) are kept, as
    scikit-learn's ``CountVectorizer(max_features, min_df, max_df)`` does.
    """
    if min_df < 1:
        raise ValueError(f"min_df must be >= 1, got {min_df}")
    if not 0.0 < max_df <= 1.0:
        raise ValueError(f"max_df must be in (0, 1], got {max_df}")
    tf: Counter[str] = Counter()
    df: Counter[str] = Counter()
    num_docs = 0
    for tokens in token_lists:
        num_docs += 1
        tf.update(tokens)
        df.update(set(tokens))
    max_count = math.floor(max_df * num_docs)
    words = [w for w, d in df.items() if min_df <= d <= max_count and w not in SPECIALS]
    words.sort(key=lambda w: (-tf[w], w))
    if max_size is not None:
        words = words[:max_size]
    return Vocab(list(SPECIALS) + words)


def count_matrix(
    token_lists: Sequence[Sequence[str]],
    vocab: Vocab,
    unknown: str = "drop",
    include_eos: bool = False,
    dtype: type = np.float32,
) -> sp.csr_matrix:
    """(N, len(vocab)) CSR matrix of word counts.

    ``unknown="drop"`` leaves out-of-vocabulary words out (documents: the vocabulary *is*
    the model's support); ``unknown="unk"`` counts them as ``<unk>`` (sentences, where every
    token must be scored). ``include_eos`` adds one ``</s>`` per row.
    """
    if unknown not in ("drop", "unk"):
        raise ValueError(f"unknown must be 'drop' or 'unk', got {unknown!r}")
    stoi, unk = vocab.stoi, (vocab.unk_id if unknown == "unk" else -1)
    indptr = np.zeros(len(token_lists) + 1, dtype=np.int64)
    cols: list[int] = []
    for row, tokens in enumerate(token_lists):
        ids = [stoi.get(t, unk) for t in tokens]
        cols.extend(i for i in ids if i >= 0)
        if include_eos:
            cols.append(vocab.eos_id)
        indptr[row + 1] = len(cols)
    data = np.ones(len(cols), dtype=dtype)
    # duplicates within a row are summed by sum_duplicates(): one entry per (doc, word)
    mat = sp.csr_matrix((data, np.asarray(cols, dtype=np.int64), indptr), shape=(len(token_lists), len(vocab)))
    mat.sum_duplicates()
    mat.sort_indices()
    return mat


# --------------------------------------------------------------------------------------
# Batches
# --------------------------------------------------------------------------------------


def to_torch_csr(mat: sp.csr_matrix, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """SciPy CSR -> torch sparse CSR tensor (shares no memory with ``mat``)."""
    mat = mat.tocsr()
    with warnings.catch_warnings():
        # torch warns once per process that sparse CSR is "beta"; the ops we use are stable.
        warnings.filterwarnings("ignore", message=".*[Ss]parse CSR tensor support is in beta.*")
        return torch.sparse_csr_tensor(
            torch.from_numpy(mat.indptr.astype(np.int64)),
            torch.from_numpy(mat.indices.astype(np.int64)),
            torch.from_numpy(np.asarray(mat.data)).to(dtype),
            size=mat.shape,
            check_invariants=False,
        )


@dataclass
class BowBatch:
    """A batch of documents as word counts.

    ``counts`` is (B, V) float, a torch sparse CSR tensor or a dense tensor; models must
    accept both. ``lengths`` counts the tokens each row scores (the row sums), so that
    per-token perplexity uses the same token count as the likelihood.
    """

    counts: torch.Tensor           # (B, V) float, sparse CSR or dense
    lengths: torch.Tensor          # (B,) long: tokens per document
    index: torch.Tensor            # (B,) long: position of each document in its dataset
    labels: torch.Tensor | None = None  # (B,) long gold labels, -1 unknown

    @property
    def size(self) -> int:
        return self.counts.size(0)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    @property
    def is_sparse(self) -> bool:
        return self.counts.layout != torch.strided

    def dense_counts(self) -> torch.Tensor:  # (B, V)
        return self.counts.to_dense() if self.is_sparse else self.counts

    def to(self, device: torch.device | str) -> "BowBatch":
        return BowBatch(
            self.counts.to(device), self.lengths.to(device), self.index.to(device),
            None if self.labels is None else self.labels.to(device),
        )


class BagOfWords:
    """A corpus as an (N, V) count matrix plus its vocabulary, ids and gold labels."""

    def __init__(
        self,
        counts: sp.csr_matrix,
        vocab: Vocab,
        ids: Sequence[str] | None = None,
        labels: np.ndarray | None = None,
        label_names: Sequence[str] | None = None,
    ):
        counts = sp.csr_matrix(counts)
        if counts.shape[1] != len(vocab):
            raise ValueError(f"count matrix has {counts.shape[1]} columns but the vocabulary {len(vocab)} words")
        if labels is not None and len(labels) != counts.shape[0]:
            raise ValueError(f"{len(labels)} labels for {counts.shape[0]} documents")
        self.counts = counts                  # (N, V) CSR
        self.vocab = vocab
        self.ids = list(ids) if ids is not None else [str(i) for i in range(counts.shape[0])]
        self.labels = None if labels is None else np.asarray(labels, dtype=np.int64)  # (N,)
        self.label_names = None if label_names is None else list(label_names)

    def __len__(self) -> int:
        return self.counts.shape[0]

    @property
    def vocab_size(self) -> int:
        return self.counts.shape[1]

    @property
    def lengths(self) -> np.ndarray:  # (N,) tokens per document
        return np.asarray(self.counts.sum(axis=1)).ravel().round().astype(np.int64)

    @property
    def num_tokens(self) -> int:
        return int(self.lengths.sum())

    def subset(self, indices: Sequence[int] | np.ndarray) -> "BagOfWords":
        idx = np.asarray(indices, dtype=np.int64)
        return BagOfWords(
            self.counts[idx], self.vocab, [self.ids[i] for i in idx],
            None if self.labels is None else self.labels[idx], self.label_names,
        )

    def batch(
        self,
        indices: Sequence[int] | np.ndarray | None = None,
        sparse: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> BowBatch:
        """Rows ``indices`` (default: all) as a :class:`BowBatch`."""
        idx = np.arange(len(self)) if indices is None else np.asarray(indices, dtype=np.int64)
        rows = self.counts[idx]
        counts = to_torch_csr(rows, dtype) if sparse else torch.from_numpy(rows.toarray()).to(dtype)
        lengths = torch.from_numpy(np.asarray(rows.sum(axis=1)).ravel().round().astype(np.int64))
        labels = None if self.labels is None else torch.from_numpy(self.labels[idx])
        return BowBatch(counts, lengths, torch.from_numpy(idx), labels)

    def batch_indices(self, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0) -> list[list[int]]:
        """The epoch's batches as index lists, a pure function of (seed, epoch) (documents in
        file order when not shuffled): the dataset interface shared with ``TextDataset``."""
        order = np.arange(len(self))
        if shuffle:
            np.random.default_rng([seed, epoch]).shuffle(order)
        return [order[start : start + batch_size].tolist() for start in range(0, len(order), batch_size)]

    def make_batch(self, indices: Sequence[int]) -> BowBatch:
        return self.batch(indices)

    def head(self, n: int) -> "BagOfWords":
        return self.subset(np.arange(min(n, len(self))))

    def batches(
        self, batch_size: int, shuffle: bool = False, seed: int = 0, epoch: int = 0, sparse: bool = True,
        dtype: torch.dtype = torch.float32,
    ) -> Iterator[BowBatch]:
        """Batches of ``batch_size`` documents; the order is a pure function of (seed, epoch)."""
        for idx in self.batch_indices(batch_size, shuffle, seed, epoch):
            yield self.batch(idx, sparse=sparse, dtype=dtype)

    def num_batches(self, batch_size: int) -> int:
        return math.ceil(len(self) / batch_size)


def documents_to_bow(
    docs: Sequence[Document],
    vocab: Vocab | None = None,
    tokenizer: Tokenizer | None = None,
    max_size: int | None = 10_000,
    min_df: int = 3,
    max_df: float = 1.0,
) -> BagOfWords:
    """Tokenize ``docs`` and count words; build the vocabulary from them unless given.

    Pass the training split's ``vocab`` when reading another split so columns agree.
    """
    tokenizer = tokenizer or Tokenizer()
    token_lists = [tokenizer(d.text) for d in docs]
    if vocab is None:
        vocab = build_bow_vocab(token_lists, max_size=max_size, min_df=min_df, max_df=max_df)
        if len(vocab) == len(SPECIALS):
            raise CorpusError(
                f"no word occurs in at least {min_df} of the {len(docs)} documents after stop-word "
                f"removal; lower min_df"
            )
    counts = count_matrix(token_lists, vocab, unknown="drop")
    labelled = label_ids(docs)
    labels, names = labelled if labelled is not None else (None, None)
    return BagOfWords(counts, vocab, [d.id for d in docs], labels, names)


def load_documents(
    path: str | os.PathLike,
    vocab: Vocab | None = None,
    max_size: int | None = 10_000,
    min_df: int = 3,
    max_df: float = 1.0,
    tokenizer: Tokenizer | None = None,
    limit: int | None = None,
) -> BagOfWords:
    """Read a ``.jsonl`` document file straight into its bag-of-words view."""
    return documents_to_bow(read_documents(path, limit=limit), vocab, tokenizer, max_size, min_df, max_df)


def sentences_to_bow(
    sentences: Sequence[Sequence[str]], vocab: Vocab, include_eos: bool = True
) -> BagOfWords:
    """Tokenized sentences (e.g. PTB lines) as counts over an LM vocabulary.

    Unknown words count as ``<unk>`` and, with ``include_eos``, each sentence scores one
    ``</s>``, so a unigram mixture's perplexity uses the LM's token count.
    """
    return BagOfWords(count_matrix(sentences, vocab, unknown="unk", include_eos=include_eos), vocab)


def rescale_lengths(bow: BagOfWords, target: float | None = None, power: float | None = None) -> BagOfWords:
    """Scale every non-empty row to sum to ``target``, or to ``length ** power`` (fractional counts).

    This is a *model change*, not preprocessing: it tempers each document's likelihood by
    ``new_length / length``, so long documents no longer get near-0/1 posteriors and no
    longer dominate the clusters. Likelihoods of the rescaled data are not likelihoods of
    the original documents. ``power=1`` returns ``bow`` unchanged.
    """
    if (target is None) == (power is None):
        raise ValueError("give exactly one of target (a fixed length) or power (length ** power)")
    if target is not None and target <= 0:
        raise ValueError(f"target length must be positive, got {target}")
    if power is not None and not 0 <= power <= 1:
        raise ValueError(f"power must be in [0, 1], got {power}")
    if power == 1:
        return bow
    lengths = np.asarray(bow.counts.sum(axis=1), dtype=np.float64).ravel()  # (N,)
    new = np.full_like(lengths, target) if target is not None else lengths ** power
    scale = np.divide(new, lengths, out=np.zeros_like(lengths), where=lengths > 0)
    counts = sp.csr_matrix(sp.diags(scale) @ bow.counts, dtype=bow.counts.dtype)
    return BagOfWords(counts, bow.vocab, bow.ids, bow.labels, bow.label_names)
