"""The reference semiring recursion: against brute force, and the fast kernels against it."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import chisquare
from test_chain_dp import brute, enumerate_paths, random_chain

from latentlm.structured import (
    LinearChainCRF,
    ReferenceChain,
    chain_entropy,
    chain_log_partition,
    chain_marginals,
    chain_sample,
    chain_score,
    chain_viterbi,
    crf_entropy,
    crf_marginals,
    hmm_entropy,
    hmm_log_likelihood,
    hmm_marginals,
    hmm_sample,
    hmm_viterbi,
)
from latentlm.structured import _engine

D = torch.float64
SIZES = dict(B=st.integers(1, 4), T=st.integers(0, 5), K=st.integers(1, 4), per_step=st.booleans(),
             init=st.booleans(), scale=st.sampled_from([0.1, 1.0, 10.0]), seed=st.integers(0, 10_000))


def stack(ref, key):
    return torch.stack([r[key] for r in ref])


# ---- the reference against enumeration -------------------------------------------------


@settings(max_examples=30, deadline=None)
@given(**SIZES)
def test_reference_matches_enumeration(B, T, K, per_step, init, scale, seed):
    ini, trans, unary, lengths = random_chain(B, T, K, per_step=per_step, init=init, seed=seed, scale=scale)
    ref = brute(ini, trans, unary, lengths)
    chain = ReferenceChain(ini, trans, unary, lengths)
    torch.testing.assert_close(chain.log_partition(), stack(ref, "log_z"))
    uni, pair = chain.marginals(pairwise=True)
    torch.testing.assert_close(uni, stack(ref, "uni").reshape(B, T, K))
    torch.testing.assert_close(pair, stack(ref, "pair").reshape(B, max(T - 1, 0), K, K))
    torch.testing.assert_close(chain.entropy(), stack(ref, "ent"))
    path, score = chain.viterbi()
    torch.testing.assert_close(score, stack(ref, "max"))
    torch.testing.assert_close(chain.max(), stack(ref, "max"))
    torch.testing.assert_close(chain_score(ini, trans, unary, path, lengths), score)  # the path attains it
    assert ((path == -1) == (torch.arange(T)[None, :] >= lengths[:, None])).all()
    # KL to a second chain of the same structure (another seed), including a (B, K) init
    ini2, trans2, unary2, _ = random_chain(B, T, K, per_step=per_step, init=init, seed=seed + 1, scale=scale)
    if ini2 is not None:
        ini2 = ini2 + torch.randn(B, K, dtype=D, generator=torch.Generator().manual_seed(seed))
    kl = chain.kl(ReferenceChain(ini2, trans2, unary2, lengths))
    want = []
    for b in range(B):
        L = int(lengths[b])
        _, sp = enumerate_paths(ini, trans, unary, b, L)
        _, sq = enumerate_paths(ini2, trans2, unary2, b, L)
        lp, lq = sp.log_softmax(0), sq.log_softmax(0)
        want.append((lp.exp() * (lp - lq)).sum())
    torch.testing.assert_close(kl, torch.stack(want))


def test_reference_samples_follow_the_posterior_chi_square():
    init, trans, unary, _ = random_chain(2, 3, 3, per_step=True, seed=7)
    lengths = torch.tensor([3, 2])
    ref = brute(init, trans, unary, lengths)
    n = 4000
    z = ReferenceChain(init, trans, unary, lengths).sample(n, generator=torch.Generator().manual_seed(0))
    assert z.shape == (n, 2, 3) and (z[:, 1, 2] == -1).all()
    K = 3
    for b, r in enumerate(ref):
        L = int(lengths[b])
        code = torch.tensor([K ** (L - 1 - t) for t in range(L)])
        observed = torch.bincount((z[:, b, :L] * code).sum(-1), minlength=K**L).double()
        expected = torch.zeros(K**L, dtype=D)
        expected[(r["paths"] * code).sum(-1)] = r["p"] * n
        assert chisquare(observed.numpy(), expected.numpy()).pvalue > 1e-3


def test_reference_is_nan_free_with_impossible_transitions():
    """-inf scores: exact values, and gradients without NaN (also for an impossible row)."""
    K, T = 3, 4
    init = torch.tensor([0.0, -torch.inf, 1.0], dtype=D)
    trans = torch.tensor([[0.0, -torch.inf, 0.5], [-torch.inf, 0.0, -torch.inf], [0.2, -torch.inf, 0.0]], dtype=D)
    unary = torch.randn(3, T, K, dtype=D, generator=torch.Generator().manual_seed(0))
    unary[2, 1] = -torch.inf  # row 2 is impossible
    lengths = torch.tensor([4, 3, 4])
    ref = brute(init, trans, unary, lengths)
    u = unary.clone().requires_grad_()
    chain = ReferenceChain(init, trans, u, lengths)
    log_z = chain.log_partition()
    torch.testing.assert_close(log_z, stack(ref, "log_z"))
    torch.testing.assert_close(chain.entropy()[:2], stack(ref[:2], "ent"))
    (g,) = torch.autograd.grad(log_z[:2].sum() + chain.entropy()[:2].sum(), u)
    assert torch.isfinite(g).all()


# ---- the fast kernels against the reference ---------------------------------------------


@settings(max_examples=30, deadline=None)
@given(**SIZES)
def test_fast_kernels_match_reference(B, T, K, per_step, init, scale, seed):
    ini, trans, unary, lengths = random_chain(B, T, K, per_step=per_step, init=init, seed=seed, scale=scale)
    chain = ReferenceChain(ini, trans, unary, lengths)
    want_z = chain.log_partition()
    for method in ("auto", "log"):
        torch.testing.assert_close(chain_log_partition(ini, trans, unary, lengths, method=method), want_z)
    uni, pair = chain_marginals(ini, trans, unary, lengths, pairwise=True)
    want_uni, want_pair = chain.marginals(pairwise=True, create_graph=False)
    torch.testing.assert_close(uni, want_uni)
    torch.testing.assert_close(pair, want_pair)
    path, score = chain_viterbi(ini, trans, unary, lengths)
    torch.testing.assert_close(score, chain.max())
    torch.testing.assert_close(chain_score(ini, trans, unary, path, lengths), score)
    torch.testing.assert_close(chain_entropy(ini, trans, unary, lengths), chain.entropy())
    # gradients of log Z w.r.t. every input, weighted per row
    args = [x.clone().requires_grad_() for x in (ini, trans, unary) if x is not None]
    w = torch.randn(B, dtype=D, generator=torch.Generator().manual_seed(seed))

    def split(a):
        return (a[0], a[1], a[2]) if ini is not None else (None, a[0], a[1])

    got = torch.autograd.grad((chain_log_partition(*split(args), lengths) * w).sum(), args, materialize_grads=True)
    want = torch.autograd.grad((ReferenceChain(*split(args), lengths).log_partition() * w).sum(), args,
                               materialize_grads=True)
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)


@settings(max_examples=20, deadline=None)
@given(B=st.integers(1, 3), T=st.integers(1, 6), K=st.integers(1, 5), seed=st.integers(0, 10_000))
def test_hmm_and_crf_spellings_match_reference(B, T, K, seed):
    g = torch.Generator().manual_seed(seed)
    log_init = torch.randn(K, generator=g, dtype=D).log_softmax(-1)
    log_trans = torch.randn(K, K, generator=g, dtype=D).log_softmax(-1)
    log_emit = torch.randn(B, T, K, generator=g, dtype=D).log_softmax(-1)
    lengths = torch.randint(0, T + 1, (B,), generator=g)
    hmm = ReferenceChain(log_init, log_trans, log_emit, lengths)
    torch.testing.assert_close(hmm_log_likelihood(log_init, log_trans, log_emit, lengths), hmm.log_partition())
    uni, pair = hmm_marginals(log_init, log_trans, log_emit, lengths, pairwise=True)
    want_uni, want_pair = hmm.marginals(pairwise=True, create_graph=False)
    torch.testing.assert_close(uni, want_uni)
    torch.testing.assert_close(pair, want_pair)
    torch.testing.assert_close(hmm_viterbi(log_init, log_trans, log_emit, lengths)[1], hmm.max())
    torch.testing.assert_close(hmm_entropy(log_init, log_trans, log_emit, lengths), hmm.entropy())
    pot = torch.randn(B, T - 1, K, K, generator=g, dtype=D)
    crf = LinearChainCRF(pot, log_emit, lengths)
    ref = ReferenceChain(None, pot, log_emit, lengths)
    torch.testing.assert_close(crf.partition, ref.log_partition())
    torch.testing.assert_close(crf.marginals, ref.marginals(create_graph=False))
    torch.testing.assert_close(crf.edge_marginals(), ref.marginals(pairwise=True, create_graph=False)[1])
    torch.testing.assert_close(crf.entropy(), ref.entropy())
    torch.testing.assert_close(crf.log_prob(crf.argmax), ref.max() - ref.log_partition())


def test_fast_samplers_match_reference_marginals():
    """Empirical state frequencies of FFBS samples (fast and reference) vs exact marginals."""
    init, trans, unary, _ = random_chain(3, 6, 4, per_step=False, seed=31)
    lengths = torch.tensor([6, 4, 1])
    chain = ReferenceChain(init, trans, unary, lengths)
    want = chain.marginals(create_graph=False)
    n = 4000
    mask = (torch.arange(6)[None, :] < lengths[:, None])[..., None]
    for z in (hmm_sample(init, trans, unary, lengths, n, generator=torch.Generator().manual_seed(1)),
              chain.sample(n, generator=torch.Generator().manual_seed(2))):
        freq = torch.nn.functional.one_hot(z.clamp_min(0), 4).double().mean(0) * mask
        assert (z[:, ~mask[..., 0]] == -1).all()
        # binomial standard error <= 0.5 / sqrt(n) = 0.008; 5 sigma
        torch.testing.assert_close(freq, want, atol=0.04, rtol=0)
    crf_z = LinearChainCRF(trans.expand(3, 5, 4, 4), unary, lengths, init=init).sample((n,))
    freq = torch.nn.functional.one_hot(crf_z.clamp_min(0), 4).double().mean(0) * mask
    torch.testing.assert_close(freq, want, atol=0.04, rtol=0)
    assert chain_sample(init, trans, unary, lengths).shape == (1, 3, 6)


# ---- higher derivatives (structured VI) ---------------------------------------------------


def small_crf(seed=3, B=2, T=3, K=2):
    g = torch.Generator().manual_seed(seed)
    pot = torch.randn(B, T - 1, K, K, generator=g, dtype=D, requires_grad=True)
    unary = torch.randn(B, T, K, generator=g, dtype=D, requires_grad=True)
    lengths = torch.tensor([T] + [T - 1] * (B - 1))
    return pot, unary, lengths


def test_crf_marginals_and_entropy_are_twice_differentiable():
    pot, unary, lengths = small_crf()

    def marginals(p, u):
        return LinearChainCRF(p, u, lengths).marginals

    def edge_marginals(p, u):
        return crf_marginals(p, u, lengths, pairwise=True)[1]

    def entropy(p, u):
        return crf_entropy(p, u, lengths)

    def log_z(p, u):
        return LinearChainCRF(p, u, lengths).partition

    for f in (marginals, edge_marginals, entropy, log_z):
        assert torch.autograd.gradcheck(f, (pot, unary))
        assert torch.autograd.gradgradcheck(f, (pot, unary))


def test_gradient_through_crf_marginals_matches_reference():
    """d/dθ E_q[score_φ] = d/dθ <marginals_θ, φ>: through the marginals, equal to the reference's."""
    pot, unary, lengths = small_crf(B=3, T=4, K=3)
    phi_u = torch.randn_like(unary)
    phi_p = torch.randn_like(pot)

    def expected_score(uni, pair):
        return (uni * phi_u).sum() + (pair * phi_p).sum()

    crf = LinearChainCRF(pot, unary, lengths)
    got = torch.autograd.grad(expected_score(crf.marginals, crf.edge_marginals()), (pot, unary))
    ref = ReferenceChain(None, pot, unary, lengths)
    want = torch.autograd.grad(expected_score(*ref.marginals(pairwise=True)), (pot, unary))
    for x, y in zip(got, want):
        torch.testing.assert_close(x, y)
    # the same through the hand-written path's create_graph fallback
    (g_u,) = torch.autograd.grad(crf.partition.sum(), unary, create_graph=True)
    torch.testing.assert_close(g_u, crf.marginals)
    (h,) = torch.autograd.grad((g_u * phi_u).sum(), pot)
    (h_ref,) = torch.autograd.grad((ref.marginals() * phi_u).sum(), pot)
    torch.testing.assert_close(h, h_ref)


