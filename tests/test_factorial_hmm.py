"""M8: the factorial HMM — exact product-space inference against enumeration, structured mean
field (a bound, monotone coordinate ascent, exact for one chain), the amortized variant, and
training through ``latentlm train``."""

import itertools
import json
import math

import pytest
import torch

from latentlm.config import load_config
from latentlm.data.batching import Batch
from latentlm.errors import ConfigError
from latentlm.inference.mean_field import (FactorialChains, chain_bound, coordinate_ascent_bound, emission_bound,
                                           structured_mean_field)
from latentlm.models.factorial_hmm import FactorialHMM, tokens_of
from latentlm.system import build_system
from latentlm.training import train

V = 9
SENTENCES = [[4, 5, 6], [7], [3, 8, 4, 4], []]  # ragged, with an empty sentence (just </s>)


def make_batch(sentences=SENTENCES) -> Batch:
    T = max(len(s) for s in sentences) + 1
    tokens = torch.zeros(len(sentences), T + 1, dtype=torch.long)
    for i, s in enumerate(sentences):
        tokens[i, 0] = 1
        tokens[i, 1 : 1 + len(s)] = torch.tensor(s, dtype=torch.long)
        tokens[i, 1 + len(s)] = 2
    return Batch(tokens, torch.tensor([len(s) + 1 for s in sentences]), torch.arange(len(sentences)))


def model_of(L: int, K: int = 2, seed: int = 0, scale: float = 1.5) -> FactorialHMM:
    return FactorialHMM(V, num_chains=L, num_states=K, dim=5, init_scale=scale, seed=seed).double()


def brute_force_log_px(model: FactorialHMM, batch: Batch) -> torch.Tensor:
    """log sum_z p(z) p(x | z) by listing every joint path of every sentence."""
    out = []
    for i in range(batch.size):
        T = int(batch.lengths[i])
        one = Batch(batch.tokens[i : i + 1, : T + 1], batch.lengths[i : i + 1], batch.index[i : i + 1])
        z = torch.tensor(list(itertools.product(range(model.num_states), repeat=T * model.num_chains)))
        z = z.view(-1, 1, T, model.num_chains)
        out.append(torch.logsumexp(model.log_likelihood(one, z)[:, 0] + model.prior().log_prob(z)[:, 0], 0))
    return torch.stack(out)


@pytest.mark.parametrize("L,K", [(1, 3), (2, 2), (3, 2)])
def test_exact_product_chain_matches_enumeration(L, K):
    model, batch = model_of(L, K, seed=L), make_batch()
    exact = model.log_marginal(batch)
    assert torch.allclose(exact, brute_force_log_px(model, batch), atol=1e-9)
    exact.sum().backward()  # differentiable: the `exact` objective can train small models
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


@pytest.mark.parametrize("L", [2, 3])
def test_mean_field_is_a_bound_and_coordinate_ascent_never_decreases_it(L):
    model, batch = model_of(L, seed=10 + L), make_batch()
    trace: list[torch.Tensor] = []
    u, mu = structured_mean_field(model, batch, iterations=4, trace=trace)
    F = torch.stack(trace)  # (1 + iterations * L, B)
    assert ((F[1:] - F[:-1]) >= -1e-10).all(), (F[1:] - F[:-1]).min()
    exact = model.log_marginal(batch).detach()
    assert (F[-1] <= exact + 1e-10).all()
    assert (exact - F[-1] > 1e-4).any()  # with coupled chains the bound is not tight
    # the same q through the general chain-CRF formula (entropy + cross terms) gives the same F
    log_init, log_trans = model.chain_log_probs()
    q = FactorialChains(log_init.detach(), log_trans.detach(), u, batch.lengths)
    assert torch.allclose(chain_bound(model, batch, q), F[-1], atol=1e-9)
    assert torch.allclose(q.marginals, mu, atol=1e-9)


def test_one_chain_mean_field_is_exact_inference():
    model, batch = model_of(1, K=3, seed=3), make_batch()
    trace: list[torch.Tensor] = []
    u, _ = structured_mean_field(model, batch, iterations=1, trace=trace)
    assert torch.allclose(trace[-1], model.log_marginal(batch).detach(), atol=1e-9)


def test_emission_bound_is_below_the_exact_expected_log_likelihood():
    """For any product of per-position marginals, the bound <= E_q sum_t log p(x_t | z_t)
    (computed by listing the K^L joint states), with equality for one chain."""
    batch = make_batch()
    x, n = tokens_of(batch)
    for L in (1, 2, 3):
        model = model_of(L, K=2, seed=20 + L)
        theta, bias = model.emission_parts()
        g = torch.Generator().manual_seed(L)
        mu = torch.softmax(2 * torch.randn(*x.shape, L, 2, generator=g, dtype=torch.float64), -1)
        d = model.product_digits()
        logits = theta[torch.arange(L), d].sum(1) + bias  # (P, V)
        log_emit = torch.log_softmax(logits, -1).t()[x]  # (B, T, P)
        weight = mu[:, :, torch.arange(L), d].prod(-1)  # (B, T, P)
        mask = torch.arange(x.size(1))[None] < n[:, None]
        exact = torch.where(mask, (weight * log_emit).sum(-1), 0.0).sum(-1)
        bound = emission_bound(theta, bias, x, mu, n)
        if L == 1:
            assert torch.allclose(bound, exact, atol=1e-9)
        else:
            assert (bound <= exact + 1e-10).all() and (bound < exact - 1e-6).any()


