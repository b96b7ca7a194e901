"""Semi-Markov (segment) dynamic programs: log-partition with a hand-written gradient,
segment marginals, Viterbi segmentation and exact sampling, batched over ragged lengths.

Potentials (log space), as in :mod:`latentlm.structured.semimarkov_reference`:

    init    (K,) / (B, K) / None   score of the first segment's state
    trans   (K, K)                 score of state i -> state k between consecutive segments
    seg     (B, T, D, K)           seg[b, s, d-1, k]: a segment covering s..s+d-1 in state k
    lengths (B,) long              segments reaching past a row's length are never read

and log Z = logsumexp over segmentations of init + sum of segment scores + transitions.
A segmentation is returned as ``states`` (B, T) (the state of every position, -1 on
padding) and ``durations`` (B, T) (a segment's length at its first position, 0 elsewhere).

How it is fast
--------------
The recursion over segment ends e (``a_e``: a segment ends at e; ``A_s``: one starts at s)

    a_e(k) = logsumexp_d A_{e-d}(k) + seg(e-d, d, k)      a (B, D, K) log-space reduction
    A_s(k) = log sum_i exp(a_s(i)) exp(trans(i, k))       a (B, K) @ (K, K) matrix product

does the sum over lengths in log space (its terms sit at different positions, so there is no
common scale) and the sum over states as one matrix product in probability space, shifted by
the row maximum of a_s and the column maximum of trans. The segment scores are read through a
strided *view* ordered by segment end (one masked, padded copy of ``seg``; never a
(B, T, D, K, K) tensor). Where a product's entry falls below sqrt(finfo.tiny) — the only
place precision can be lost — that row's step is redone exactly in log space (forward and
backward), so -inf scores and extreme transitions stay exact.

The backward pass is hand-written (``SemiMarkovLogPartition``): one reverse sweep with the
same two reductions, the transition gradient one (K, B T) @ (B T, K) product at the end.
Memory: the padded copy of ``seg``, its gradient, and four (B, T, K) tables — a few times
the potentials, no autograd tape. The backward is not itself differentiable; for marginals
that must be differentiated again use :class:`ReferenceSemiMarkov`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd.function import once_differentiable

from latentlm.structured._engine import check_lengths, log_matvec, max_matvec


def check_semimarkov(init: torch.Tensor | None, trans: torch.Tensor, seg: torch.Tensor,
                     lengths: torch.Tensor | None) -> torch.Tensor:
    """Validate shapes, dtypes and devices; return lengths as a (B,) long tensor."""
    if seg.dim() != 4:
        raise ValueError(f"segment scores must be (B, T, D, K), got {tuple(seg.shape)}")
    B, T, D, K = seg.shape
    if seg.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"segment scores must be float32 or float64, got {seg.dtype}")
    if D < 1 or K < 1:
        raise ValueError(f"need D >= 1 and K >= 1, got seg {tuple(seg.shape)}")
    if trans.shape != (K, K):
        raise ValueError(f"transition scores must be (K, K) = ({K}, {K}) for seg {tuple(seg.shape)}, got {tuple(trans.shape)}")
    if init is not None and init.shape not in ((K,), (B, K)):
        raise ValueError(f"initial scores must be (K,) or (B, K) = ({B}, {K}), got {tuple(init.shape)}")
    for x in [trans] + ([init] if init is not None else []):
        if x.dtype != seg.dtype or x.device != seg.device:
            raise ValueError(f"all scores must share dtype and device; got {x.dtype}/{x.device} and {seg.dtype}/{seg.device}")
    return check_lengths(lengths, B, T, seg.device)


def _safe_amax(x: torch.Tensor, dim: int, keepdim: bool = False) -> torch.Tensor:
    m = x.amax(dim, keepdim=keepdim)
    return torch.where(torch.isfinite(m), m, torch.zeros((), dtype=m.dtype, device=m.device))


def _by_end(padded: torch.Tensor, T: int) -> torch.Tensor:
    """View (T, D, B, K) of a time-major (T+D-1, D, B, K) contiguous tensor holding seg at
    rows D-1..: view[e-1, j] = seg[e-D+j, D-1-j], the segment of length D-j that ends at e
    (j = 0 is the longest, starting at e-D). Rows before the sequence are the padding."""
    Tp, D, B, K = padded.shape
    BK = B * K
    return padded.as_strided((T, D, B, K), (D * BK, D * BK - BK, K, 1), padded.storage_offset() + (D - 1) * BK)


def _padded_segments(seg: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Time-major (T+D-1, D, B, K): D-1 rows of -inf, then seg with every segment that does
    not fit its row -inf (so padding is never read)."""
    B, T, D, K = seg.shape
    ends = torch.arange(T, device=seg.device)[:, None] + torch.arange(1, D + 1, device=seg.device)[None, :]  # (T, D)
    fits = ends[:, :, None] <= lengths[None, None, :]  # (T, D, B)
    out = torch.full((T + D - 1, D, B, K), -torch.inf, dtype=seg.dtype, device=seg.device)
    torch.where(fits[..., None], seg.permute(1, 2, 0, 3), out[D - 1:], out=out[D - 1:])
    return out


