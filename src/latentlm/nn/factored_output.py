"""Output layers whose logits are a sum of two parts, softmax(a_t + c_s), scored for every pair.

A latent-alignment translator predicts target word y_t from the decoder state h_t and one
source encoding e_s: p(y_t | z_t = s) = softmax(W_h h_t + W_e e_s + b). The logits split into
a_t = W_h h_t + b (one (V,) row per target position) and c_s = W_e e_s (one row per source
position), so the S normalizers of position t are

    log sum_v exp(a_tv + c_sv) = m_t + m_s + log sum_v A_tv C_sv,   A = exp(a - m_t), C = exp(c - m_s),

one (T x V) @ (V x S) product per sentence: T * S * V multiply-adds instead of the T * S * V * H
of S output layers, and no (B, T, S, V) tensor, forward or backward (autograd keeps A and C,
the size of the logits themselves). The shifts m are detached maxima (the result does not
depend on them). Products are in fp32 whatever the autocast; a normalizer that underflows
(the two parts' peaks more than ~80 nats apart on every word) is clamped, not -inf.
"""

from __future__ import annotations

import torch

_TINY = 1e-30


def exp_shifted(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(exp(x - m), x - m) in fp32, m the detached maximum over the last dimension."""
    x = x.float()
    peak = x.detach().amax(-1, keepdim=True)
    return (x - peak).exp(), x - peak


class _PairwiseTargetLogProbs(torch.autograd.Function):
    """The pairwise table with a hand-written backward. Under autograd the plain expression
    made about eight (B, T, V)-sized passes beyond the products (exp's backward into a fresh
    tensor, the gather's backward as a zero-filled (B, T, V) tensor plus a scatter, the sum of
    the two gradients, and the same for c); here the backward is the two products and one
    in-place multiply per side, the target terms added at their entries only."""

    @staticmethod
    def forward(ctx, a, c, targets):
        a32, c32 = a.float(), c.float()
        a_peak = a32.amax(-1, keepdim=True)
        c_peak = c32.amax(-1, keepdim=True)
        A = torch.sub(a32, a_peak).exp_()  # (B, T, V)
        C = torch.sub(c32, c_peak).exp_()  # (B, S, V) or (S, V)
        z = torch.matmul(A, C.transpose(-1, -2))  # (B, T, S)
        clamped = z < _TINY
        log_z = z.clamp_min_(_TINY).log_()
        a_y = (a32.gather(-1, targets[..., None]) - a_peak)  # (B, T, 1)
        if c.dim() == 2:
            c_y = (c32 - c_peak).t()[targets]  # (B, T, S)
        else:
            c_y = (c32.gather(-1, targets[:, None, :].expand(-1, c.size(1), -1)) - c_peak).transpose(1, 2)
        ctx.save_for_backward(A, C, log_z, clamped, targets)
        ctx.dtypes = (a.dtype, c.dtype)
        return a_y + c_y - log_z

    @staticmethod
    def backward(ctx, g):
        A, C, log_z, clamped, targets = ctx.saved_tensors
        g = g.float()
        # d out / d log z = -1, and d log z / d z = 1 / z (0 where z was clamped)
        G = (-g / log_z.exp()).masked_fill_(clamped, 0.0)  # (B, T, S)
        grad_a = grad_c = None
        if ctx.needs_input_grad[0]:
            grad_a = torch.matmul(G, C).mul_(A)  # d/da of log z: (G C) * A
            grad_a.scatter_add_(-1, targets[..., None], g.sum(-1, keepdim=True))  # the a_y term
            grad_a = grad_a.to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            S, V = C.shape[-2:]
            if C.dim() == 2:
                grad_c = (G.reshape(-1, S).t() @ A.reshape(-1, V)).mul_(C)
                grad_c.t().index_add_(0, targets.reshape(-1), g.reshape(-1, S))  # the c_y term
            else:
                grad_c = torch.bmm(G.transpose(1, 2), A).mul_(C)
                grad_c.scatter_add_(2, targets[:, None, :].expand(-1, S, -1), g.transpose(1, 2))
            grad_c = grad_c.to(ctx.dtypes[1])
        return grad_a, grad_c, None


def pairwise_target_log_probs(a: torch.Tensor, c: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(a_t + c_s)[y_t] for every target position t and source position s.

    a (B, T, V), c (B, S, V) — or (S, V), one set of rows shared by the whole batch (a tag's
    emission part) — targets (B, T) -> (B, T, S) in fp32.
    """
    with torch.autocast(a.device.type, enabled=False):
        return _PairwiseTargetLogProbs.apply(a, c, targets)


def mixture_log_probs(a: torch.Tensor, C: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """log sum_s w_s softmax(a_r + c_s) over the whole vocabulary for R rows sharing one
    source (decoding the marginal over z: the hypotheses of a beam).

    a (B, R, V), C = exp_shifted(c)[0] (B, S, V), weights (B, R, S) summing to 1 -> (B, R, V) in
    fp32: sum_s w_s exp(a_v + c_sv) / Z_s = A_v * sum_s (w_s / Z'_s) C_sv, Z'_s = sum_v A_v C_sv
    (C's shift cancels in the ratio, so it is computed once per sentence).
    """
    with torch.autocast(a.device.type, enabled=False):
        A, a_shift = exp_shifted(a)
        z = torch.bmm(A, C.transpose(1, 2)).clamp_min(_TINY)  # (B, R, S)
        mix = torch.bmm(weights.float() / z, C)  # (B, R, V)
        return a_shift + mix.clamp_min(_TINY).log()
