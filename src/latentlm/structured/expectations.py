"""Entropy, expected path scores and the KL of a chain q, in one sweep with a hand-written gradient.

For a linear chain q(z) ∝ exp(init(z_1) + Σ_t unary_t(z_t) + Σ_t trans_t(z_{t-1}, z_t)) and an
additive path score f(z) = score_init(z_1) + Σ_t score_unary_t(z_t) + Σ_t score_trans(z_{t-1}, z_t),
:func:`chain_expectations` returns E_q[log q(z)] (minus the entropy) and E_q[f(z)]; the KL of q to
a normalized Markov chain p is their difference with f = log p.

The sweep (Hernando et al. 2005) runs forward with q's backward conditionals
q_t(i | j) = p(z_{t-1} = i | z_t = j, x_{1:t}) ∝ alpha_{t-1}(i) exp(trans_t(i, j)):

    N_t(j) = Σ_i q_t(i | j) [N_{t-1}(i) + log q_t(i | j)]          E[log q(z_{<t} | z_t = j)]
    S_t(j) = Σ_i q_t(i | j) [S_{t-1}(i) + score_trans(i, j)] + score_unary_t(j)
    E_q log q = Σ_j q(z_L = j) [N_L(j) + log q(z_L = j)],   E_q f = Σ_j q(z_L = j) S_L(j).

Memory is what made this worth writing by hand: differentiating these lines by autograd keeps
half a dozen (B, K, K) tensors per step, a (B, T, K, K) tape — 60 MB for one PTB batch at
K = 45, 250 times the potentials (``benchmarks/bench_structured_memory.py``). Here the forward
keeps three (T, B, K) tables (alpha, N, S before each step) and the backward sweep recomputes
each step's (B, K, K) conditionals from them, so the working set is those tables plus a few
(B, K, K) buffers. The gradient is exact; differentiating it again (``create_graph=True``)
differentiates the plain sweep instead, exact to any order at autograd's memory cost.
"""

from __future__ import annotations

import torch

from latentlm.structured._engine import check_chain, step_trans