@dataclass
class _Forward:
    alpha: torch.Tensor     # (T, B, K) log a_e, e = 1..T at index e-1
    enter: torch.Tensor     # (T+D-1, B, K) log A_s - colmax at index D-1+s; -inf before the sequence
    ea: torch.Tensor        # (T, B, K) exp(a_e - M_e) (M_e a per-row shift), the matrix product's left factor
    prod: torch.Tensor      # (T, B, K) the product exp(A - M - colmax); +inf where a step was done in log space
    exact: torch.Tensor     # (T, B) bool: the row's step was done in log space
    exp_trans: torch.Tensor  # (K, K) exp(trans - colmax)
    colmax: torch.Tensor    # (K,) the column maxima of trans, kept out of enter and added to every segment score
    padded: torch.Tensor    # (T+D-1, D, B, K) masked, padded, time-major seg + colmax
    log_z: torch.Tensor     # (B,)


def _fast_recursion(enter, by_end, alpha, ea, prod, exp_trans) -> None:
    """Fill alpha, enter, ea and prod in place, step by step: 13 tensor operations a step.

    alpha_e = log s_e + m_e with s_e = Σ_d exp(A + seg - m_e) is finished after the loop, so
    a step needs only s_e and m_e: the product's left factor exp(a_e - M_e) = s_e exp(m_e - M_e)
    with M_e = max_k m_e (s_e >= 1 wherever m_e is finite, so the factor's maximum is >= 1 and
    <= D: no under- or overflow from the shift). colmax is folded into the segment scores."""
    T, D, B, K = by_end.shape
    lo = torch.finfo(alpha.dtype).min
    w = torch.empty(D, B, K, dtype=alpha.dtype, device=alpha.device)
    m = torch.empty(T, B, K, dtype=alpha.dtype, device=alpha.device)
    for e in range(1, T + 1):
        torch.add(enter[e - 1 : e - 1 + D], by_end[e - 1], out=w)  # (D, B, K) lengths D..1
        me = torch.amax(w, 0, out=m[e - 1]).clamp_min_(lo)  # lo (not -inf) keeps w - m NaN-free
        w.sub_(me).exp_()
        s = torch.sum(w, 0, out=alpha[e - 1])
        if e == T:
            break
        M = me.amax(1, keepdim=True)  # (B, 1)
        x = torch.sub(me, M, out=ea[e - 1]).exp_().mul_(s)
        p = torch.mm(x, exp_trans, out=prod[e - 1])  # (B, K)
        torch.log(p, out=enter[D - 1 + e]).add_(M)
    alpha.log_().add_(m)


def _exact_recursion(enter, by_end, alpha, trans, colmax) -> None:
    """The same recursion entirely in log space (for rows where a product lost precision)."""
    T, D = by_end.shape[:2]
    for e in range(1, T + 1):
        a = torch.logsumexp(enter[e - 1 : e - 1 + D] + by_end[e - 1], 0)  # exact for -inf
        alpha[e - 1] = a
        if e < T:
            enter[D - 1 + e] = log_matvec(a, trans) - colmax


