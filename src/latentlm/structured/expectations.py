"""E_q[f(z)] of an additive path score f under a chain q, differentiable once by plain autograd.

:func:`~latentlm.structured.chain.chain_marginals` makes marginals differentiable by
differentiating the gradient of log Z again (``create_graph=True`` through the reference
recursion), which is exact to any order but slow: the KL between an amortized chain CRF and a
Markov-chain prior needs only one derivative of the marginals. Here the marginals come from a
log-space forward-backward written with ordinary operations, so one backward pass through the
expectation costs about as much as the forward-backward itself.
"""

from __future__ import annotations

import torch

from latentlm.structured._engine import check_chain, step_trans


def chain_expected_score(
    init: torch.Tensor | None, trans: torch.Tensor, unary: torch.Tensor, lengths: torch.Tensor | None,
    score_init: torch.Tensor | None, score_trans: torch.Tensor, score_unary: torch.Tensor | None,
) -> torch.Tensor:
    """E_q[score_init(z_1) + sum_{t>=2} score_trans(z_{t-1}, z_t) + sum_t score_unary_t(z_t)], (B,),
    q the chain (init, trans, unary, lengths) (shapes as in :mod:`latentlm.structured.chain`);
    ``score_init`` (K,) or None, ``score_trans`` (K, K), ``score_unary`` (B, T, K) or None
    (read only on real positions). Differentiable in every argument; 0 for an empty row."""
    lengths = check_chain(init, trans, unary, lengths)
    B, T, K = unary.shape
    if T == 0:
        return unary.new_zeros(B)
    big = torch.finfo(unary.dtype).max / 16  # -inf scores -> probability exactly 0, no NaN
    unary, trans = unary.clamp_min(-big), trans.clamp_min(-big)
    first = unary[:, 0] if init is None else unary[:, 0] + init.clamp_min(-big)
    alpha = [first]  # log alpha_t (B, K), carried unchanged past the row's end
    for t in range(1, T):
        nxt = torch.logsumexp(alpha[-1].unsqueeze(-1) + step_trans(trans, t), dim=1) + unary[:, t]
        alpha.append(torch.where((t < lengths)[:, None], nxt, alpha[-1]))
    log_z = torch.logsumexp(alpha[-1], -1, keepdim=True)  # (B, 1)
    beta = [unary.new_zeros(B, K)] * T  # log beta_t, 0 at and after the row's last position
    for t in range(T - 2, -1, -1):
        nxt = torch.logsumexp(step_trans(trans, t + 1) + (unary[:, t + 1] + beta[t + 1]).unsqueeze(1), dim=-1)
        beta[t] = torch.where((t < lengths - 1)[:, None], nxt, 0.0)
    total = unary.new_zeros(B)
    for t in range(T):
        node = torch.exp(alpha[t] + beta[t] - log_z)  # (B, K) p(z_t = k)
        if score_init is not None and t == 0:
            total = total + node @ score_init
        if score_unary is not None:
            total = total + torch.where(t < lengths, (node * score_unary[:, t]).sum(-1), 0.0)
        if t > 0:
            edge = torch.exp(alpha[t - 1].unsqueeze(-1) + step_trans(trans, t)
                             + (unary[:, t] + beta[t]).unsqueeze(1) - log_z.unsqueeze(-1))  # (B, K, K)
            total = total + torch.where(t < lengths, (edge * score_trans).sum((1, 2)), 0.0)
    return torch.where(lengths > 0, total, 0.0)
