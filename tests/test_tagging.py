"""E4 tag-induction scores on constructed cases, and the tagged-corpus readers."""

from __future__ import annotations

import pytest

from latentlm.data.conll import read_conllu, read_tagged_tsv
from latentlm.errors import CorpusError
from latentlm.evaluation.tagging import many_to_one, one_to_one, tagging_scores, v_measure


def test_perfect_relabelling_scores_one():
    gold = [["DT", "NN", "VB"], ["DT", "NN"]]
    pred = [[7, 3, 1], [7, 3]]
    s = tagging_scores(pred, gold)
    assert s.many_to_one == s.one_to_one == pytest.approx(1.0)
    assert s.v_measure == pytest.approx(1.0)
    assert s.tokens == 5


def test_many_to_one_vs_one_to_one():
    gold = ["A", "A", "A", "B", "B", "C"]
    # two states for A: many-to-one maps both to A; one-to-one can use only one of them.
    pred = [0, 0, 1, 2, 2, 2]
    assert many_to_one(pred, gold) == pytest.approx(5 / 6)
    assert one_to_one(pred, gold) == pytest.approx(4 / 6)  # 0->A (2), 2->B (2), 1->C (0)
    # a single cluster: many-to-one is the majority baseline, V-measure is 0
    assert many_to_one([0] * 6, gold) == pytest.approx(3 / 6)
    assert v_measure([0] * 6, gold) == pytest.approx(0.0)


def test_every_token_its_own_state():
    gold = ["A", "A", "B", "B"]
    pred = [0, 1, 2, 3]
    assert many_to_one(pred, gold) == 1.0
    assert one_to_one(pred, gold) == pytest.approx(0.5)


def test_length_mismatch_is_an_error():
    with pytest.raises(ValueError, match="3 predicted"):
        many_to_one([1, 2, 3], ["A"])


def test_readers(tmp_path):
    tsv = tmp_path / "a.tsv"
    tsv.write_text("The\tDT\ndog\tNN\n\n#\t#\n.\t.\n\n", encoding="utf-8")
    c = read_tagged_tsv(tsv)
    assert c.words == [["The", "dog"], ["#", "."]] and c.tags == [["DT", "NN"], ["#", "."]]
    bad = tmp_path / "b.tsv"
    bad.write_text("The DT\n", encoding="utf-8")
    with pytest.raises(CorpusError, match="b.tsv:1"):
        read_tagged_tsv(bad)
    conllu = tmp_path / "c.conllu"
    rows = [
        "# text = Don't go.",
        "1-2\tDon't\t_\t_\t_\t_\t_\t_\t_\t_",
        "1\tDo\tdo\tAUX\tVBP\t_\t3\taux\t_\t_",
        "2\tn't\tnot\tPART\tRB\t_\t3\tadvmod\t_\t_",
        "3\tgo\tgo\tVERB\tVB\t_\t0\troot\t_\t_",
        "3.1\tgone\tgo\tVERB\tVBN\t_\t_\t_\t_\t_",
        "4\t.\t.\tPUNCT\t.\t_\t3\tpunct\t_\t_",
        "",
    ]
    conllu.write_text("\n".join(rows) + "\n", encoding="utf-8")
    u = read_conllu(conllu)
    assert u.words == [["Do", "n't", "go", "."]] and u.tags == [["AUX", "PART", "VERB", "PUNCT"]]
    assert read_conllu(conllu, "xpos").tags == [["VBP", "RB", "VB", "."]]
    with pytest.raises(CorpusError):
        read_tagged_tsv(tmp_path / "missing.tsv")


def test_treebank_fixture_reads(tagged_sample):
    c = read_tagged_tsv(tagged_sample)
    assert len(c) == 40 and c.num_tokens == sum(len(w) for w in c.words)
    assert all(len(w) == len(t) for w, t in zip(c.words, c.tags))
    assert {"NN", "DT", "VBD", "."} <= set(c.tagset)