def _forward(init, trans, seg, lengths) -> _Forward:
    B, T, D, K = seg.shape
    dtype, dev = seg.dtype, seg.device
    colmax = _safe_amax(trans, 0)  # (K,)
    padded = _padded_segments(seg, lengths).add_(colmax)  # enter is kept minus colmax: the sums are unchanged
    by_end = _by_end(padded, T)
    exp_trans = torch.exp(trans - colmax)
    alpha = torch.empty(T, B, K, dtype=dtype, device=dev)
    ea = torch.zeros(T, B, K, dtype=dtype, device=dev)  # the last step is never a left factor
    prod = torch.full((T, B, K), torch.inf, dtype=dtype, device=dev)
    enter = torch.full((T + D - 1, B, K), -torch.inf, dtype=dtype, device=dev)
    enter[D - 1] = (0.0 if init is None else init) - colmax
    _fast_recursion(enter, by_end, alpha, ea, prod, exp_trans)
    # A product entry below sqrt(tiny) may have lost precision: redo those rows in log space.
    tiny = torch.finfo(dtype).tiny ** 0.5
    low = ((prod[: T - 1] < tiny).any(2) & (alpha[: T - 1] > -torch.inf).any(2)).any(0)  # (B,)
    exact = torch.zeros(T, B, dtype=torch.bool, device=dev)
    if bool(low.any()):
        rows = low.nonzero().squeeze(1)
        sub_enter = enter[:, rows].clone()
        sub_alpha = alpha[:, rows].clone()
        _exact_recursion(sub_enter, by_end[:, :, rows], sub_alpha, trans, colmax)
        enter[:, rows], alpha[:, rows] = sub_enter, sub_alpha
        ea[:, rows], prod[:, rows] = 0.0, torch.inf
        exact[: T - 1, rows] = True
    last = alpha[(lengths - 1).clamp_min(0), torch.arange(B, device=dev)]  # (B, K)
    log_z = torch.where(lengths > 0, torch.logsumexp(last, -1), torch.zeros((), dtype=dtype, device=dev))
    return _Forward(alpha, enter, ea, prod, exact, exp_trans, colmax, padded, log_z)


class SemiMarkovLogPartition(torch.autograd.Function):
    """log Z (B,) with the hand-written backward sweep described in the module docstring."""

    @staticmethod
    def forward(ctx, init, trans, seg, lengths):
        with torch.no_grad():
            fw = _forward(init, trans, seg, lengths)
        ctx.fw, ctx.lengths, ctx.init_shape = fw, lengths, None if init is None else init.shape
        ctx.save_for_backward(trans)
        return fw.log_z

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (trans,) = ctx.saved_tensors
        fw, lengths = ctx.fw, ctx.lengths
        T, B, K = fw.alpha.shape
        D = fw.padded.size(1)
        lo = torch.finfo(fw.alpha.dtype).min
        rows = torch.arange(B, device=grad.device)
        grad_padded = torch.zeros_like(fw.padded)
        grad_by_end = _by_end(grad_padded, T)
        by_end = _by_end(fw.padded, T)
        g_enter = torch.zeros_like(fw.enter)  # (T+D-1, B, K)
        r = torch.zeros(T, B, K, dtype=grad.dtype, device=grad.device)  # g_A / prod: the product's gradient
        g_trans = torch.zeros_like(trans)
        # d log Z / d a_e: the final state's posterior times the incoming gradient, at e = L
        g_alpha = torch.zeros(T, B, K, dtype=grad.dtype, device=grad.device)
        last = fw.alpha[(lengths - 1).clamp_min(0), rows]
        ok = torch.isfinite(fw.log_z) & (lengths > 0)
        lz = torch.where(ok, fw.log_z, 0.0)
        g_last = torch.exp(last - lz[:, None]) * torch.where(ok, grad, 0.0)[:, None]
        g_alpha[(lengths - 1).clamp_min(0), rows] += g_last
        inv = torch.where(fw.prod > 0, 1.0 / fw.prod, 0.0)  # 0 where exact (prod = inf) or A = -inf (g_A = 0)
        a_safe = fw.alpha.clamp_min(lo)
        exact_steps = fw.exact.any(1).tolist()
        eT = fw.exp_trans.T
        for e in range(T, 0, -1):
            g_a = g_alpha[e - 1]  # (B, K), complete once the steps after e are done
            if e < T:
                gA = g_enter[D - 1 + e]  # (B, K)
                re = torch.mul(gA, inv[e - 1], out=r[e - 1])
                g_a.addcmul_(fw.ea[e - 1], re @ eT)
                if exact_steps[e - 1]:
                    sub = fw.exact[e - 1].nonzero().squeeze(1)
                    A = fw.enter[D - 1 + e, sub] + fw.colmax  # enter is kept minus colmax
                    A = torch.where(torch.isfinite(A), A, 0.0)
                    w = torch.exp(fw.alpha[e - 1, sub][:, :, None] + trans[None] - A[:, None, :]) * gA[sub, None, :]
                    g_a[sub] += w.sum(2)  # (R, K, K) only for the rows done in log space
                    g_trans += w.sum(0)
            G = grad_by_end[e - 1]  # (D, B, K): segments ending at e, lengths D..1
            torch.add(fw.enter[e - 1 : e - 1 + D], by_end[e - 1], out=G)
            G.sub_(a_safe[e - 1]).exp_().mul_(g_a)
            g_enter[e - 1 : e - 1 + D] += G
        if T > 1:
            g_trans += fw.exp_trans * (fw.ea.reshape(-1, K).T @ r.reshape(-1, K))
        g_init = None
        if ctx.init_shape is not None:
            g_init = g_enter[D - 1]
            if len(ctx.init_shape) == 1:
                g_init = g_init.sum(0)
        return g_init, g_trans, grad_padded[D - 1 :].permute(2, 0, 1, 3), None


