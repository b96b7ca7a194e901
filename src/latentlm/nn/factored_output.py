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


def pairwise_target_log_probs(a: torch.Tensor, c: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log softmax(a_t + c_s)[y_t] for every target position t and source position s.

    a (B, T, V), c (B, S, V) — or (S, V), one set of rows shared by the whole batch (a tag's
    emission part) — targets (B, T) -> (B, T, S) in fp32.
    """
    with torch.autocast(a.device.type, enabled=False):
        A, a_shift = exp_shifted(a)
        C, c_shift = exp_shifted(c)
        a_y = a_shift.gather(-1, targets[..., None])  # (B, T, 1)
        if c.dim() == 2:
            log_z = torch.matmul(A, C.t()).clamp_min(_TINY).log()  # (B, T, S), shifts excluded
            return a_y + c_shift.t()[targets] - log_z
        log_z = torch.bmm(A, C.transpose(1, 2)).clamp_min(_TINY).log()
        c_y = c_shift.gather(-1, targets[:, None, :].expand(-1, c.size(1), -1)).transpose(1, 2)  # (B, T, S)
        return a_y + c_y - log_z


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
