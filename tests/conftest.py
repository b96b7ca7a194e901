import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "data"  # small cuts of public corpora (tests/data/SOURCE.md)
torch.set_num_threads(int(os.environ.get("LATENTLM_TEST_THREADS", "1")))


@pytest.fixture
def tiny_corpus(tmp_path: Path) -> Path:
    """A small corpus folder written by the test itself (plain {split}.txt names)."""
    return write_tiny_corpus(tmp_path / "tiny")


def write_tiny_corpus(folder: Path) -> Path:
    """``tiny_corpus``'s files (120 / 30 / 30 sentences) in ``folder``, for module-scoped fixtures."""
    folder.mkdir()
    words = "the cat dog sat on mat a ran fast slow big small".split()
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", 120), ("valid", 30), ("test", 30)):
        lines = []
        for _ in range(n):
            length = int(torch.randint(2, 9, (), generator=g))
            idx = torch.randint(0, len(words), (length,), generator=g)
            lines.append(" ".join(words[i] for i in idx))
        (folder / f"{split}.txt").write_text("\n".join(lines) + "\n")
    return folder


@pytest.fixture
def ptb_small() -> Path:
    """300 / 60 / 60 PTB sentences held by the repository (train.txt, valid.txt, test.txt)."""
    return FIXTURES / "ptb_small"


@pytest.fixture
def tagged_sample() -> Path:
    """40 gold-tagged WSJ sentences (token TAB tag), 45-tag PTB set."""
    return FIXTURES / "pos" / "treebank_sample.tsv"


@pytest.fixture
def docs_small() -> dict[str, Path]:
    """Labelled 20 Newsgroups documents, 4 groups: 100 train and 40 test (jsonl)."""
    return {s: FIXTURES / "docs" / f"20news_small.{s}.jsonl" for s in ("train", "test")}


def pytest_collection_modifyitems(config, items):
    """Tests marked ``cuda`` run where torch sees a GPU (``make gpu-check``) and are skipped,
    with the reason, everywhere else."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason=f"needs a CUDA GPU (torch {torch.__version__}, torch.version.cuda = "
                                   f"{torch.version.cuda}, no device visible); run `make gpu-check` on a GPU machine")
    for item in items:
        if item.get_closest_marker("cuda") is not None:
            item.add_marker(skip)
