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
    folder = find_corpus("ptb")  # ../shared/data/ptb where it exists, else the bundled copy
    assert split_path(folder, "train").name in ("ptb.train.txt", "ptb.train.txt.xz")


@pytest.fixture
def no_shared(monkeypatch, tmp_path):
    """Pretend the repository sits in an empty folder (no ../shared beside it)."""
    import latentlm.data.corpus as corpus

    monkeypatch.setattr(corpus, "_repo_root", lambda: tmp_path / "clone")
    monkeypatch.delenv("LATENTLM_DATA", raising=False)


def test_bundled_ptb_is_the_last_resort(no_shared, tiny_corpus, monkeypatch):
    import hashlib

    import latentlm.data.corpus as corpus

    folder = find_corpus("ptb")
    assert folder == corpus.BUNDLED / "ptb"
    # The bundled copy decompresses to Mikolov's files exactly (sums from bundled/ptb/SOURCE.md).
    expected = {"train": "fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf",
                "valid": "c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2",
                "test": "dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"}
    for split, digest in expected.items():
        raw = corpus.lzma.decompress(split_path(folder, split).read_bytes())
        assert hashlib.sha256(raw).hexdigest() == digest
    test = read_lines(split_path(folder, "test"))
    assert len(test.lines) == 3761 and test.num_tokens == 78669
    # Anything the user points at still comes first.
    assert find_corpus("ptb", tiny_corpus) == tiny_corpus
    monkeypatch.setenv("LATENTLM_DATA", str(tiny_corpus))
    assert find_corpus("ptb") == tiny_corpus


def test_compressed_splits_are_read_and_bad_archives_named(tmp_path):
    import gzip
    import lzma

    (tmp_path / "train.txt.xz").write_bytes(lzma.compress(b"a b c\nd e\n"))
    (tmp_path / "valid.txt.gz").write_bytes(gzip.compress(b"a b\n"))
    (tmp_path / "test.txt.xz").write_bytes(b"not xz at all")
    assert read_lines(split_path(tmp_path, "train")).lines == [["a", "b", "c"], ["d", "e"]]
    assert read_lines(split_path(tmp_path, "valid")).lines == [["a", "b"]]
    with pytest.raises(CorpusError, match=r"test\.txt\.xz: not a readable xz file"):
        read_lines(split_path(tmp_path, "test"))
    (tmp_path / "bad.txt.gz").write_bytes(gzip.compress(b"ok\ncaf\xe9\n"))
    with pytest.raises(CorpusError, match=r"bad\.txt\.gz:2: bytes that are not UTF-8"):
        read_lines(tmp_path / "bad.txt.gz")


def test_missing_corpus_lists_every_place_looked(no_shared):
    with pytest.raises(CorpusError, match="(?s)not found.*shared.data.wikitext.*bundled.wikitext.*--data-dir"):
        find_corpus("wikitext")


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