def semimarkov_log_partition(init: torch.Tensor | None, trans: torch.Tensor, seg: torch.Tensor,
                             lengths: torch.Tensor | None = None) -> torch.Tensor:
    """log Z (B,) over all segmentations, differentiable (hand-written backward; its gradient
    w.r.t. ``seg`` is the segment marginals). Rows of length 0 give 0."""
    lengths = check_semimarkov(init, trans, seg, lengths)
    if seg.size(1) == 0:
        return seg.sum(dim=(1, 2, 3))
    return SemiMarkovLogPartition.apply(init, trans, seg, lengths)


def semimarkov_marginals(init: torch.Tensor | None, trans: torch.Tensor, seg: torch.Tensor,
                         lengths: torch.Tensor | None = None) -> torch.Tensor:
    """p(a segment covers s..s+d-1 in state k) (B, T, D, K), zero where it does not fit."""
    with torch.enable_grad():
        s = seg.detach().requires_grad_()
        log_z = semimarkov_log_partition(None if init is None else init.detach(), trans.detach(), s, lengths)
        (g,) = torch.autograd.grad(log_z.sum(), [s])
    return g


def semimarkov_position_marginals(segment_marginals: torch.Tensor) -> torch.Tensor:
    """p(z_t = k) (B, T, K) from segment marginals (B, T, D, K): the sum over segments covering t."""
    B, T, D, K = segment_marginals.shape
    out = torch.zeros(B, T + D, K, dtype=segment_marginals.dtype, device=segment_marginals.device)
    # a segment (s, d) covers t = s..s+d-1: difference array over t, then a cumulative sum
    mass = segment_marginals.sum(2)  # (B, T, K) mass of segments starting at s
    out[:, :T] += mass
    for d in range(1, D + 1):
        out[:, d : d + T] -= segment_marginals[:, :, d - 1]
    return out.cumsum(1)[:, :T]


# ---- Viterbi and sampling ------------------------------------------------------------------


def _fill_segment(states, durations, start, end, k, active):
    """Write state k on start..end-1 and the duration at start, for active rows."""
    T = states.size(1)
    t = torch.arange(T, device=states.device)[None, :]
    inside = (t >= start[:, None]) & (t < end[:, None]) & active[:, None]
    states.masked_scatter_(inside, k[:, None].expand_as(states)[inside])
    at = (t == start[:, None]) & active[:, None]
    durations.masked_scatter_(at, (end - start)[:, None].expand_as(durations)[at])


