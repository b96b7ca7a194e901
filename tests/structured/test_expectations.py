"""The chain sweep for E_q log q and E_q f (entropy, expected scores, the CRF-to-Markov-chain KL):
values and gradients against enumeration of every path, -inf scores, and the memory it keeps."""

import pytest
import torch

from latentlm.structured.expectations import chain_entropy, chain_expectations

from test_chain_dp import enumerate_paths, random_chain

D = torch.float64


def enumerated(init, trans, unary, lengths, si, st, su):
    """(E_q log q, E_q f) per row by summing over every path: autograd-differentiable."""
    neg, exp = [], []
    for b in range(unary.size(0)):
        L = int(lengths[b])
        if L == 0:
            neg.append(unary.sum() * 0)
            exp.append(unary.sum() * 0)
            continue
        paths, score = enumerate_paths(init, trans, unary, b, L)
        logq = score - torch.logsumexp(score, 0)
        f = torch.zeros_like(score)
        if si is not None:
            f = f + si[paths[:, 0]]
        if su is not None:
            f = f + su[b, torch.arange(L)[None, :], paths].sum(1)
        if st is not None:
            for t in range(1, L):
                f = f + st[paths[:, t - 1], paths[:, t]]
        q = logq.exp()
        neg.append(torch.where(q > 0, q * logq, 0.0).sum())  # 0 log 0 = 0
        exp.append((q * f).sum())
    return torch.stack(neg), torch.stack(exp)


@pytest.mark.parametrize("per_step,init_kind", [(False, "shared"), (True, "none"), (False, "per_row")])
def test_values_and_gradients_match_enumeration(per_step, init_kind):
    B, T, K = 5, 4, 3
    init, trans, unary, lengths = random_chain(B, T, K, per_step=per_step, init=init_kind != "none", seed=2)
    lengths = torch.tensor([4, 2, 0, 1, 3])
    if init_kind == "per_row":
        init = torch.randn(B, K, dtype=D, generator=torch.Generator().manual_seed(5))
    g = torch.Generator().manual_seed(9)
    si, st, su = (torch.randn(s, generator=g, dtype=D) for s in ((K,), (K, K), (B, T, K)))
    leaves = [x.clone().requires_grad_() for x in (init, trans, unary, si, st, su) if x is not None]
    args = dict(zip([n for n, x in zip(("init", "trans", "unary", "si", "st", "su"), (init, trans, unary, si, st, su))
                     if x is not None], leaves))
    ini = args.get("init")
    fast = chain_expectations(ini, args["trans"], args["unary"], lengths, args["si"], args["st"], args["su"])
    ref = enumerated(ini, args["trans"], args["unary"], lengths, args["si"], args["st"], args["su"])
    for a, b in zip(fast, ref):
        torch.testing.assert_close(a, b)
    w = torch.randn(2, B, dtype=D, generator=g)  # any weighting of the two outputs
    gf = torch.autograd.grad((w[0] * fast[0] + w[1] * fast[1]).sum(), leaves)
    gr = torch.autograd.grad((w[0] * ref[0] + w[1] * ref[1]).sum(), leaves, allow_unused=True)
    for name, a, b in zip(args, gf, gr):
        torch.testing.assert_close(a, torch.zeros_like(a) if b is None else b, msg=name)
    torch.testing.assert_close(chain_entropy(init, trans, unary, lengths), -ref[0].detach())


def test_impossible_transitions_give_no_nan():
    B, T, K = 3, 5, 4
    init, trans, unary, lengths = random_chain(B, T, K, seed=4)
    trans = trans.clone()
    trans[0, 1] = trans[2, :2] = -torch.inf  # some transitions never happen
    unary = unary.clone()
    unary[1, 2, 3] = -torch.inf
    leaves = [x.clone().requires_grad_() for x in (init, trans, unary)]
    neg, exp = chain_expectations(*leaves, lengths, score_trans=torch.randn(K, K, dtype=D))
    (3.0 * neg + 100.0 * exp).sum().backward()  # large upstream gradients: no inf * 0
    assert torch.isfinite(neg).all() and torch.isfinite(exp).all()
    assert all(torch.isfinite(x.grad).all() for x in leaves)
    ref = enumerated(init, trans, unary, lengths, None, None, None)[0]
    torch.testing.assert_close(neg, ref)


def test_the_sweep_keeps_no_per_step_k_by_k_tape():
    """What autograd keeps between forward and backward: three (T, B, K) tables and the inputs,
    never a (B, K, K) tensor per step (a plain-autograd recursion keeps ~6 B T K^2 numbers)."""
    B, T, K = 4, 30, 20
    init, trans, unary, lengths = random_chain(B, T, K, seed=1, dtype=torch.float32)
    leaves = [x.clone().requires_grad_() for x in (init, trans, unary)]
    seen, kept = set(), []

    def pack(t):
        key = t.untyped_storage().data_ptr()
        if key not in seen:
            seen.add(key)
            kept.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        neg, exp = chain_expectations(*leaves, lengths, score_trans=torch.randn(K, K))
    btk = B * T * K * 4
    assert sum(kept) <= 6 * btk + 4 * K * K * 4, (sum(kept), btk)
    assert sum(kept) < B * T * K * K * 4  # less than one (B, T, K, K) tensor, let alone six
    (neg + exp).sum().backward()
    assert torch.isfinite(leaves[2].grad).all()
