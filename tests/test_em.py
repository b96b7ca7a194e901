"""Closed-form EM for M1 (the ``em`` learner): monotone, matches the closed form, recovers planted clusters."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from latentlm.data.documents import BagOfWords
from latentlm.data.vocab import SPECIALS, Vocab
from latentlm.evaluation.clustering import nmi
from latentlm.errors import ConfigError
from latentlm.inference.em import Annealing, EMData, EMLearner, e_step, log_prior, m_step
from latentlm.inference.exact import ExactMarginal
from latentlm.models.nb_mixture import NaiveBayesMixture
from latentlm.system import System


def _planted(num_docs=300, num_clusters=4, num_words=150, length=40, seed=0, concentration=0.1):
    """Documents sampled from a known M1 with peaked, distinct clusters."""
    gen = torch.Generator().manual_seed(seed)
    truth = NaiveBayesMixture(num_words, num_clusters).double()
    dirichlet = torch.distributions.Dirichlet(torch.full((num_words,), concentration, dtype=torch.float64))
    torch.manual_seed(seed)
    pi = dirichlet.sample((num_clusters,))
    truth.set_log_probs(torch.full((num_clusters,), -np.log(num_clusters), dtype=torch.float64), pi.log())
    lengths = torch.randint(length // 2, 2 * length, (num_docs,), generator=gen)
    z, counts = truth.sample(lengths, generator=gen)
    vocab = Vocab(list(SPECIALS) + [f"w{i}" for i in range(num_words - len(SPECIALS))])
    return BagOfWords(sp.csr_matrix(counts.numpy()), vocab, labels=z.numpy()), truth


@pytest.fixture(scope="module")
def planted():
    return _planted()


def fit(model, bow, epochs, batch_size=64, seed=0, **options):
    """Drive the EM learner as the training loop does: E-step batches, M-step at each epoch end.
    Returns the epochs' metrics rows (nll and -objective per document, beta)."""
    learner = EMLearner(System(model, None, ExactMarginal()), None, options, seed=seed)
    learner.start(bow, batch_size)
    rows = []
    for epoch in range(epochs):
        for idx in bow.batch_indices(batch_size, shuffle=True, seed=seed, epoch=epoch):
            learner.step(bow.make_batch(idx), 0)
        rows.append({**learner.end_epoch(epoch), "phase": learner.phase})
        if rows[-1].get("stop"):
            break
    return rows


def _monotone(values, slack=1e-9):
    return all(b >= a - slack * max(1.0, abs(a)) for a, b in itertools.pairwise(values))


@pytest.mark.parametrize("smoothing", [0.0, 0.5])
def test_em_never_decreases_training_objective(planted, smoothing):
    bow, _ = planted
    model = NaiveBayesMixture(bow.vocab_size, 6).double()
    rows = fit(model, bow, 60, smoothing=smoothing, mixture_smoothing=smoothing)
    objectives = [-r["loss"] for r in rows]
    assert len(objectives) == 60
    assert _monotone(objectives)
    if smoothing == 0.0:  # without a prior the objective *is* the log-likelihood
        assert [r["nll"] for r in rows] == pytest.approx([r["loss"] for r in rows], rel=1e-12)


@pytest.mark.parametrize("length_power", [1.0, 0.5])
def test_annealed_em_is_monotone_at_every_fixed_beta_and_at_beta_one(planted, length_power):
    bow, _ = planted
    model = NaiveBayesMixture(bow.vocab_size, 5).double()
    anneal = {"beta_start": 0.01, "beta_growth": 1.5, "iters_per_beta": 8, "perturbation": 0.1,
              "length_power": length_power}
    learner_phases = len(Annealing(**anneal).schedule(float(bow.lengths.max())))
    rows = fit(model, bow, 8 * learner_phases + 40, smoothing=0.1, anneal=anneal)
    # the phase a row's E-step ran in: the learner's phase before that epoch's M-step
    phase_of = [0] + [r["phase"] for r in rows[:-1]]
    phases = sorted(set(phase_of))
    assert phases == list(range(learner_phases + 1))
    for phase in phases:
        steps = [-r["loss"] for r, p in zip(rows, phase_of) if p == phase]
        assert _monotone(steps), f"tempered objective decreased in phase {phase}"
        assert len(steps) == (40 if phase == phases[-1] else 8)
    # the last phase is plain EM: its objective is the penalized log-likelihood
    last = rows[-1]
    assert -last["loss"] * len(bow) - (-last["nll"] * len(bow)) == pytest.approx(
        log_prior(model, 0.1, 0.0), rel=0.05)  # log p(theta) moves a little in the last M-step
    assert rows[0]["beta"] == pytest.approx(0.01)
    if length_power < 1:  # beta keeps rising past 1 until the longest document is at beta_n = 1
        assert max(r["beta"] for r in rows) > 1.0


def test_length_aware_betas_cool_short_documents_first(planted):
    from latentlm.inference.em import document_betas

    bow, _ = planted
    lengths = torch.from_numpy(bow.lengths)
    betas = document_betas(lengths, 0.5, 0.5)  # (N,)
    assert betas.shape == (len(bow),) and float(betas.max()) <= 1.0
    short, long = int(lengths.argmin()), int(lengths.argmax())
    assert betas[short] >= betas[long]
    assert float(betas[long]) == pytest.approx(0.5 / float(lengths[long]) ** 0.5)
    assert document_betas(lengths, 0.5, 1.0) == 0.5


def test_beta_schedule_is_geometric_below_one():
    betas = Annealing(beta_start=0.002, beta_growth=2.0).schedule()
    assert betas[0] == 0.002 and betas[-1] < 1.0 and betas[-1] * 2.0 >= 1.0
    assert all(b == pytest.approx(a * 2.0) for a, b in itertools.pairwise(betas))
    # length-aware: until the longest document (400 tokens) reaches beta_n = 1, i.e. beta = 20
    longer = Annealing(beta_start=0.002, beta_growth=2.0, length_power=0.5).schedule(400.0)
    assert longer[-1] < 20.0 <= longer[-1] * 2.0


