"""M7: the tag chain with LSTM emissions and its amortized chain-CRF posterior.

Every exact quantity is checked against enumeration of tag paths on tiny chains; the gradient
estimators against the enumerated gradient of the whole ELBO; and the sanity anchor: with the
LSTM switched off M7 is an HMM, and its CRF posterior trained by the ELBO approaches the exact
posterior (bound within 0.5 nats of the exact log p(x) per sentence).
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import pytest
import torch
from torch.distributions import kl_divergence

from latentlm.data.batching import TextDataset
from latentlm.data.conll import read_tagged_tsv
from latentlm.data.vocab import Vocab
from latentlm.inference import ELBO
from latentlm.inference.crf_posterior import CRFBiLSTMPosterior
from latentlm.models.hmm import words_of
from latentlm.models.lstm_tag_chain import LSTMTagChain, MarkovChainPrior
from latentlm.structured import LinearChainCRF, chain_marginals
from latentlm.structured.expectations import chain_expected_score
from latentlm.structured.relaxed import perturb_and_map, relaxed_ffbs

SENTENCES = [["a", "b", "c"], ["b", "a"], ["c"]]


def _batch(sentences=SENTENCES):
    return TextDataset(sentences, Vocab.build(sentences)).make_batch(range(len(sentences)))


def _paths(K, n, T):
    """Every tag path of length n padded with -1 to T: (K^n, T)."""
    return torch.tensor([list(p) + [-1] * (T - n) for p in itertools.product(range(K), repeat=n)],
                        dtype=torch.long).reshape(K ** n, T)


def _enumerate(batch, K, fn):
    """fn(b, every path (K^n, n) of row b's n words) for each row b -> (B,)"""
    _, n = words_of(batch)
    return torch.stack([fn(b, _paths(K, int(n[b]), int(n[b]))) for b in range(len(n))])


def _in_row(paths, b, B):
    """paths (P, T) as row b of a (P, B, T) batch (other rows: any valid path, ignored)."""
    z = paths.clamp_min(0)[:, None].repeat(1, B, 1)
    z[:, b] = paths
    return z


def _random_crf(B, T, K, lengths, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    t = [torch.randn(s, generator=g, dtype=torch.float64).requires_grad_(grad) for s in ((K,), (K, K), (B, T, K))]
    return LinearChainCRF(t[1], t[2], torch.tensor(lengths), init=t[0]), t


def test_markov_prior_and_the_closed_form_kl_match_enumeration():
    K, T = 3, 4
    g = torch.Generator().manual_seed(1)
    p = MarkovChainPrior(torch.log_softmax(torch.randn(K + 1, generator=g, dtype=torch.float64), -1),
                         torch.log_softmax(torch.randn(K, K + 1, generator=g, dtype=torch.float64), -1))
    # p sums to 1 over all paths of every length (up to length 8: all but the tail)
    total = sum(float(torch.logsumexp(p.log_prob(_paths(K, n, n)), 0).exp()) for n in range(0, 9))
    assert 0.5 < total <= 1 + 1e-9
    q, _ = _random_crf(3, T, K, [4, 2, 1])
    enumerated = []
    for b, n in enumerate((4, 2, 1)):
        z = _in_row(_paths(K, n, T), b, 3)
        log_q = q.log_prob(z)[:, b]
        enumerated.append((log_q.exp() * (log_q - p.log_prob(z[:, b]))).sum())
    assert torch.allclose(kl_divergence(q, p), torch.stack(enumerated), atol=1e-9)
    assert p.log_prob(torch.full((2, 0), -1, dtype=torch.long)).allclose(p.log_init[K])  # the empty sentence


def test_expected_score_matches_the_marginals_and_their_gradient():
    B, T, K = 3, 5, 4
    q, (init, trans, unary) = _random_crf(B, T, K, [5, 2, 1], grad=True)
    g = torch.Generator().manual_seed(3)
    si, st, su = (torch.randn(s, generator=g, dtype=torch.float64) for s in ((K,), (K, K), (B, T, K)))
    mu, xi = chain_marginals(init, trans, unary, q.lengths, pairwise=True)
    steps = (torch.arange(1, T)[None] < q.lengths[:, None])[..., None, None]
    reference = mu[:, 0] @ si + (mu * su).sum((1, 2)) + (torch.where(steps, xi, 0.0) * st).sum((1, 2, 3))
    fast = chain_expected_score(init, trans, unary, q.lengths, si, st, su)
    assert torch.allclose(fast, reference, atol=1e-10)
    for a, b in zip(torch.autograd.grad(fast.sum(), [init, trans, unary]),
                    torch.autograd.grad(reference.sum(), [init, trans, unary])):
        assert torch.allclose(a, b, atol=1e-10)


def test_without_the_lstm_the_model_is_an_hmm():
    batch, K = _batch(), 3
    model = LSTMTagChain(8, K, dim=8, lstm=False, init_scale=1.0, seed=0).double()
    p = model.prior()
    joint = _enumerate(batch, K, lambda b, z: torch.logsumexp(
        p.log_prob(z) + model.log_likelihood(_row(batch, b), z[:, None])[:, 0], 0))
    assert torch.allclose(model.exact_log_marginal(batch), joint, atol=1e-9)
    post = model.exact_posterior(batch)
    z = post.sample((5,))
    exact = p.log_prob(z) + model.log_likelihood(batch, z) - model.exact_log_marginal(batch)
    assert torch.allclose(post.log_prob(z), exact, atol=1e-9)
    with pytest.raises(ValueError, match="lstm: false"):
        LSTMTagChain(8, K, lstm=True).exact_log_marginal(batch)


def _row(batch, b):
    from latentlm.data.batching import Batch
    return Batch(batch.tokens[b : b + 1], batch.lengths[b : b + 1], batch.index[b : b + 1])


@pytest.mark.parametrize("lstm", [False, True])
def test_a_one_hot_relaxed_path_scores_as_the_hard_path(lstm):
    batch, K = _batch(), 3
    model = LSTMTagChain(8, K, dim=8, hidden_dim=8, lstm=lstm, seed=0)
    q = CRFBiLSTMPosterior(8, K, embed_dim=8, hidden_dim=8)(batch)
    z = q.sample((4,))
    hot = torch.nn.functional.one_hot(z.clamp_min(0), K).float() * (z >= 0)[..., None]
    assert torch.allclose(model.log_likelihood(batch, z), model.log_likelihood(batch, hot), atol=1e-5)


# ---- gradient estimators against the enumerated gradient -------------------------------------


def _system(seed=0):
    torch.manual_seed(seed)
    batch, K = _batch([["a", "b", "c"], ["b", "a"]]), 2
    model = LSTMTagChain(7, K, dim=4, hidden_dim=4, lstm=True, init_scale=1.0, seed=seed).double()
    posterior = CRFBiLSTMPosterior(7, K, embed_dim=4, hidden_dim=4).double()
    with torch.no_grad():
        for t in posterior.parameters():
            t.normal_(0, 0.7)
    return batch, K, model, posterior


def _exact_elbo(batch, K, model, posterior):
    q, p = posterior(batch), model.prior()

    def row(b, z):
        one = _row(batch, b)
        qb = posterior(one)
        log_q = qb.log_prob(z[:, None])[:, 0]
        g = model.log_likelihood(one, z[:, None])[:, 0] + p.log_prob(z) - log_q
        return (log_q.exp() * g).sum()

    del q
    return _enumerate(batch, K, row).sum()


def _flat_grad(loss, params):
    return torch.cat([t.flatten() for t in torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)])


@pytest.mark.parametrize("estimator", [
    {"type": "score_function", "baseline": "self_critic"},
    {"type": "score_function", "baseline": "leave_one_out"},
])
def test_score_function_estimators_match_the_enumerated_gradient(estimator):
    batch, K, model, posterior = _system()
    params = [*posterior.parameters(), *model.parameters()]
    exact = _flat_grad(_exact_elbo(batch, K, model, posterior), params)
    objective = ELBO(samples=4, estimator=estimator, kl="analytic")
    with torch.no_grad():
        out = objective(model, posterior, batch)
        assert torch.allclose(-out.loss, out.bound.mean())
    draws = torch.stack([_flat_grad(-objective(model, posterior, batch).loss * 2, params) for _ in range(600)])
    mean, se = draws.mean(0), draws.std(0) / math.sqrt(draws.size(0))
    bad = (mean - exact).abs() > 4.5 * se + 1e-6
    assert not bad.any(), f"estimate {mean[bad]} vs exact {exact[bad]} (se {se[bad]})"


def test_relaxed_ffbs_draws_exact_paths_and_relaxes_them():
    q, (init, trans, unary) = _random_crf(2, 3, 2, [3, 2])
    g = torch.Generator().manual_seed(0)
    hard, soft = relaxed_ffbs(init, trans, unary, q.lengths, 4000, 0.05, generator=g)
    for b, n in enumerate((3, 2)):
        paths = _paths(2, n, 3)
        freq = (hard[:, b, None, :] == paths[None]).all(-1).double().mean(0)  # (P,)
        prob = q.log_prob(_in_row(paths, b, 2))[:, b].exp()
        assert (freq - prob).abs().max() < 4.5 * float((prob * (1 - prob) / 4000).sqrt().max())
    hot = torch.nn.functional.one_hot(hard.clamp_min(0), 2).double() * (hard >= 0)[..., None]
    assert (soft - hot).abs().mean() < 0.02
    pm_hard, pm_soft = perturb_and_map(init, trans, unary, q.lengths, 8, 0.01, generator=g)
    assert ((pm_soft.argmax(-1) == pm_hard) | (pm_hard < 0)).all()


@pytest.mark.parametrize("method", ["ffbs", "perturb_and_map"])
def test_gumbel_crf_gradient_points_along_the_exact_one(method):
    """Relaxed gradients are biased; on the posterior's parameters they must still point the
    exact gradient's way, and the reported bound is the true one (value at exact samples)."""
    batch, K, model, posterior = _system()
    params = list(posterior.parameters())
    exact = _flat_grad(_exact_elbo(batch, K, model, posterior), params)
    objective = ELBO(samples=8, estimator={"type": "gumbel_crf", "method": method, "temperature": 0.5})
    with torch.no_grad():
        bounds = torch.stack([objective(model, posterior, batch).bound.sum() for _ in range(200)])
    elbo = float(_exact_elbo(batch, K, model, posterior).detach())
    assert abs(float(bounds.mean()) - elbo) < 4.5 * float(bounds.std()) / math.sqrt(200) + 1e-6
    mean = torch.stack([_flat_grad(-objective(model, posterior, batch).loss * 2, params) for _ in range(200)]).mean(0)
    assert float(torch.nn.functional.cosine_similarity(mean, exact, 0)) > 0.7


# ---- the sanity anchor ---------------------------------------------------------------------


def test_with_the_lstm_off_the_crf_posterior_trained_by_the_elbo_approaches_the_exact_one(tagged_sample):
    torch.manual_seed(0)
    corpus = read_tagged_tsv(tagged_sample)
    vocab = Vocab.build(corpus.words)
    data = TextDataset(corpus.words, vocab)
    batch = data.make_batch(sorted(range(len(data)), key=lambda i: len(corpus.words[i]))[:16])  # 16 shortest
    K = 3
    model = LSTMTagChain(len(vocab), K, dim=16, lstm=False, init_scale=1.0, seed=0)
    with torch.no_grad():  # peaked emissions: a posterior far from the prior
        model.state_emb.mul_(3)
        model.out_emb.mul_(3)
    model.requires_grad_(False)
    posterior = CRFBiLSTMPosterior(len(vocab), K, embed_dim=16, hidden_dim=16)
    objective = ELBO(samples=8, estimator={"type": "score_function", "baseline": "leave_one_out"})
    steps = 300
    opt = torch.optim.Adam(posterior.parameters(), lr=0.2)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=0.004)
    for _ in range(steps):
        opt.zero_grad()
        objective(model, posterior, batch).loss.backward()
        opt.step()
        sched.step()
    with torch.no_grad():
        q = posterior(batch)
        words, n = words_of(batch)
        mask = (torch.arange(words.size(1))[None] < n[:, None])[..., None]
        log_emit = model.hmm_tables()[2].t()[words]  # (B, N, K)
        elbo = torch.where(mask, q.marginals * log_emit, 0.0).sum((1, 2)) - kl_divergence(q, model.prior())
        log_px = model.exact_log_marginal(batch)
        exact = model.exact_posterior(batch)
        gap = log_px - elbo  # = KL(q || p(z | x)) per sentence, exactly
        # the reported bound agrees with the exact ELBO (256 draws: its Monte Carlo error ~0.05 nats)
        sampled = ELBO(samples=256, estimator={"type": "score_function", "baseline": "leave_one_out"})(
            model, posterior, batch).bound
        marg_err = (torch.where(mask, q.marginals - exact.marginals, 0.0)).abs().max()
    assert float(gap.min()) > -1e-4
    assert float(gap.mean()) < 0.5, f"ELBO {float(gap.mean()):.3f} nats per sentence below log p(x)"
    assert float((sampled - elbo).mean().abs()) < 0.15
    assert float(marg_err) < 0.25


