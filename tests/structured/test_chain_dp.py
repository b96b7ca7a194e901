"""Chain dynamic programs against brute-force enumeration of all K^T paths."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare

from latentlm.structured import (
    LinearChainCRF,
    chain_entropy,
    chain_log_partition,
    chain_marginals,
    chain_sample,
    chain_score,
    chain_viterbi,
    crf_log_partition,
    hmm_log_likelihood,
    hmm_marginals,
    hmm_viterbi,
)

D = torch.float64


def random_chain(B, T, K, per_step=False, init=True, seed=0, scale=1.0, dtype=D):
    g = torch.Generator().manual_seed(seed)
    ini = (scale * torch.randn(K, generator=g, dtype=dtype)) if init else None
    if per_step:
        trans = scale * torch.randn(B, max(T - 1, 0), K, K, generator=g, dtype=dtype)
    else:
        trans = scale * torch.randn(K, K, generator=g, dtype=dtype)
    unary = scale * torch.randn(B, T, K, generator=g, dtype=dtype)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    lengths[0] = T
    return ini, trans, unary, lengths


def enumerate_paths(init, trans, unary, b, L):
    """All K^L paths of row b and their scores, computed independently of the library."""
    K = unary.size(-1)
    if L == 0:
        return torch.zeros(1, 0, dtype=torch.long), torch.zeros(1, dtype=unary.dtype)
    paths = torch.tensor(list(itertools.product(range(K), repeat=L)), dtype=torch.long)  # (N, L)
    score = unary[b, torch.arange(L)[None, :], paths].sum(1)
    if init is not None:
        score = score + (init if init.dim() == 1 else init[b])[paths[:, 0]]
    for t in range(1, L):
        tr = trans if trans.dim() == 2 else trans[b, t - 1]
        score = score + tr[paths[:, t - 1], paths[:, t]]
    return paths, score


def brute(init, trans, unary, lengths):
    B, T, K = unary.shape
    out = []
    for b in range(B):
        L = int(lengths[b])
        paths, score = enumerate_paths(init, trans, unary, b, L)
        log_z = torch.logsumexp(score, 0)
        p = torch.exp(score - log_z)
        uni = torch.zeros(T, K, dtype=unary.dtype)
        pair = torch.zeros(max(T - 1, 0), K, K, dtype=unary.dtype)
        for t in range(L):
            uni[t].index_add_(0, paths[:, t], p)
        for t in range(1, L):
            pair[t - 1].view(-1).index_add_(0, paths[:, t - 1] * K + paths[:, t], p)
        nz = p > 0
        ent = -(p[nz] * torch.log(p[nz])).sum() if L else torch.zeros((), dtype=unary.dtype)
        best = int(score.argmax())
        out.append(dict(log_z=log_z if L else torch.zeros((), dtype=unary.dtype), uni=uni, pair=pair,
                        ent=ent, max=score.max() if L else torch.zeros((), dtype=unary.dtype),
                        best=paths[best], paths=paths, p=p))
    return out


@pytest.mark.parametrize("per_step", [False, True])
@pytest.mark.parametrize("method", ["auto", "log"])
def test_log_partition_marginals_viterbi_entropy_match_enumeration(per_step, method):
    init, trans, unary, lengths = random_chain(5, 4, 3, per_step=per_step, seed=1)
    ref = brute(init, trans, unary, lengths)
    log_z = chain_log_partition(init, trans, unary, lengths, method=method)
    torch.testing.assert_close(log_z, torch.stack([r["log_z"] for r in ref]))
    uni, pair = chain_marginals(init, trans, unary, lengths, pairwise=True)
    torch.testing.assert_close(uni, torch.stack([r["uni"] for r in ref]))
    torch.testing.assert_close(pair, torch.stack([r["pair"] for r in ref]))
    path, score = chain_viterbi(init, trans, unary, lengths)
    torch.testing.assert_close(score, torch.stack([r["max"] for r in ref]))
    for b, r in enumerate(ref):
        L = int(lengths[b])
        assert path[b, :L].tolist() == r["best"].tolist()
        assert (path[b, L:] == -1).all()
    torch.testing.assert_close(chain_score(init, trans, unary, path, lengths), score)
    torch.testing.assert_close(chain_entropy(init, trans, unary, lengths), torch.stack([r["ent"] for r in ref]))


def test_hmm_spelling_matches_generic_chain_and_probabilities_sum_to_one():
    K, T = 3, 3
    g = torch.Generator().manual_seed(3)
    log_init = torch.randn(K, generator=g, dtype=D).log_softmax(-1)
    log_trans = torch.randn(K, K, generator=g, dtype=D).log_softmax(-1)
    log_b = torch.randn(K, 2, generator=g, dtype=D).log_softmax(-1)  # 2-word vocabulary
    # sum over all 2^T observation sequences of p(x) is 1
    xs = torch.tensor(list(itertools.product(range(2), repeat=T)))  # (8, T)
    log_emit = log_b.t()[xs]  # (8, T, K)
    ll = hmm_log_likelihood(log_init, log_trans, log_emit)
    torch.testing.assert_close(ll.exp().sum(), torch.tensor(1.0, dtype=D))
    m = hmm_marginals(log_init, log_trans, log_emit)
    torch.testing.assert_close(m.sum(-1), torch.ones(8, T, dtype=D))
    assert hmm_viterbi(log_init, log_trans, log_emit)[0].shape == (8, T)


def test_crf_distribution_interface():
    _, pot, unary, lengths = random_chain(4, 4, 3, per_step=True, init=False, seed=5)
    crf = LinearChainCRF(pot, unary, lengths)
    ref = brute(None, pot, unary, lengths)
    torch.testing.assert_close(crf.partition, torch.stack([r["log_z"] for r in ref]))
    torch.testing.assert_close(crf.partition, crf_log_partition(pot, unary, lengths))
    torch.testing.assert_close(crf.marginals, torch.stack([r["uni"] for r in ref]))
    torch.testing.assert_close(crf.edge_marginals(), torch.stack([r["pair"] for r in ref]))
    torch.testing.assert_close(crf.entropy(), torch.stack([r["ent"] for r in ref]))
    best = crf.argmax
    torch.testing.assert_close(crf.log_prob(best), torch.stack([r["max"] - r["log_z"] for r in ref]))
    assert crf.sample((7,)).shape == (7, 4, 4)
    assert crf.sample().shape == (4, 4)


def test_samples_follow_the_posterior_chi_square():
    init, trans, unary, lengths = random_chain(2, 3, 3, seed=7)
    lengths = torch.tensor([3, 2])
    ref = brute(init, trans, unary, lengths)
    n = 20000
    z = chain_sample(init, trans, unary, lengths, num_samples=n, generator=torch.Generator().manual_seed(0))
    assert z.shape == (n, 2, 3)
    assert (z[:, 1, 2] == -1).all()
    for b, r in enumerate(ref):
        L = int(lengths[b])
        K = 3
        codes = (z[:, b, :L] * torch.tensor([K ** (L - 1 - t) for t in range(L)])).sum(-1)
        observed = torch.bincount(codes, minlength=K ** L).double()
        path_codes = (r["paths"] * torch.tensor([K ** (L - 1 - t) for t in range(L)])).sum(-1)
        expected = torch.zeros(K ** L, dtype=D)
        expected[path_codes] = r["p"] * n
        assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3


def test_extreme_parameters_fall_back_to_exact_log_space():
    """-inf transitions, huge gaps, and an emission the likely states cannot reach."""
    K, T = 3, 5
    init = torch.tensor([0.0, -900.0, -torch.inf], dtype=D)
    trans = torch.tensor(
        [[0.0, -700.0, -torch.inf], [-torch.inf, 0.0, -800.0], [-torch.inf, -torch.inf, 0.0]], dtype=D
    )
    unary = torch.randn(3, T, K, dtype=D, generator=torch.Generator().manual_seed(0))
    unary[0, 3] = torch.tensor([-torch.inf, -torch.inf, 0.0])  # only state 2 may emit x_3
    unary[1] = unary[1] - 1000.0
    unary[2, 1] = -torch.inf  # impossible sentence: log Z = -inf
    lengths = torch.tensor([T, T, T])
    ref = brute(init, trans, unary, lengths)
    for method in ("auto", "log"):
        log_z = chain_log_partition(init, trans, unary, lengths, method=method)
        torch.testing.assert_close(log_z, torch.stack([r["log_z"] for r in ref]))
    assert log_z[2] == -torch.inf and torch.isfinite(log_z[:2]).all()
    uni = chain_marginals(init, trans, unary, lengths)
    torch.testing.assert_close(uni[:2], torch.stack([r["uni"] for r in ref[:2]]))
    assert (uni[2] == 0).all()  # no NaN for the impossible row
    torch.testing.assert_close(chain_entropy(init, trans, unary, lengths)[:2], torch.stack([r["ent"] for r in ref[:2]]))
    _, score = chain_viterbi(init, trans, unary, lengths)
    torch.testing.assert_close(score[:2], torch.stack([r["max"] for r in ref[:2]]))
    # float32 gives the same answer through the log-space fallback
    log_z32 = chain_log_partition(init.float(), trans.float(), unary.float(), lengths)
    torch.testing.assert_close(log_z32[:2], log_z[:2].float())


def test_padding_is_never_read():
    init, trans, unary, lengths = random_chain(4, 5, 3, seed=11)
    lengths = torch.tensor([5, 3, 1, 0])
    poisoned = unary.clone()
    for b, L in enumerate(lengths.tolist()):
        poisoned[b, L:] = torch.nan
    a = chain_log_partition(init, trans, unary, lengths)
    b = chain_log_partition(init, trans, poisoned, lengths)
    torch.testing.assert_close(a, b)
    assert b[3] == 0
    p = poisoned.requires_grad_()
    chain_log_partition(init, trans, p, lengths).sum().backward()
    assert torch.isfinite(p.grad).all()


def naive_log_forward(init, trans, unary, lengths):
    """Textbook log-space forward, differentiated by autograd: the gradient reference."""
    B, T, K = unary.shape
    a = unary[:, 0] + (init if init is not None else 0.0)
    for t in range(1, T):
        tr = trans if trans.dim() == 2 else trans[:, t - 1]
        new = torch.logsumexp(a.unsqueeze(-1) + tr, dim=-2) + unary[:, t]
        a = torch.where((t < lengths)[:, None], new, a)
    return torch.where(lengths > 0, torch.logsumexp(a, -1), 0.0)


@pytest.mark.parametrize("per_step", [False, True])
@pytest.mark.parametrize("method", ["auto", "log"])
def test_custom_backward_gradcheck_and_matches_autograd(per_step, method):
    init, trans, unary, lengths = random_chain(3, 4, 3, per_step=per_step, seed=13)
    init2 = init.expand(3, 3).clone()  # per-example init as well
    for ini in (init, init2):
        args = [x.clone().requires_grad_() for x in (ini, trans, unary)]

        def f(i, tr, u):
            return chain_log_partition(i, tr, u, lengths, method=method)

        assert torch.autograd.gradcheck(f, args)
        w = torch.randn(3, dtype=D)
        got = torch.autograd.grad((f(*args) * w).sum(), args)
        want = torch.autograd.grad((naive_log_forward(*args, lengths) * w).sum(), args)
        for x, y in zip(got, want):
            torch.testing.assert_close(x, y)


def test_backward_twice_with_retain_graph():
    init, trans, unary, lengths = random_chain(3, 6, 4, seed=2)
    u = unary.clone().requires_grad_()
    out = chain_log_partition(init, trans, u, lengths).sum()
    g1 = torch.autograd.grad(out, u, retain_graph=True)[0]
    g2 = torch.autograd.grad(out, u)[0]
    torch.testing.assert_close(g1, g2)


def test_entropy_gradient_matches_enumeration():
    init, trans, unary, lengths = random_chain(2, 3, 3, per_step=True, init=False, seed=17)
    lengths = torch.tensor([3, 2])
    u = unary.clone().requires_grad_()
    got = torch.autograd.grad(chain_entropy(None, trans, u, lengths).sum(), u)[0]

    def brute_entropy(uu):
        total = 0
        for b in range(2):
            _, s = enumerate_paths(None, trans, uu, b, int(lengths[b]))
            logp = s - torch.logsumexp(s, 0)
            total = total - (logp.exp() * logp).sum()
        return total

    want = torch.autograd.grad(brute_entropy(u), u)[0]
    torch.testing.assert_close(got, want)


def test_long_chain_float32_is_stable_and_exact():
    """T = 1000: float32 scaled recursion vs float64 log-space reference."""
    B, T, K = 2, 1000, 16
    g = torch.Generator().manual_seed(0)
    log_init = torch.randn(K, generator=g, dtype=D).log_softmax(-1)
    log_trans = (3 * torch.randn(K, K, generator=g, dtype=D)).log_softmax(-1)
    log_emit = (-8 + 3 * torch.randn(B, T, K, generator=g, dtype=D)).clamp_max(0)
    ref = chain_log_partition(log_init, log_trans, log_emit, method="log")
    got = hmm_log_likelihood(log_init.float(), log_trans.float(), log_emit.float())
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=0)
    m = hmm_marginals(log_init.float(), log_trans.float(), log_emit.float())
    torch.testing.assert_close(m.sum(-1), torch.ones(B, T))


@settings(max_examples=25, deadline=None)
@given(
    B=st.integers(1, 3), T=st.integers(1, 4), K=st.integers(1, 3), per_step=st.booleans(),
    scale=st.sampled_from([0.1, 1.0, 30.0]), seed=st.integers(0, 10_000),
)
def test_property_log_partition_and_marginals(B, T, K, per_step, scale, seed):
    init, trans, unary, lengths = random_chain(B, T, K, per_step=per_step, seed=seed, scale=scale)
    ref = brute(init, trans, unary, lengths)
    torch.testing.assert_close(chain_log_partition(init, trans, unary, lengths), torch.stack([r["log_z"] for r in ref]))
    torch.testing.assert_close(chain_marginals(init, trans, unary, lengths), torch.stack([r["uni"] for r in ref]))


def test_shape_errors_print_shapes():
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        hmm_log_likelihood(torch.zeros(3), torch.zeros(2, 2), torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match="lengths"):
        hmm_log_likelihood(torch.zeros(3), torch.zeros(3, 3), torch.zeros(1, 4, 3), torch.tensor([5]))
    with pytest.raises(ValueError, match="dtype"):
        hmm_log_likelihood(torch.zeros(3, dtype=D), torch.zeros(3, 3), torch.zeros(1, 4, 3))
    with pytest.raises(ValueError, match="method"):
        hmm_log_likelihood(torch.zeros(3), torch.zeros(3, 3), torch.zeros(1, 4, 3), method="fast")


def test_many_time_chunks_and_state_chunks(monkeypatch):
    """Tiny buffers force every chunked code path (time chunks, column chunks)."""
    from latentlm.structured import _engine

    monkeypatch.setattr(_engine, "_CHUNK_ELEMS", 4)
    monkeypatch.setattr(_engine, "_MIN_ROWS", 1)
    for per_step in (False, True):
        init, trans, unary, lengths = random_chain(3, 5, 3, per_step=per_step, seed=23)
        ref = brute(init, trans, unary, lengths)
        for method in ("auto", "log"):
            args = [x.clone().requires_grad_() for x in (init, trans, unary)]
            log_z = chain_log_partition(*args, lengths, method=method)
            torch.testing.assert_close(log_z, torch.stack([r["log_z"] for r in ref]))
            got = torch.autograd.grad(log_z.sum(), args)
            want = torch.autograd.grad(naive_log_forward(*args, lengths).sum(), args)
            for x, y in zip(got, want):
                torch.testing.assert_close(x, y)
        _, score = chain_viterbi(init, trans, unary, lengths)
        torch.testing.assert_close(score, torch.stack([r["max"] for r in ref]))


def test_emission_scores_gather_and_gradient():
    from latentlm.structured import emission_scores

    log_b = torch.randn(3, 7, dtype=D, requires_grad=True)
    words = torch.randint(0, 7, (2, 5))
    assert torch.autograd.gradcheck(lambda m: emission_scores(m, words), (log_b,))
    torch.testing.assert_close(emission_scores(log_b, words), log_b.t()[words])
