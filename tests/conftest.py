import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
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
