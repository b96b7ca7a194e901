"""Semi-Markov DPs (fast kernels and the semiring reference) against brute-force enumeration
of every segmentation, on ragged lengths."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from enumeration import compositions

from latentlm.structured import (
    ReferenceSemiMarkov,
    semimarkov_log_partition,
    semimarkov_marginals,
    semimarkov_position_marginals,
    semimarkov_sample,
    semimarkov_score,
    semimarkov_viterbi,
)




def segmentations(n: int, D: int, K: int):
    """Every segmentation of n positions: a tuple of (start, length, state)."""
    for parts in compositions(n, D):
        starts = [sum(parts[:i]) for i in range(len(parts))]
        for ks in itertools.product(range(K), repeat=len(parts)):
            yield tuple(zip(starts, parts, ks))


def brute(init, trans, seg, n):
    """{segmentation: score} of one row (float64)."""
    out = {}
    for s in segmentations(n, seg.size(1), seg.size(2)):
        score = 0.0 if init is None or not s else float(init[s[0][2]])
        score += sum(float(seg[st, d - 1, k]) for st, d, k in s)
        score += sum(float(trans[a[2], b[2]]) for a, b in zip(s, s[1:]))
        out[s] = score
    return out


def problem(B=4, T=5, D=3, K=2, seed=0, per_row_init=False, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    seg = torch.randn(B, T, D, K, generator=g, dtype=dtype)
    trans = torch.randn(K, K, generator=g, dtype=dtype)
    init = torch.randn(B, K, generator=g, dtype=dtype) if per_row_init else torch.randn(K, generator=g, dtype=dtype)
    lengths = torch.tensor([T, 1, 0, 3, 4, 2][:B])
    return init, trans, seg, lengths


def to_indicators(states, durations, D, K):
    """(B, T) states / durations -> segment indicators (B, T, D, K)."""
    B, T = states.shape
    out = torch.zeros(B, T, D, K, dtype=torch.float64)
    for b in range(B):
        for t in range(T):
            if durations[b, t] > 0:
                out[b, t, durations[b, t] - 1, states[b, t]] = 1
    return out


@pytest.mark.parametrize("per_row_init", [False, True])
@pytest.mark.parametrize("D", [1, 3])
def test_log_partition_and_marginals_match_enumeration(per_row_init, D):
    init, trans, seg, lengths = problem(D=D, per_row_init=per_row_init)
    seg.requires_grad_()
    fast = semimarkov_log_partition(init, trans, seg, lengths)
    ref = ReferenceSemiMarkov(init, trans, seg, lengths).log_partition()
    marg = semimarkov_marginals(init, trans, seg, lengths)
    ref_marg = ReferenceSemiMarkov(init, trans, seg, lengths).marginals()
    for b, n in enumerate(lengths.tolist()):
        row_init = init[b] if per_row_init else init
        scores = brute(row_init, trans, seg[b].detach(), n)
        log_z = torch.logsumexp(torch.tensor(list(scores.values()), dtype=torch.float64), 0) if n else torch.tensor(0.0)
        assert fast[b].item() == pytest.approx(log_z.item(), abs=1e-9)
        assert ref[b].item() == pytest.approx(log_z.item(), abs=1e-9)
        expected = torch.zeros_like(seg[b])
        for s, score in scores.items():
            for st, d, k in s:
                expected[st, d - 1, k] += math.exp(score - log_z.item())
        torch.testing.assert_close(marg[b], expected, atol=1e-9, rtol=0)
        torch.testing.assert_close(ref_marg[b].detach(), expected, atol=1e-9, rtol=0)


def test_gradients_of_all_inputs_match_the_reference():
    init, trans, seg, lengths = problem(B=6, T=7, D=4, K=3, seed=1)
    leaves = [x.clone().requires_grad_() for x in (init, trans, seg)]
    upstream = torch.randn(6, dtype=torch.float64)
    (semimarkov_log_partition(*leaves, lengths) * upstream).sum().backward()
    fast = [x.grad for x in leaves]
    leaves2 = [x.clone().requires_grad_() for x in (init, trans, seg)]
    (ReferenceSemiMarkov(*leaves2, lengths).log_partition() * upstream).sum().backward()
    for a, b in zip(fast, [x.grad for x in leaves2]):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-9)
    assert torch.autograd.gradcheck(lambda s: semimarkov_log_partition(init, trans, s, lengths),
                                    (seg.clone().requires_grad_(),))


def test_float32_and_extreme_transitions_fall_back_to_log_space_exactly():
    init, trans, seg, lengths = problem(B=5, T=6, D=3, K=3, seed=2)
    trans = trans * 60.0  # entries 100+ nats apart: the scaled product underflows
    trans[0, 1] = -torch.inf  # a forbidden transition
    seg[0, 2, 0, 2] = -torch.inf
    want = ReferenceSemiMarkov(init, trans, seg, lengths).log_partition()
    got32 = semimarkov_log_partition(init.float(), trans.float(), seg.float(), lengths)
    torch.testing.assert_close(got32.double(), want, atol=1e-3, rtol=1e-5)
    s = seg.clone().requires_grad_()
    semimarkov_log_partition(init, trans, s, lengths).sum().backward()
    torch.testing.assert_close(s.grad, ReferenceSemiMarkov(init, trans, seg, lengths).marginals().detach(),
                               atol=1e-9, rtol=0)
    assert torch.isfinite(s.grad).all()


def test_viterbi_matches_enumeration_and_its_score():
    init, trans, seg, lengths = problem(B=6, T=6, D=3, K=3, seed=3)
    states, durations, score = semimarkov_viterbi(init, trans, seg, lengths)
    ref_onehot, ref_score = ReferenceSemiMarkov(init, trans, seg, lengths).viterbi()
    for b, n in enumerate(lengths.tolist()):
        scores = brute(init, trans, seg[b], n)
        best = max(scores, key=scores.get) if n else ()
        assert score[b].item() == pytest.approx(scores[best] if n else 0.0, abs=1e-9)
        assert ref_score[b].item() == pytest.approx(score[b].item(), abs=1e-9)
        assert [(t, int(durations[b, t]), int(states[b, t])) for t in range(6) if durations[b, t] > 0] == list(best)
        assert (states[b, n:] == -1).all() and (states[b, :n] >= 0).all()
    torch.testing.assert_close(to_indicators(states, durations, 3, 3), ref_onehot)
    torch.testing.assert_close(semimarkov_score(init, trans, seg, states, durations), score)


def test_samples_follow_the_exact_distribution():
    """χ² of sample frequencies against enumerated probabilities, per row, ragged lengths."""
    init, trans, seg, lengths = problem(B=3, T=4, D=3, K=2, seed=4)
    lengths = torch.tensor([4, 2, 3])
    S = 4000
    g = torch.Generator().manual_seed(0)
    states, durations = semimarkov_sample(init, trans, seg, lengths, num_samples=S, generator=g)
    scores_of = semimarkov_score(init, trans, seg, states, durations)  # (S, B)
    log_z = semimarkov_log_partition(init, trans, seg, lengths)
    for b, n in enumerate(lengths.tolist()):
        scores = brute(init, trans, seg[b], n)
        keys = list(scores)
        log_z_b = math.log(sum(math.exp(v) for v in scores.values()))
        counts = dict.fromkeys(keys, 0)
        for i in range(S):
            key = tuple((t, int(durations[i, b, t]), int(states[i, b, t])) for t in range(n) if durations[i, b, t] > 0)
            counts[key] += 1  # a KeyError here is an impossible segmentation
            assert (states[i, b, n:] == -1).all()
        chi2 = sum((counts[k] - S * math.exp(scores[k] - log_z_b)) ** 2 / (S * math.exp(scores[k] - log_z_b))
                   for k in keys)
        dof = len(keys) - 1
        assert chi2 < dof + 5 * math.sqrt(2 * dof), (b, chi2, dof)
        assert abs(log_z[b].item() - log_z_b) < 1e-9
    assert torch.isfinite(scores_of).all()


def test_reference_samples_are_segmentations_and_entropy_matches_enumeration():
    init, trans, seg, lengths = problem(B=4, T=5, D=2, K=2, seed=5)
    ref = ReferenceSemiMarkov(init, trans, seg, lengths)
    onehot = ref.sample(num_samples=3, generator=torch.Generator().manual_seed(0))  # (3, B, T, D, K)
    lengths_covered = (onehot.sum(-1) * torch.arange(1, 3, dtype=torch.float64)).sum((-1, -2))  # (3, B)
    torch.testing.assert_close(lengths_covered, lengths.double().expand(3, 4))
    H = ref.entropy()
    for b, n in enumerate(lengths.tolist()):
        scores = torch.tensor(list(brute(init, trans, seg[b], n).values()), dtype=torch.float64)
        p = torch.softmax(scores, 0)
        assert H[b].item() == pytest.approx(float(-(p * p.log()).sum()) if n else 0.0, abs=1e-9)


def test_position_marginals_sum_to_one_on_real_positions():
    init, trans, seg, lengths = problem(B=4, T=5, D=3, K=3, seed=6)
    pos = semimarkov_position_marginals(semimarkov_marginals(init, trans, seg, lengths))
    mask = torch.arange(5)[None, :] < lengths[:, None]
    torch.testing.assert_close(pos.sum(-1), mask.double(), atol=1e-9, rtol=0)


def test_padding_is_never_read_and_bad_shapes_are_refused():
    init, trans, seg, lengths = problem(B=4, T=5, D=3, K=2, seed=7)
    noisy = seg.clone()
    for b, n in enumerate(lengths.tolist()):
        noisy[b, n:] = torch.nan
        for d in range(3):
            noisy[b, max(n - d, 0) : n, d] = torch.nan  # segments reaching past the end
    s = noisy.clone().requires_grad_()
    lz = semimarkov_log_partition(init, trans, s, lengths)
    lz.sum().backward()
    torch.testing.assert_close(lz, semimarkov_log_partition(init, trans, seg, lengths))
    assert torch.isfinite(s.grad).all()
    states, _, score = semimarkov_viterbi(init, trans, noisy, lengths)
    assert torch.isfinite(score).all()
    with pytest.raises(ValueError, match="transition scores must be"):
        semimarkov_log_partition(init, trans[:1], seg, lengths)
    with pytest.raises(ValueError, match="lengths must lie"):
        semimarkov_log_partition(init, trans, seg, torch.tensor([6, 1, 1, 1]))