def test_m_step_matches_numpy_closed_form(planted):
    bow, _ = planted
    model = NaiveBayesMixture(bow.vocab_size, 3).double()
    data = EMData(bow, dtype=torch.float64)
    rng = np.random.default_rng(0)
    resp = rng.dirichlet(np.ones(3), size=len(bow))  # (N, K)
    alpha = 0.3
    m_step(model, data, torch.from_numpy(resp), smoothing=alpha, mixture_smoothing=1.0)
    expected = resp.T @ bow.counts.toarray()          # (K, V)
    pi = (expected + alpha) / (expected.sum(1, keepdims=True) + alpha * bow.vocab_size)
    mu = (resp.sum(0) + 1.0) / (len(bow) + 3.0)
    np.testing.assert_allclose(model.log_word_probs().exp().detach().numpy(), pi, rtol=1e-10)
    np.testing.assert_allclose(model.log_mixture().exp().detach().numpy(), mu, rtol=1e-10)


def test_e_step_tempered_objective_is_scaled_logsumexp(planted):
    bow, _ = planted
    model = NaiveBayesMixture(bow.vocab_size, 3).double()
    data = EMData(bow, dtype=torch.float64)
    resp, log_lik, tempered = e_step(model, data, beta=0.5)
    with torch.no_grad():
        joint = model.log_joint(bow.batch(dtype=torch.float64))
    assert tempered == pytest.approx(float(torch.logsumexp(0.5 * joint, -1).sum() / 0.5))
    assert log_lik == pytest.approx(float(torch.logsumexp(joint, -1).sum()))
    torch.testing.assert_close(resp, torch.softmax(0.5 * joint, -1))


def test_batched_expected_counts_match_the_full_data_m_step(planted):
    """The learner's batched E-step + the model's M-step = one full-data EM iteration."""
    bow, _ = planted
    model = NaiveBayesMixture(bow.vocab_size, 3).double()
    twin = NaiveBayesMixture(bow.vocab_size, 3).double()
    twin.load_state_dict(model.state_dict())
    data = EMData(bow, dtype=torch.float64)
    resp, _, _ = e_step(twin, data)
    m_step(twin, data, resp, smoothing=0.2, mixture_smoothing=0.5)
    fit(model, bow, 1, batch_size=37, init="model", smoothing=0.2, mixture_smoothing=0.5)
    torch.testing.assert_close(model.log_word_probs(), twin.log_word_probs())
    torch.testing.assert_close(model.log_mixture(), twin.log_mixture())


def test_sparse_and_dense_em_agree(planted):
    bow, _ = planted
    results = []
    for sparse in (True, False):
        model = NaiveBayesMixture(bow.vocab_size, 4).double()
        learner = EMLearner(System(model, None, ExactMarginal()), None, {"init": "random"}, seed=0)
        learner.start(bow, 300)
        for _ in range(15):
            learner.step(bow.batch(sparse=sparse, dtype=torch.float64), 0)
            row = learner.end_epoch(0)
        results.append((row["nll"], model.log_word_probs().detach()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-10)
    torch.testing.assert_close(results[0][1], results[1][1])


@pytest.mark.parametrize("anneal", [False, True])
def test_em_recovers_planted_clusters(planted, anneal):
    bow, truth = planted
    options = {"anneal": {"beta_start": 0.01, "beta_growth": 1.3}} if anneal else {}
    best = None
    for seed in range(3):  # restarts, chosen by the final training objective
        model = NaiveBayesMixture(bow.vocab_size, 4).double()
        rows = fit(model, bow, 200, seed=seed, smoothing=0.01, tol=1e-6, **options)
        if best is None or -rows[-1]["loss"] > best[0]:
            best = (-rows[-1]["loss"], model, rows)
    _, model, rows = best
    assert rows[-1].get("stop", "").startswith("converged")
    assign = model.assign(bow.batch(dtype=torch.float64))
    assert nmi(bow.labels, assign) > 0.9
    # the fitted likelihood is at least the generating model's (minus a little for finite samples)
    with torch.no_grad():
        true_ll = float(truth.log_marginal(bow.batch(dtype=torch.float64)).sum())
        fitted_ll = float(model.log_marginal(bow.batch(dtype=torch.float64)).sum())
    assert fitted_ll > true_ll - 0.01 * abs(true_ll)


def test_smoothing_keeps_held_out_documents_finite(planted):
    bow, _ = planted
    train, held_out = bow.subset(np.arange(0, 60)), bow.subset(np.arange(60, 300))
    for alpha, finite in [(0.0, False), (0.1, True)]:
        model = NaiveBayesMixture(bow.vocab_size, 4).double()
        fit(model, train, 20, smoothing=alpha)
        with torch.no_grad():
            lp = model.log_marginal(held_out.batch(dtype=torch.float64))
        assert not torch.isnan(lp).any()
        assert bool(torch.isfinite(lp).all()) is finite


def test_em_checks_its_options(planted):
    bow, _ = planted
    model = NaiveBayesMixture(bow.vocab_size, 2)
    with pytest.raises(ConfigError, match="beta_growth"):
        EMLearner(System(model, None, ExactMarginal()), None, {"anneal": {"beta_growth": 1.0}})
    with pytest.raises(ConfigError, match="init"):
        EMLearner(System(model, None, ExactMarginal()), None, {"init": "kmeans"})
    with pytest.raises(ValueError, match="smoothing"):
        fit(model, bow, 1, smoothing=-1.0)
