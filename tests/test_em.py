"""Closed-form EM for M1: monotone, matches the closed form, recovers planted clusters."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from latentlm.data.documents import BagOfWords
from latentlm.data.vocab import SPECIALS, Vocab
from latentlm.evaluation.clustering import nmi
from latentlm.inference.em import EMConfig, EMData, beta_schedule, e_step, fit_em, log_prior, m_step
from latentlm.models.nb_mixture import NaiveBayesMixture


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


def _monotone(values, slack=1e-9):
    return all(b >= a - slack * max(1.0, abs(a)) for a, b in itertools.pairwise(values))


@pytest.mark.parametrize("smoothing", [0.0, 0.5])
def test_em_never_decreases_training_objective(planted, smoothing):
    bow, _ = planted
    model = NaiveBayesMixture(bow.vocab_size, 6).double()
    result = fit_em(model, bow, EMConfig(max_iters=60, tol=-math.inf, smoothing=smoothing, mixture_smoothing=smoothing))
    objectives = [s.objective for s in result.history]
    assert len(objectives) == 60
    assert _monotone(objectives)
    if smoothing == 0.0:  # without a prior the objective *is* the log-likelihood
        assert [s.log_likelihood for s in result.history] == objectives
    assert result.objective >= objectives[-1] - 1e-9 * abs(objectives[-1])


@pytest.mark.parametrize("length_power", [1.0, 0.5])
def test_annealed_em_is_monotone_at_every_fixed_beta_and_at_beta_one(planted, length_power):
    bow, _ = planted
    model = NaiveBayesMixture(bow.vocab_size, 5).double()
    config = EMConfig(anneal=True, beta_start=0.01, beta_growth=1.5, iters_per_beta=8, max_iters=40, tol=-math.inf,
                      smoothing=0.1, perturbation=0.1, length_power=length_power)
    result = fit_em(model, bow, config)
    phases = sorted({s.phase for s in result.history})
    assert phases == list(range(len(phases)))
    for phase in phases:
        steps = [s for s in result.history if s.phase == phase]
        assert _monotone([s.objective for s in steps]), f"tempered objective decreased in phase {phase}"
        assert len(steps) == (40 if phase == phases[-1] else 8)
    # the last phase is plain EM: its objective is the penalized log-likelihood
    assert result.objective - result.log_likelihood == pytest.approx(log_prior(model, 0.1, 0.0))
    assert result.history[-1].objective <= result.objective + 1e-9 * abs(result.objective)
    assert result.history[0].beta == pytest.approx(0.01)
    if length_power < 1:  # beta keeps rising past 1 until the longest document is at beta_n = 1
        assert max(s.beta for s in result.history) > 1.0


def test_length_aware_betas_cool_short_documents_first(planted):
    from latentlm.inference.em import document_betas

    bow, _ = planted
    data = EMData(bow, dtype=torch.float64)
    betas = document_betas(data, 0.5, 0.5)  # (N,)
    lengths = data.lengths
    assert betas.shape == (len(bow),) and float(betas.max()) <= 1.0
    short, long = int(lengths.argmin()), int(lengths.argmax())
    assert betas[short] >= betas[long]
    assert float(betas[long]) == pytest.approx(0.5 / float(lengths[long]) ** 0.5)
    assert document_betas(data, 0.5, 1.0) == 0.5


def test_beta_schedule_is_geometric_below_one():
    betas = beta_schedule(EMConfig(anneal=True, beta_start=0.002, beta_growth=2.0))
    assert betas[0] == 0.002 and betas[-1] < 1.0 and betas[-1] * 2.0 >= 1.0
    assert all(b == pytest.approx(a * 2.0) for a, b in itertools.pairwise(betas))
    # length-aware: until the longest document (400 tokens) reaches beta_n = 1, i.e. beta = 20
    longer = beta_schedule(EMConfig(anneal=True, beta_start=0.002, beta_growth=2.0, length_power=0.5), 400.0)
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


def test_sparse_and_dense_em_agree(planted):
    bow, _ = planted
    results = []
    for sparse in (True, False):
        model = NaiveBayesMixture(bow.vocab_size, 4).double()
        result = fit_em(model, bow.batch(sparse=sparse, dtype=torch.float64), EMConfig(max_iters=15, tol=0.0))
        results.append((result.log_likelihood, model.log_word_probs().detach()))
    assert results[0][0] == pytest.approx(results[1][0], rel=1e-10)
    torch.testing.assert_close(results[0][1], results[1][1])


@pytest.mark.parametrize("anneal", [False, True])
def test_em_recovers_planted_clusters(planted, anneal):
    bow, truth = planted
    model = NaiveBayesMixture(bow.vocab_size, 4).double()
    config = EMConfig(anneal=anneal, beta_start=0.01, beta_growth=1.3, restarts=3, smoothing=0.01, seed=1)
    result = fit_em(model, bow, config)
    assign = model.assign(bow.batch(dtype=torch.float64))
    assert nmi(bow.labels, assign) > 0.9
    # the fitted likelihood is at least the generating model's (minus a little for finite samples)
    with torch.no_grad():
        true_ll = float(truth.log_marginal(bow.batch(dtype=torch.float64)).sum())
    assert result.log_likelihood > true_ll - 0.01 * abs(true_ll)


def test_restarts_are_chosen_by_training_objective(planted):
    bow, _ = planted
    model = NaiveBayesMixture(bow.vocab_size, 8).double()
    result = fit_em(model, bow, EMConfig(restarts=4, max_iters=30))
    assert len(result.restart_objectives) == 4
    assert result.best_restart == int(np.argmax(result.restart_objectives))
    assert result.objective == pytest.approx(max(result.restart_objectives), rel=1e-12)


def test_smoothing_keeps_held_out_documents_finite(planted):
    bow, _ = planted
    train, held_out = bow.subset(np.arange(0, 60)), bow.subset(np.arange(60, 300))
    for alpha, finite in [(0.0, False), (0.1, True)]:
        model = NaiveBayesMixture(bow.vocab_size, 4).double()
        fit_em(model, train, EMConfig(max_iters=20, smoothing=alpha))
        with torch.no_grad():
            lp = model.log_marginal(held_out.batch(dtype=torch.float64))
        assert not torch.isnan(lp).any()
        assert bool(torch.isfinite(lp).all()) is finite


def test_em_checks_its_inputs(planted):
    bow, _ = planted
    with pytest.raises(ValueError, match="words"):
        fit_em(NaiveBayesMixture(bow.vocab_size + 1, 2), bow)
    with pytest.raises(ValueError, match="beta_growth"):
        EMConfig(anneal=True, beta_growth=1.0)
    with pytest.raises(ValueError, match="smoothing"):
        EMConfig(smoothing=-1.0)