# ---- through the command line --------------------------------------------------------------


def test_m7_trains_tags_and_evaluates_from_the_command_line(tmp_path, tagged_sample):
    cfg = tmp_path / "m7.yaml"
    cfg.write_text(f"""
data: {{name: pos, format: tagged, files: {{train: {tagged_sample}, valid: {tagged_sample}}}}}
model: {{type: lstm_tag_chain, num_states: 4, dim: 16, hidden_dim: 16}}
posterior: {{type: crf_bilstm, embed_dim: 16, hidden_dim: 16}}
objective: {{type: elbo, samples: 2, estimator: {{type: score_function, baseline: self_critic}}, kl: analytic}}
train: {{epochs: 1, batch_size: 20, lr: 0.01, checkpoint_every: 1000, num_threads: 1}}
""")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "latentlm.cli.main", *map(str, args)], capture_output=True,
                              text=True, timeout=300)

    run = tmp_path / "run"
    proc = cli("train", cfg, "--out", run, "--quiet")
    assert proc.returncode == 0, proc.stderr
    proc = cli("tag", run, "--json")
    assert proc.returncode == 0, proc.stderr
    tags = json.loads(proc.stdout)
    assert tags["sentences"] == 40 and 0 < tags["many_to_one"] <= 1
    proc = cli("evaluate", run, "--split", "valid", "--samples", "10", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert math.isfinite(result["nll"]) and -result["nll"] >= result["elbo"] - 5.0