def test_amortized_posterior_bound_gradients_and_samples():
    model, batch = model_of(2, seed=5), make_batch()
    from latentlm.inference.mean_field import FactorialChainPosterior

    post = FactorialChainPosterior(V, latent_dim=4, num_states=2, embed_dim=8, hidden_dim=8).double()
    q = post(batch)
    F = chain_bound(model, batch, q)
    assert (F <= model.log_marginal(batch).detach() + 1e-10).all()
    F.sum().backward()
    for p in list(model.parameters()) + list(post.parameters()):
        assert p.grad is not None and torch.isfinite(p.grad).all()
    z = q.sample((3,))  # (S, B, T, L), -1 on padding
    assert z.shape == (3, batch.size, int(batch.lengths.max()), 2)
    assert ((z >= 0) == (torch.arange(z.size(2))[None, None, :, None] < batch.lengths[None, :, None, None])).all()
    # log q(z) of a sample matches enumeration's normalization on a one-sentence batch
    one = make_batch([[4, 5]])
    q1 = post(one)
    paths = torch.tensor(list(itertools.product(range(2), repeat=3 * 2))).view(-1, 1, 3, 2)
    assert torch.allclose(q1.log_prob(paths).exp().sum(), torch.tensor(1.0, dtype=torch.float64), atol=1e-9)


def test_exact_inference_refuses_large_product_spaces_and_objectives_check_the_model():
    model = FactorialHMM(V, num_chains=7, num_states=4, max_exact_states=4096)
    assert not model.has_exact_marginal
    with pytest.raises(ValueError, match="mean_field"):
        model.log_marginal(make_batch())
    config = load_config(None, ["model.type=hmm", "model.num_states=3", "objective.type=mean_field"])
    with pytest.raises(ConfigError, match="factorial"):
        build_system(config, V)


@pytest.mark.parametrize("objective", ["mean_field", "amortized_mean_field"])
def test_trains_with_latentlm_train_and_evaluates(tiny_corpus, tmp_path, objective):
    overrides = [f"data.data_dir={tiny_corpus}", "data.name=tiny", "model.num_chains=2", "model.num_states=3",
                 "model.dim=16", "train.epochs=3", "train.batch_size=20", "train.lr=0.05", "train.max_minutes=null",
                 "train.num_threads=1", "eval.batch_size=30", "eval.samples=20"]
    config_file = "configs/ptb/factorial_hmm.yaml" if objective == "mean_field" else "configs/ptb/factorial_hmm_amortized.yaml"
    if objective == "amortized_mean_field":
        overrides += ["posterior.num_states=3", "posterior.embed_dim=8", "posterior.hidden_dim=8"]
    config = load_config(config_file, overrides)
    out = tmp_path / objective
    train(config, out, progress=False)
    rows = (out / "metrics.csv").read_text().splitlines()
    header = rows[0].split(",")
    valid = [dict(zip(header, r.split(","))) for r in rows[1:] if "valid" in r]
    nll = [float(r["nll"]) for r in valid]
    assert len(nll) >= 2 and nll[-1] < nll[0]  # the bound on validation improves
    from latentlm.evaluation import evaluate
    from latentlm.system import load_pretrained
    from latentlm.training import load_corpus

    system, cfg, vocab = load_pretrained(out)
    _, data = load_corpus(cfg, vocab, splits=("valid",))
    result = evaluate(system, data["valid"], samples=20, batch_size=30)
    assert result["samples"] == 0  # 9 product states: exact log p(x)
    assert result["nll"] <= nll[-1] + 1e-3  # exact NLL below the bound's (same weights up to best-model choice)
    json.dumps(result)
    if objective == "mean_field":
        # Too large to enumerate: evaluate falls back to importance sampling with the mean-field q
        system.model.max_exact_states = 1
        sampled = evaluate(system, data["valid"], samples=200, batch_size=30)
        assert sampled["samples"] == 200 and math.isfinite(sampled["nll"]) and math.isfinite(sampled["kl"])
        assert sampled["nll"] > result["nll"] - 0.5  # IS-200 estimates log p(x) from below (NLL from above)


def test_importance_sampling_with_the_amortized_q_when_exact_is_refused():
    """Beyond max_exact_states evaluation falls back to importance sampling with q as proposal:
    the prior scores q's samples (padding included) and the estimate approaches log p(x)."""
    from latentlm.evaluation.likelihood import importance_sampled_log_marginal
    from latentlm.inference.mean_field import FactorialChainPosterior

    torch.manual_seed(0)
    model, batch = model_of(2, seed=7, scale=0.5), make_batch()
    exact = model.log_marginal(batch).detach()
    model.max_exact_states = 1
    assert not model.has_exact_marginal
    post = FactorialChainPosterior(V, latent_dim=4, num_states=2, embed_dim=8, hidden_dim=8).double()
    with torch.no_grad():
        est = importance_sampled_log_marginal(model, post, batch, samples=2000)
        F = chain_bound(model, batch, post(batch))
    assert torch.isfinite(est).all()
    assert (F <= est + 1e-6).all()  # IS with many samples sits above the single-q bound
    assert ((exact - est).abs() < 0.2).all()  # an untrained q: IS-2000 is within 0.06 nats here