def test_marginals_without_grad_stay_graph_free():
    pot, unary, lengths = small_crf()
    with torch.no_grad():
        m = crf_marginals(pot, unary, lengths)
    assert not m.requires_grad
    m = crf_marginals(pot.detach(), unary.detach(), lengths)
    assert not m.requires_grad


# ---- the exact log-space fallback ---------------------------------------------------------


def underflowing_chain(per_step: bool):
    """Likely states at t - 1 reach the states unary_t allows only through a ~e^-800 edge."""
    K, T, B = 3, 5, 3
    g = torch.Generator().manual_seed(5)
    trans = torch.randn(K, K, generator=g, dtype=D)
    trans[0, 2] = trans[1, 2] = -800.0  # into state 2 only from state 2 is likely
    unary = torch.randn(B, T, K, generator=g, dtype=D)
    unary[:, 0] = torch.tensor([0.0, 0.0, -900.0], dtype=D)  # start away from state 2
    unary[:2, 2] = torch.tensor([-900.0, -900.0, 0.0], dtype=D)  # rows 0, 1 must be in state 2 at t = 2
    init = torch.randn(K, generator=g, dtype=D)
    if per_step:
        trans = trans.expand(B, T - 1, K, K).clone() + 0.1 * torch.randn(B, T - 1, K, K, generator=g, dtype=D)
    return init, trans, unary, torch.tensor([5, 4, 5])


