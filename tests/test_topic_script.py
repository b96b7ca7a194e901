"""scripts/topic_model.py end to end on a tiny corpus of three planted word groups (M10 and M3)."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "topic_model.py"

GROUPS = [
    ["apple", "banana", "cherry", "grape", "mango", "lemon", "peach", "plum"],
    ["rocket", "planet", "orbit", "galaxy", "comet", "nebula", "asteroid", "telescope"],
    ["guitar", "violin", "piano", "drum", "flute", "cello", "trumpet", "harp"],
]


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("topic_model_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_corpus(path: Path, docs_per_group: int, empty: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    lines = []
    for d in range(docs_per_group):
        for g, words in enumerate(GROUPS):
            text = " ".join(rng.choice(words, size=int(rng.integers(15, 40))))
            lines.append({"id": f"{g}-{d}", "label": f"group{g}", "text": f"The {text} and it is"})
    lines += [{"id": f"empty-{i}", "label": "none", "text": "the and of it is 1993"} for i in range(empty)]
    path.write_text("\n".join(json.dumps(line) for line in lines) + "\n")


@pytest.fixture(scope="module")
def run(tmp_path_factory, script):
    tmp = tmp_path_factory.mktemp("topics")
    write_corpus(tmp / "train.jsonl", docs_per_group=20, empty=2, seed=0)
    write_corpus(tmp / "test.jsonl", docs_per_group=8, empty=1, seed=1)
    out = script.main([
        "--train", str(tmp / "train.jsonl"), "--test", str(tmp / "test.jsonl"), "--topics", "3",
        "--latent-dim", "3", "--hidden-dim", "32", "--epochs", "12", "--batch-size", "10", "--lr", "0.02",
        "--samples", "20", "--top-words", "8", "--topic-init-docs", "5", "--no-progress",
        "--json", str(tmp / "out.json"),
    ])
    return out, tmp


def test_perplexities_are_finite_and_the_is_estimate_beats_the_bound(run):
    out, tmp = run
    assert json.loads((tmp / "out.json").read_text())["table"] == out["table"]
    data = out["data"]
    assert data["words"] == 24 and data["train_empty_skipped"] == 2 and data["test_empty_skipped"] == 1
    assert data["fit_docs"] + data["val_docs"] == 60 and data["val_docs"] == 3
    for name in ("m10", "m3"):
        test = out["results"][name]["test"]
        assert test["docs"] == 24
        for key in ("ppl_is", "ppl_bound", "ppl_is_doc_avg", "ppl_bound_doc_avg", "kl_per_doc"):
            assert math.isfinite(test[key]), (name, key, test[key])
        assert 1.0 < test["ppl_is"] <= test["ppl_bound"] * 1.001, (name, test)
        assert test["is_minus_elbo_per_doc"] >= 0.0
        # each document uses one group of 8 words (+ nothing else after stop words): a model that
        # learned the groups is far below the 28-way uniform (24 words + 4 never-seen specials)
        assert test["ppl_is"] < 13.0, (name, test["ppl_is"])  # M10's default init collapses: ~25 here
        assert f"| {script_label(name)}" in out["table"]


def script_label(name: str) -> str:
    return {"m10": "M10 neural topic model", "m3": "M3 bag-of-words VAE"}[name]


def test_m10_topics_recover_the_planted_groups_and_npmi_is_in_range(run):
    out, _ = run
    topics = out["results"]["m10"]["topics"]
    assert len(topics) == 3
    owners = []
    for topic in topics:
        npmi = topic["npmi"]
        assert -1.0 <= npmi <= 1.0
        # which group owns the topic's top 6 words (all of them must come from one group)
        groups = {g for w in topic["words"][:6] for g, words in enumerate(GROUPS) if w in words}
        assert len(groups) == 1, topic["words"]
        owners.append(groups.pop())
    assert sorted(owners) == [0, 1, 2], [t["words"] for t in topics]
    mean = out["results"]["m10"]["npmi_mean"]
    assert -1.0 <= mean <= 1.0 and mean == pytest.approx(np.mean([t["npmi"] for t in topics]))
    # words of one group always co-occur and never with another group's: coherence is high
    assert mean > 0.5


def test_scoring_matches_the_library_importance_sampler(script):
    """The script's IS estimate (which shares its samples with the ELBO) is the library's."""
    from latentlm.data.documents import BagOfWords
    from latentlm.data.vocab import SPECIALS, Vocab
    from latentlm.evaluation.likelihood import importance_sampled_log_marginal
    from latentlm.inference import POSTERIORS
    from latentlm.models import BagOfWordsVAE, NeuralTopicModel
    import scipy.sparse as sp

    torch.manual_seed(0)
    counts = sp.csr_matrix(np.random.default_rng(0).poisson(0.7, size=(5, 12)).astype(np.float32))
    batch = BagOfWords(counts, Vocab(list(SPECIALS) + [f"w{i}" for i in range(8)])).batch()
    for model in (NeuralTopicModel(12, num_topics=4, latent_dim=3), BagOfWordsVAE(12, latent_dim=3)):
        posterior = POSTERIORS["gaussian_bow"](12, 3, hidden_dim=8, bound=(10.0, 5.0))
        noise = torch.randn(7, 5, 3)
        scores = script.score_batch(model, posterior, batch, noise, chunk=3)
        expected = importance_sampled_log_marginal(model, posterior, batch, 7, noise=noise)  # default chunk
        torch.testing.assert_close(scores["log_px"], expected)
        torch.testing.assert_close(script.score_batch(model, posterior, batch, noise)["log_px"], expected)
