import pytest
import torch

from latentlm.data import TextDataset, Vocab, find_corpus, read_lines, split_path
from latentlm.errors import CorpusError


def test_vocab_specials_and_roundtrip(tmp_path):
    vocab = Vocab.build([["a", "b", "b", "<unk>"], ["c", "b"]], max_size=6)
    assert vocab.itos[:4] == ["<pad>", "<s>", "</s>", "<unk>"]
    assert vocab.itos[4] == "b"  # most frequent first
    assert len(vocab) == 6
    assert vocab.encode(["b", "zzz"]) == [4, vocab.unk_id]
    path = tmp_path / "vocab.json"
    vocab.save(path)
    assert Vocab.load(path).itos == vocab.itos


def test_min_count_and_unknown_aliases():
    vocab = Vocab.build([["a", "a", "b", "_UNK"]], min_count=2)
    assert vocab.itos[4:] == ["a"]
    assert vocab.encode(["_UNK", "b"]) == [vocab.unk_id, vocab.unk_id]


def test_batches_are_padded_bucketed_and_deterministic(tiny_corpus):
    lines = read_lines(tiny_corpus / "train.txt").lines
    ds = TextDataset(lines, Vocab.build(lines))
    a = ds.batch_indices(8, shuffle=True, seed=3, epoch=1)
    assert a == ds.batch_indices(8, shuffle=True, seed=3, epoch=1)
    assert a != ds.batch_indices(8, shuffle=True, seed=3, epoch=2)
    assert sorted(i for b in a for i in b) == list(range(len(ds)))
    batch = ds.make_batch(a[0])
    for row, i in enumerate(batch.index.tolist()):
        n = len(lines[i])
        assert batch.lengths[row] == n + 1
        assert batch.tokens[row, 0] == Vocab.bos_id and batch.tokens[row, n + 1] == Vocab.eos_id
        assert (batch.tokens[row, n + 2:] == Vocab.pad_id).all()
    assert batch.mask.sum() == batch.lengths.sum()


def test_find_corpus_order(tiny_corpus, monkeypatch, tmp_path):
    assert find_corpus("tiny", tiny_corpus.parent) == tiny_corpus
    assert find_corpus("anything", tiny_corpus) == tiny_corpus
    monkeypatch.setenv("LATENTLM_DATA", str(tiny_corpus.parent))
    assert find_corpus("tiny") == tiny_corpus
    with pytest.raises(CorpusError, match="(?s)not found.*LATENTLM_DATA"):
        find_corpus("nope", tmp_path / "missing")


def test_ptb_names_are_found():
    folder = find_corpus("ptb")
    assert split_path(folder, "train").name == "ptb.train.txt"


@pytest.mark.parametrize(
    "content, message",
    [
        (b"", "file is empty"),
        (b"a b\n\nc\n", r"train.txt:2: empty line"),
        (b"a b\nc \xff\xfe d\n", r"train.txt:2: bytes that are not UTF-8"),
        (b"a b\n" + b"w " * 50 + b"\n", r"train.txt:2: line has 50 tokens, over the cap of 20"),
    ],
)
def test_bad_input_names_file_and_line(tmp_path, content, message):
    path = tmp_path / "train.txt"
    path.write_bytes(content)
    with pytest.raises(CorpusError, match=message):
        read_lines(path, max_tokens=20)


def test_missing_split(tmp_path):
    (tmp_path / "train.txt").write_text("a b\n")
    with pytest.raises(CorpusError, match="split 'valid' missing"):
        split_path(tmp_path, "valid")