def chain_expectations(
    init: torch.Tensor | None, trans: torch.Tensor, unary: torch.Tensor, lengths: torch.Tensor | None = None,
    score_init: torch.Tensor | None = None, score_trans: torch.Tensor | None = None,
    score_unary: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(E_q log q(z), E_q f(z)), each (B,), for the chain q = (init, trans, unary, lengths)
    (shapes as in :mod:`latentlm.structured.chain`) and the score f = (``score_init`` (K,),
    ``score_trans`` (K, K), ``score_unary`` (B, T, K), each optional; ``score_unary`` is read on
    real positions only). Both 0 for an empty row. Differentiable in every argument (a
    hand-written reverse sweep; under ``create_graph=True`` autograd through the plain sweep);
    -inf scores are clamped to a huge finite number, so impossible transitions get probability
    exactly 0 and produce no NaN in either pass."""
    lengths = check_chain(init, trans, unary, lengths)
    B, T, K = unary.shape
    if score_trans is not None and score_trans.shape != (K, K):
        raise ValueError(f"score_trans must be (K, K) = ({K}, {K}), got {tuple(score_trans.shape)}")
    if score_unary is not None and score_unary.shape != (B, T, K):
        raise ValueError(f"score_unary must be (B, T, K) = ({B}, {T}, {K}), got {tuple(score_unary.shape)}")
    if score_init is not None and score_init.shape != (K,):
        raise ValueError(f"score_init must be (K,), got {tuple(score_init.shape)}")
    if T == 0:
        zero = unary.sum(dim=(1, 2))  # no positions: 0, still on the graph
        return zero, zero
    big = torch.finfo(unary.dtype).max / 16
    clamp = (lambda x: None if x is None else x.clamp_min(-big))  # noqa: E731
    return _ChainExpectations.apply(clamp(init), clamp(trans), clamp(unary), lengths,
                                    score_init, score_trans, score_unary)


def chain_entropy(
    init: torch.Tensor | None, trans: torch.Tensor, unary: torch.Tensor, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """Entropy H[q] (B,) in nats (see :func:`chain_expectations`)."""
    return -chain_expectations(init, trans, unary, lengths)[0]


def chain_expected_score(
    init: torch.Tensor | None, trans: torch.Tensor, unary: torch.Tensor, lengths: torch.Tensor | None,
    score_init: torch.Tensor | None, score_trans: torch.Tensor, score_unary: torch.Tensor | None,
) -> torch.Tensor:
    """E_q[score_init(z_1) + Σ_{t>=2} score_trans(z_{t-1}, z_t) + Σ_t score_unary_t(z_t)], (B,)
    (see :func:`chain_expectations`)."""
    return chain_expectations(init, trans, unary, lengths, score_init, score_trans, score_unary)[1]


def _step(la: torch.Tensor, tr: torch.Tensor):
    """One step's conditionals from alpha_{t-1} (B, K): log q_t(i | j) and q_t(i | j), (B, K, K)
    [i, j], and log of the new alpha before the unary score (B, K)."""
    s = la.unsqueeze(-1) + tr                 # (B, K_prev, K_next)
    n = torch.logsumexp(s, dim=1)             # (B, K)
    logq = s - n.unsqueeze(1) if torch.is_grad_enabled() else s.sub_(n.unsqueeze(1))
    return logq, logq.exp(), n


def _sweep(init, trans, unary, lengths, score_init, score_trans, score_unary, tables=None):
    """The forward sweep: (E_q log q, E_q f) and the final (N, S, log q(z_L)); ``tables`` (three
    (T-1, B, K) tensors) receive alpha, N and S entering each step. Plain tensor operations, so
    under autograd it is also the (memory-hungry) differentiable-to-any-order version."""
    B, T, K = unary.shape
    la = unary[:, 0] if init is None else unary[:, 0] + init          # log alpha_1 (B, K)
    N = unary.new_zeros(B, K)
    S = unary.new_zeros(B, K)
    if score_init is not None:
        S = S + score_init
    if score_unary is not None:
        S = S + score_unary[:, 0]
    for t in range(1, T):
        if tables is not None:
            tables[0][t - 1], tables[1][t - 1], tables[2][t - 1] = la, N, S
        valid = (t < lengths)[:, None]
        logq, w, n = _step(la, step_trans(trans, t))
        N_new = torch.bmm(N.unsqueeze(1), w).squeeze(1) + torch.einsum("bij,bij->bj", w, logq)
        S_new = torch.bmm(S.unsqueeze(1), w).squeeze(1)
        if score_trans is not None:
            S_new = S_new + torch.einsum("bij,ij->bj", w, score_trans)
        if score_unary is not None:
            S_new = S_new + score_unary[:, t]
        N = torch.where(valid, N_new, N)
        S = torch.where(valid, S_new, S)
        la = torch.where(valid, n + unary[:, t], la)
    logp = la - torch.logsumexp(la, -1, keepdim=True)
    p = logp.exp()
    nonempty = lengths > 0
    neg_entropy = torch.where(nonempty, (p * (N + logp)).sum(-1), 0.0)
    expected = torch.where(nonempty, (p * S).sum(-1), 0.0)
    return neg_entropy, expected, N, S, logp


class _ChainExpectations(torch.autograd.Function):
    @staticmethod
    def forward(ctx, init, trans, unary, lengths, score_init, score_trans, score_unary):
        B, T, K = unary.shape
        tables = [torch.empty(max(T - 1, 0), B, K, dtype=unary.dtype, device=unary.device) for _ in range(3)]
        neg_entropy, expected, N, S, logp = _sweep(init, trans, unary, lengths, score_init, score_trans,
                                                   score_unary, tables)
        ctx.save_for_backward(init, trans, unary, lengths, score_init, score_trans, score_unary, *tables, N, S, logp)
        return neg_entropy, expected

    @staticmethod
    def backward(ctx, g_neg, g_exp):
        init, trans, unary, lengths, score_init, score_trans, score_unary, LA, NN, SS, N, S, logp = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: differentiate the plain sweep (any order, more memory)
            inputs = (init, trans, unary, lengths, score_init, score_trans, score_unary)
            wanted = [i for i, x in enumerate(inputs) if x is not None and ctx.needs_input_grad[i]]
            outs = _sweep(*inputs)[:2]
            grads = torch.autograd.grad(outs, [inputs[i] for i in wanted], (g_neg, g_exp), create_graph=True,
                                        allow_unused=True)
            result = [None] * 7
            for i, g in zip(wanted, grads):
                result[i] = torch.zeros_like(inputs[i]) if g is None else g
            return tuple(result)
        return _ChainExpectations._backward(ctx.needs_input_grad, init, trans, unary, lengths, score_init,
                                            score_trans, score_unary, LA, NN, SS, N, S, logp, g_neg, g_exp)

    @staticmethod
    def _backward(needs, init, trans, unary, lengths, score_init, score_trans, score_unary, LA, NN, SS, N, S, logp,
                  g_neg, g_exp):
        """The reverse sweep: recompute each step's conditionals from the tables; no graph."""
        B, T, K = unary.shape
        nonempty = (lengths > 0).to(unary.dtype)
        gN_, gE_ = g_neg * nonempty, g_exp * nonempty      # (B,)
        p = logp.exp()
        # the final sums: E log q = Σ p (N + log p), E f = Σ p S
        gN = gN_[:, None] * p                              # adjoint of N_L
        gS = gE_[:, None] * p                              # adjoint of S_L
        g_logp = p * (gN_[:, None] * (N + logp + 1.0) + gE_[:, None] * S)
        g_la = g_logp - p * g_logp.sum(-1, keepdim=True)   # through log p = la - logsumexp(la)
        g_unary = torch.zeros_like(unary)
        g_trans = torch.zeros_like(trans) if needs[1] else None
        g_st = torch.zeros_like(score_trans) if score_trans is not None and needs[5] else None
        g_su = torch.zeros_like(score_unary) if score_unary is not None and needs[6] else None
        for t in range(T - 1, 0, -1):
            valid = (t < lengths)[:, None]
            v = valid.to(unary.dtype)
            la, N_prev, S_prev = LA[t - 1], NN[t - 1], SS[t - 1]
            logq, w, _ = _step(la, step_trans(trans, t))
            gN_v, gS_v, g_la_v = gN * v, gS * v, g_la * v   # only rows whose step t is real
            g_unary[:, t] = g_la_v
            if g_su is not None:
                g_su[:, t] = gS_v
            # N' = Σ_i w (N + log q); S' = Σ_i w (S + score_trans) + score_unary_t, w = exp(log q).
            # The adjoint of log q, through w and directly: w ⊙ [gN'(N + log q + 1) + gS'(S + score_trans)],
            # built in log q's own buffer (w is multiplied in before gN', so -big log q meets w = 0 first)
            g = logq.add_(N_prev.unsqueeze(-1) + 1.0).mul_(w).mul_(gN_v.unsqueeze(1))
            tmp = w * (S_prev.unsqueeze(-1) if score_trans is None else S_prev.unsqueeze(-1) + score_trans)
            g.addcmul_(tmp, gS_v.unsqueeze(1))
            if g_st is not None:
                g_st += torch.mul(w, gS_v.unsqueeze(1), out=tmp).sum(0)
            g_n = g_la_v - g.sum(1)                          # log q = s - n;  alpha_t = n + unary_t
            g_s = g.addcmul_(w, g_n.unsqueeze(1))            # n = logsumexp_i s: softmax over i is w
            # pass the adjoints to the state before step t (unchanged on rows without a step t)
            gN = torch.where(valid, torch.bmm(w, gN.unsqueeze(-1)).squeeze(-1), gN)
            gS = torch.where(valid, torch.bmm(w, gS.unsqueeze(-1)).squeeze(-1), gS)
            g_la = torch.where(valid, g_s.sum(2), g_la)
            if g_trans is not None:
                if trans.dim() == 2:
                    g_trans += g_s.sum(0)
                else:
                    g_trans[:, t - 1] = g_s
        g_unary[:, 0] = g_la
        g_init = None
        if init is not None and needs[0]:
            g_init = g_la if init.dim() == 2 else g_la.sum(0)
        if g_su is not None:
            g_su[:, 0] = gS
        g_si = gS.sum(0) if score_init is not None and needs[4] else None
        return g_init, g_trans, g_unary, None, g_si, g_st, g_su