@pytest.mark.parametrize("per_step", [False, True])
def test_log_space_fallback_transition_gradient_matches_reference(per_step):
    init, trans, unary, lengths = underflowing_chain(per_step)
    tables = _engine.scaled_forward(init, trans, unary, lengths)
    assert tables.bad.tolist() == [True, True, False]  # the inputs force the fallback on rows 0, 1
    args = [x.clone().requires_grad_() for x in (init, trans, unary)]
    w = torch.tensor([1.0, -0.7, 0.3], dtype=D)
    got = torch.autograd.grad((chain_log_partition(*args, lengths) * w).sum(), args)
    want = torch.autograd.grad((ReferenceChain(*args, lengths).log_partition() * w).sum(), args)
    for x, y in zip(got, want):
        assert torch.isfinite(x).all()
        torch.testing.assert_close(x, y)
    assert got[1].abs().sum() > 0


def test_unary_gradient_is_the_alpha_table_without_a_copy(monkeypatch):
    """The backward pass overwrites the alpha table with the marginals and autograd adopts it
    as ``.grad`` as is (same storage): no second (B, T, K) tensor at the memory peak."""
    init, trans, unary, lengths = random_chain(4, 7, 5, seed=2)
    seen = []
    original = _engine.scaled_backward

    def spy(tables, *args, **kwargs):
        seen.append(tables.alpha.data_ptr())
        return original(tables, *args, **kwargs)

    monkeypatch.setattr(_engine, "scaled_backward", spy)
    u = unary.clone().requires_grad_()
    t = trans.clone().requires_grad_()
    chain_log_partition(init, t, u, lengths).sum().backward()
    assert seen and u.grad.data_ptr() == seen[0]
    torch.testing.assert_close(u.grad, ReferenceChain(init, trans, unary, lengths).marginals(create_graph=False))
