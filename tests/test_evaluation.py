import math
from pathlib import Path

import pytest
import torch

from latentlm.evaluation import active_units, mutual_information

REPO = Path(__file__).resolve().parents[1]


def test_active_units_counts_dimensions_with_varying_means():
    g = torch.Generator().manual_seed(0)
    means = torch.randn(2000, 4, generator=g) * torch.tensor([1.0, 0.2, 0.05, 0.0])
    # variances 1, 0.04, 0.0025, 0 -> two dimensions above 0.01
    assert active_units(means) == 2
    assert active_units(means, threshold=0.001) == 3


def test_mutual_information_zero_when_every_posterior_is_the_same():
    means, logvars = torch.zeros(3000, 2), torch.zeros(3000, 2)
    mi = mutual_information(means, logvars, generator=torch.Generator().manual_seed(0))
    assert abs(mi) < 0.05


@pytest.mark.parametrize("groups", [2, 4, 8])
def test_mutual_information_is_log_k_for_k_separated_posteriors(groups):
    """N examples in k equal groups with sharp, far-apart posteriors: I(x; z) = log k."""
    n = 2400
    centres = torch.arange(groups, dtype=torch.float)[:, None] * 100.0
    means = centres.repeat_interleave(n // groups, 0).expand(-1, 3).contiguous()
    logvars = torch.full_like(means, -2.0)
    mi = mutual_information(means, logvars, generator=torch.Generator().manual_seed(0))
    assert mi == pytest.approx(math.log(groups), abs=0.05)  # Monte Carlo noise ~ 1/sqrt(N)


def test_mutual_information_does_not_depend_on_chunking():
    g = torch.Generator().manual_seed(0)
    means, logvars = torch.randn(500, 3, generator=g), torch.randn(500, 3, generator=g) * 0.1
    a = mutual_information(means, logvars, generator=torch.Generator().manual_seed(1), chunk=7)
    b = mutual_information(means, logvars, generator=torch.Generator().manual_seed(1), chunk=500)
    assert a == pytest.approx(b, abs=1e-5)


def test_mutual_information_of_a_near_collapsed_code_is_below_its_kl_even_on_few_examples():
    """I(x; z) <= E_x KL(q(z|x) || p(z)) (the gap is KL(q(z) || p(z))); the paired estimator
    keeps that on 60 examples in 32 dimensions, where an unpaired one is off by ~0.5 nats."""
    g = torch.Generator().manual_seed(0)
    means, logvars = 0.03 * torch.randn(60, 32, generator=g), -0.015 + 0.01 * torch.randn(60, 32, generator=g)
    kl = 0.5 * (means**2 + logvars.exp() - 1 - logvars).sum(-1).mean()
    mi = mutual_information(means, logvars, generator=torch.Generator().manual_seed(1), samples=4)
    assert -0.01 <= mi <= float(kl) + 0.005  # unbiased but noisy around a small true value
    same = mutual_information(torch.ones(60, 32), torch.zeros(60, 32), generator=g)
    assert same == pytest.approx(0.0, abs=1e-5)


def test_importance_sampling_reads_document_batches_without_a_chunk():
    """Regression: the default chunk read ``batch.inputs``, which a ``BowBatch`` lacks."""
    import numpy as np
    import scipy.sparse as sp

    from latentlm.data.documents import BagOfWords
    from latentlm.data.vocab import SPECIALS, Vocab
    from latentlm.evaluation import importance_sampled_log_marginal
    from latentlm.inference import POSTERIORS
    from latentlm.models import BagOfWordsVAE, NeuralTopicModel

    counts = sp.csr_matrix(np.random.default_rng(0).poisson(0.7, size=(5, 12)).astype(np.float32))
    batch = BagOfWords(counts, Vocab(list(SPECIALS) + [f"w{i}" for i in range(8)])).batch()
    torch.manual_seed(0)
    for model in (NeuralTopicModel(12, num_topics=3, latent_dim=2), BagOfWordsVAE(12, latent_dim=2)):
        posterior = POSTERIORS["gaussian_bow"](12, 2, hidden_dim=8)
        noise = torch.randn(9, 5, 2)
        log_px = importance_sampled_log_marginal(model, posterior, batch, 9, noise=noise)
        assert log_px.shape == (5,) and torch.isfinite(log_px).all()
        chunked = importance_sampled_log_marginal(model, posterior, batch, 9, chunk=2, noise=noise)
        torch.testing.assert_close(log_px, chunked)


# -- one definition of KL / MI / AU (issue 11, item 2) -------------------------------------------

def test_mutual_information_matches_the_closed_form_of_a_gaussian_channel():
    """x ~ N(0, s^2 I), q(z | x) = N(x, sigma^2 I): I(x; z) = D/2 log(1 + s^2 / sigma^2)."""
    from torch.distributions import Independent, Normal

    from latentlm.evaluation.latent import LatentStatistics

    g = torch.Generator().manual_seed(0)
    N, D, s, sigma = 3000, 2, 1.5, 1.0
    x = torch.randn(N, D, generator=g) * s
    exact = D / 2 * math.log(1 + s**2 / sigma**2)  # 1.179 nats
    logvars = torch.full((N, D), 2 * math.log(sigma))
    mi = mutual_information(x, logvars, generator=torch.Generator().manual_seed(1), samples=4)
    assert mi == pytest.approx(exact, abs=0.05)
    prior = Independent(Normal(torch.zeros(D), torch.ones(D)), 1)
    stats = LatentStatistics(prior)
    for chunk in x.split(100):  # batch by batch, as every entry point feeds it
        stats.add(Independent(Normal(chunk, torch.full_like(chunk, sigma)), 1))
    assert stats.result(seed=1)["mi"] == pytest.approx(exact, abs=0.05)
    assert stats.result(seed=1)["au"] == D


def test_mutual_information_of_categorical_posteriors_is_exact():
    from torch.distributions import Categorical

    from latentlm.evaluation.latent import LatentStatistics

    probs = torch.tensor([[0.9, 0.1], [0.1, 0.9]])  # x uniform over two examples
    stats = LatentStatistics(Categorical(logits=torch.zeros(2)))
    stats.add(Categorical(probs=probs))
    h = lambda p: -sum(v * math.log(v) for v in p)  # noqa: E731
    assert stats.result()["mi"] == pytest.approx(h([0.5, 0.5]) - h([0.9, 0.1]), abs=1e-6)


def test_evaluate_and_grid_report_the_same_kl_mi_and_au_for_the_same_run(tmp_path, tiny_corpus, capsys):
    """`latentlm grid` and `latentlm evaluate RUN` give one number: before, the grid recomputed
    MI from the encoder over another set of sentences with another number of draws."""
    import json

    from latentlm.cli.main import main
    from latentlm.report.grid import GridJob, run_directory, run_job

    config = str(REPO / "configs" / "tiny_vae.yaml")
    job = GridJob(config, seed=0, out=str(tmp_path / "grid"),
                  overrides=("train.max_steps=8", "train.eval_every=4", "train.epochs=1"),
                  test_limit=20, samples=3, precision="fp32", gap_sentences=0, gap_steps=0, threads=1,
                  data_dir=str(tiny_corpus))
    grid = run_job(job)
    assert grid["mi"] is not None and grid["au"] is not None
    capsys.readouterr()
    rc = main(["evaluate", str(run_directory(job.out, config, 0)), "--data-dir", str(tiny_corpus), "--limit", "20",
               "--samples", "3", "--precision", "fp32", "--json"])
    assert rc == 0
    cli = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for key in ("kl", "mi", "au", "nll", "elbo"):
        assert cli[key] == pytest.approx(grid[key], rel=1e-6, abs=1e-9), key
