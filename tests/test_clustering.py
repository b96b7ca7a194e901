"""Clustering scores, cluster reports, and the document reader / bag-of-words view they use."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from latentlm.data.documents import (
    BagOfWords, Tokenizer, build_bow_vocab, count_matrix, load_documents, read_documents, rescale_lengths,
    sentences_to_bow,
)
from latentlm.data.vocab import SPECIALS, Vocab
from latentlm.errors import CorpusError
from latentlm.evaluation.clustering import (
    cluster_documents, cluster_usage, kmeans_tfidf, nmi, purity, score_assignments, top_words,
)
from latentlm.inference.em import EMLearner
from latentlm.inference.exact import ExactMarginal
from latentlm.models.nb_mixture import NaiveBayesMixture
from latentlm.system import System

# ---- scores --------------------------------------------------------------------------


def test_nmi_is_one_for_a_relabelling_and_zero_for_one_cluster():
    gold = [0, 0, 1, 1, 2, 2]
    assert nmi(gold, [5, 5, 3, 3, 9, 9]) == pytest.approx(1.0)
    assert nmi(gold, [0, 0, 0, 0, 0, 0]) == pytest.approx(0.0)
    assert nmi(np.array(gold), torch.tensor([1, 1, 0, 0, 2, 2])) == pytest.approx(1.0)


def test_purity_by_hand():
    gold = [0, 0, 0, 1, 1, 2]
    pred = [0, 0, 1, 1, 1, 1]  # cluster 0: {0,0} -> 2; cluster 1: {0,1,1,2} -> 2
    assert purity(gold, pred) == pytest.approx(4 / 6)
    assert purity(gold, list(range(6))) == 1.0


def test_scores_reject_mismatched_inputs():
    with pytest.raises(ValueError, match="3 labels but 2"):
        nmi([0, 1, 2], [0, 1])
    with pytest.raises(ValueError, match=r"\(N,\)"):
        purity(np.zeros((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="lie in"):
        cluster_usage([0, 3], 3)


def test_cluster_usage_counts_used_clusters():
    usage = cluster_usage([0, 0, 2, 2], 4)
    assert usage["sizes"] == [2, 0, 2, 0] and usage["used"] == 2
    assert usage["entropy"] == pytest.approx(np.log(2))


def test_unlabelled_documents_are_left_out_of_the_scores():
    out = score_assignments([0, 0, -1, 1], [1, 1, 0, 0], 2)
    assert out["scored_documents"] == 3 and out["nmi"] == pytest.approx(1.0) and out["purity"] == 1.0


def test_top_words_skip_specials_and_rank_against_background():
    vocab = Vocab(list(SPECIALS) + ["the", "goal", "vote"])
    probs = torch.tensor([[0.0, 0.0, 0.3, 0.0, 0.4, 0.3, 0.0],   # specials get mass but never show
                          [0.0, 0.0, 0.0, 0.0, 0.6, 0.0, 0.4]])
    assert top_words(probs.log(), vocab, n=2) == [["the", "goal"], ["the", "vote"]]
    background = torch.tensor([0, 0, 0, 0, 0.8, 0.1, 0.1])
    ranked = top_words(probs.log(), vocab, n=1, background=background)
    assert ranked == [["goal"], ["vote"]]


def test_kmeans_tfidf_separates_disjoint_vocabularies():
    rng = np.random.default_rng(0)
    rows = [np.bincount(rng.integers(5 * (i % 2), 5 * (i % 2) + 5, 20), minlength=10) for i in range(40)]
    labels = np.arange(40) % 2
    pred = kmeans_tfidf(sp.csr_matrix(np.stack(rows)), 2, seed=0, n_init=2)
    assert nmi(labels, pred) == pytest.approx(1.0)


# ---- documents -----------------------------------------------------------------------


def _write_jsonl(path, records, extra_lines=()):
    lines = [json.dumps(r) for r in records] + list(extra_lines)
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


_DOCS = [
    {"id": "a/1", "label": "sport", "label_id": 1, "subject": "s", "text": "The goal was a great goal; the match ended."},
    {"id": "a/2", "label": "sport", "label_id": 1, "text": "Another goal in the match, goal after goal."},
    {"id": "b/1", "label": "politics", "label_id": 0, "title": "t", "text": "The vote in parliament: a vote on tax."},
    {"id": "b/2", "label": "politics", "label_id": 0, "text": "Parliament vote, tax vote, match? no."},
    {"id": "b/3", "label": "politics", "label_id": 0, "text": ""},
]


def test_read_documents_reads_fields_and_skips_blank_lines(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", _DOCS[:2], extra_lines=["", json.dumps(_DOCS[2])])
    docs = read_documents(path)
    assert [d.id for d in docs] == ["a/1", "a/2", "b/1"]
    assert docs[0].title == "s" and docs[2].title == "t" and docs[2].label_id == 0


@pytest.mark.parametrize(
    "content, message",
    [
        ("", r"d\.jsonl: file is empty"),
        ("\n\n", r"d\.jsonl: file is empty"),
        ('{"id": "x", "text": "ok"}\n{"id": "y", "text": "broken\n', r"d\.jsonl:2: not valid JSON"),
        ('["a list"]\n', r"d\.jsonl:1: expected a JSON object"),
        ('{"id": "x"}\n', r"d\.jsonl:1: field 'text' is missing"),
        ('{"id": "x", "text": 3}\n', r"d\.jsonl:1: field 'text' is a int"),
        ('{"text": "a", "label_id": "one"}\n', r"d\.jsonl:1: field 'label_id' must be an integer"),
    ],
)
def test_malformed_jsonl_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content, encoding="utf-8")
    with pytest.raises(CorpusError, match=message):
        read_documents(path)


def test_missing_file_folder_and_non_utf8_are_corpus_errors(tmp_path):
    with pytest.raises(CorpusError, match="not found"):
        read_documents(tmp_path / "nope.jsonl")
    (tmp_path / "x.jsonl").write_text("{}", encoding="utf-8")
    with pytest.raises(CorpusError, match="is a folder.*x.jsonl"):
        read_documents(tmp_path)
    (tmp_path / "bad.jsonl").write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(CorpusError, match=r"bad\.jsonl:2: bytes that are not UTF-8"):
        read_documents(tmp_path / "bad.jsonl")


def test_tokenizer_lowercases_drops_stop_words_and_numbers():
    tok = Tokenizer()
    assert tok("The X11 server, 1993: it's FAST and a 486dx.") == ["x11", "server", "fast", "486dx"]


def test_bow_vocab_obeys_min_df_and_max_size():
    token_lists = [["goal", "goal", "vote"], ["goal", "tax"], ["vote", "goal"], ["rare"]]
    vocab = build_bow_vocab(token_lists, max_size=None, min_df=2)
    assert vocab.itos[len(SPECIALS):] == ["goal", "vote"]
    assert build_bow_vocab(token_lists, max_size=1, min_df=1).itos[len(SPECIALS):] == ["goal"]
    assert "goal" not in build_bow_vocab(token_lists, min_df=1, max_df=0.5).stoi
    with pytest.raises(ValueError, match="min_df"):
        build_bow_vocab(token_lists, min_df=0)


def test_load_documents_builds_counts_labels_and_reuses_a_vocabulary(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", _DOCS)
    bow = load_documents(path, min_df=2)
    words = bow.vocab.itos[len(SPECIALS):]
    assert set(words) == {"goal", "match", "vote", "parliament", "tax"}
    goal = bow.vocab.stoi["goal"]
    assert bow.counts[0, goal] == 2 and bow.counts[1, goal] == 3
    assert bow.lengths.tolist() == [3, 4, 4, 5, 0]
    assert bow.labels.tolist() == [1, 1, 0, 0, 0] and bow.label_names == ["politics", "sport"]
    # another split over the same columns
    other = load_documents(path, vocab=bow.vocab)
    assert other.vocab_size == bow.vocab_size
    with pytest.raises(CorpusError, match="lower min_df"):
        load_documents(path, min_df=10)


def test_batches_are_torch_csr_or_dense_and_cover_every_document(tmp_path):
    bow = load_documents(_write_jsonl(tmp_path / "d.jsonl", _DOCS), min_df=2)
    batch = bow.batch([2, 0])
    assert batch.is_sparse and batch.counts.shape == (2, bow.vocab_size)
    assert batch.lengths.tolist() == [4, 3] and batch.labels.tolist() == [0, 1]
    dense = bow.batch([2, 0], sparse=False)
    torch.testing.assert_close(batch.dense_counts(), dense.counts)
    seen = torch.cat([b.index for b in bow.batches(2, shuffle=True, seed=3)])
    assert sorted(seen.tolist()) == list(range(5))


def test_sentences_to_bow_counts_unk_and_eos():
    vocab = Vocab(list(SPECIALS) + ["a", "b"])
    bow = sentences_to_bow([["a", "b", "zzz"], []], vocab)
    dense = bow.counts.toarray()
    assert dense[0, vocab.unk_id] == 1 and dense[0, vocab.eos_id] == 1 and dense[1, vocab.eos_id] == 1
    assert bow.lengths.tolist() == [4, 1]
    assert count_matrix([["a", "zzz"]], vocab).toarray()[0, vocab.unk_id] == 0  # dropped by default


def test_rescale_lengths_sets_row_sums_and_keeps_empty_rows():
    vocab = Vocab(list(SPECIALS) + ["a", "b"])
    bow = BagOfWords(sp.csr_matrix(np.array([[0, 0, 0, 0, 3, 1], [0] * 6], dtype=np.float32)), vocab)
    scaled = rescale_lengths(bow, target=10.0)
    np.testing.assert_allclose(scaled.counts.toarray()[0, 4:], [7.5, 2.5])
    assert scaled.counts[1].sum() == 0
    rooted = rescale_lengths(bow, power=0.5)
    np.testing.assert_allclose(rooted.counts.toarray()[0, 4:], [1.5, 0.5])
    assert rescale_lengths(bow, power=1.0) is bow
    with pytest.raises(ValueError, match="exactly one"):
        rescale_lengths(bow)


# ---- the cluster command's function ----------------------------------------------------


def test_cluster_documents_reports_assignments_scores_and_top_words(tmp_path):
    bow = load_documents(_write_jsonl(tmp_path / "d.jsonl", _DOCS), min_df=2)
    model = NaiveBayesMixture(bow.vocab_size, 2).double()
    learner = EMLearner(System(model, None, ExactMarginal()), None, {"smoothing": 0.01}, seed=0)
    learner.start(bow, 5)
    for epoch in range(50):
        learner.step(bow.make_batch(list(range(len(bow)))), 0)
        learner.end_epoch(epoch)
    out = cluster_documents(model, bow, top_n=3)
    json.dumps(out)  # JSON-ready for --json
    assert len(out["assignments"]) == 5 and out["ids"][0] == "a/1"
    assert out["usage"]["used"] == 2
    assert out["nmi"] > 0.5 and 0 < out["purity"] <= 1
    assert len(out["top_words"]) == 2 and all(len(w) == 3 for w in out["top_words"])
    assert {out["top_words"][0][0], out["top_words"][1][0]} == {"goal", "vote"}
    assert out["perplexity"] > 1 and out["tokens"] == 16
    assert out["label_names"] == ["politics", "sport"]