@torch.no_grad()
def semimarkov_viterbi(init: torch.Tensor | None, trans: torch.Tensor, seg: torch.Tensor,
                       lengths: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The best segmentation: states (B, T), durations (B, T) and its score (B,)."""
    lengths = check_semimarkov(init, trans, seg, lengths)
    B, T, D, K = seg.shape
    dev = seg.device
    states = torch.full((B, T), -1, dtype=torch.long, device=dev)
    durations = torch.zeros(B, T, dtype=torch.long, device=dev)
    if T == 0:
        return states, durations, seg.new_zeros(B)
    by_end = _by_end(_padded_segments(seg, lengths), T)
    enter = torch.full((T + D - 1, B, K), -torch.inf, dtype=seg.dtype, device=dev)
    enter[D - 1] = 0.0 if init is None else init
    alpha = torch.empty(T, B, K, dtype=seg.dtype, device=dev)
    best_len = torch.empty(T, B, K, dtype=torch.long, device=dev)   # at end e-1: the best segment's length
    best_prev = torch.zeros(T, B, K, dtype=torch.long, device=dev)  # at start s-1: the best previous state
    for e in range(1, T + 1):
        a, j = (enter[e - 1 : e - 1 + D] + by_end[e - 1]).max(dim=0)  # (B, K)
        alpha[e - 1] = a
        best_len[e - 1] = D - j
        if e < T:
            enter[D - 1 + e], best_prev[e - 1] = max_matvec(a, trans)
    last = alpha[(lengths - 1).clamp_min(0), torch.arange(B, device=dev)]  # (B, K)
    score, k = last.max(-1)
    score = torch.where(lengths > 0, score, 0.0)
    rows = torch.arange(B, device=dev)
    end, active = lengths.clone(), lengths > 0
    while bool(active.any()):
        e1 = (end - 1).clamp_min(0)
        d = best_len[e1, rows, k]
        start = end - d
        _fill_segment(states, durations, start, end, k, active)
        k = torch.where(start > 0, best_prev[(start - 1).clamp_min(0), rows, k], k)
        active = active & (start > 0)
        end = start
    return states, durations, score


@torch.no_grad()
def semimarkov_sample(init: torch.Tensor | None, trans: torch.Tensor, seg: torch.Tensor,
                      lengths: torch.Tensor | None = None, num_samples: int = 1,
                      generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact samples (forward filtering, backward sampling): states and durations (S, B, T)."""
    lengths = check_semimarkov(init, trans, seg, lengths)
    B, T, D, K = seg.shape
    S, dev = num_samples, seg.device
    states = torch.full((S * B, T), -1, dtype=torch.long, device=dev)
    durations = torch.zeros(S * B, T, dtype=torch.long, device=dev)
    if T == 0 or B == 0:
        return states.view(S, B, T), durations.view(S, B, T)
    fw = _forward(init, trans, seg, lengths)
    by_end = _by_end(fw.padded, T)
    windows = fw.enter.unfold(0, D, 1)  # (T, B, K, D): window e-1 = enter at starts e-D..e-1

    def gumbel_argmax(logits: torch.Tensor) -> torch.Tensor:
        u = torch.rand(logits.shape, dtype=logits.dtype, device=dev, generator=generator)
        return (logits - torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))).argmax(-1)

    row = torch.arange(B, device=dev).repeat(S)  # sample c of row b at c B + b
    L = lengths[row]
    end, active = L.clone(), L > 0
    last = fw.alpha[(L - 1).clamp_min(0), row]  # (SB, K)
    k = gumbel_argmax(last)
    while bool(active.any()):
        e1 = (end - 1).clamp_min(0)
        w = windows[e1, row, k] + by_end[e1, :, row, k]  # (SB, D) scores of the lengths D..1
        j = gumbel_argmax(w)
        start = end - (D - j)
        _fill_segment(states, durations, start, end, k, active)
        s1 = (start - 1).clamp_min(0)
        prev = gumbel_argmax(fw.alpha[s1, row] + trans[:, k].T)  # (SB, K) over previous states
        k = torch.where(start > 0, prev, k)
        active = active & (start > 0)
        end = start
    return states.view(S, B, T), durations.view(S, B, T)


def semimarkov_score(init: torch.Tensor | None, trans: torch.Tensor, seg: torch.Tensor,
                     states: torch.Tensor, durations: torch.Tensor) -> torch.Tensor:
    """Score of given segmentations: states / durations (..., B, T) -> (..., B), differentiable."""
    B, T, D, K = seg.shape
    starts = durations > 0  # (..., B, T)
    d = (durations - 1).clamp(0, D - 1)
    k = states.clamp_min(0)
    seg_b = seg.expand(*states.shape[:-2], B, T, D, K)
    picked = seg_b.gather(-2, d[..., None, None].expand(*d.shape, 1, K)).squeeze(-2)  # (..., B, T, K)
    picked = picked.gather(-1, k[..., None]).squeeze(-1)
    total = torch.where(starts, picked, 0.0).sum(-1)
    # transitions between consecutive segments: the state at each start after the first
    first = starts & (starts.long().cumsum(-1) == 1)
    prev_k = torch.cat([k[..., :1], k[..., :-1]], -1)  # state at t-1 (the previous segment's)
    total = total + torch.where(starts & ~first, trans[prev_k, k], 0.0).sum(-1)
    if init is not None:
        k0 = k[..., 0]  # (..., B)
        s0 = init[k0] if init.dim() == 1 else init.expand(*k0.shape, K).gather(-1, k0[..., None]).squeeze(-1)
        total = total + torch.where(starts[..., 0], s0, 0.0)
    return total


__all__ = [
    "check_semimarkov", "semimarkov_log_partition", "semimarkov_marginals", "semimarkov_position_marginals",
    "semimarkov_viterbi", "semimarkov_sample", "semimarkov_score", "SemiMarkovLogPartition",
]
