"""The forward-backward engine shared by every chain operation.

A chain of length T over K states is given in log space by

    init    (K,) or (B, K)                 score of z_1 (None: no init term)
    trans   (K, K) shared, or (B, T-1, K, K) per step; row = previous state, column = next
    unary   (B, T, K)                      score of z_t (HMM: log p(x_t | z_t))
    lengths (B,) long, 0 <= L_b <= T       positions >= L_b are padding and never read

and log Z = logsumexp over paths of init(z_1) + sum_t unary_t(z_t) + sum_t trans_t(z_{t-1}, z_t).

Why two recursions
------------------
*Scaled probability space* (Rabiner 1989) does one (B, K) @ (K, K) matrix product per step,
the fastest form on a CPU. Every quantity is kept in [0, 1] by three shifts that change
nothing in exact arithmetic: each column j of exp(trans) is divided by its largest entry
(``colmax_j``, folded into step t's unary), each step's unaries by their maximum ``m_t``,
and the filter alpha_t by its sum c_t. Then

    log Z = sum_t (log c_t + m_t).

Precision is lost only when a step's normalizer c_t is tiny (the likely states at t-1 can
barely reach the likely states at t), i.e. when the terms that survive are near the
smallest normal float. Such rows (c_t <= sqrt(finfo.tiny), also c_t = 0 for impossible
sentences) are recomputed by the *log-space* recursion, which is exact for any parameters,
including -inf, but costs O(B K^2) memory traffic per step instead of a matrix product.

Memory
------
The backward pass is hand-written (``ChainLogPartition``): the forward pass keeps only the
normalized filters alpha (B, T, K) and the normalizers (B, T). The backward recursion

    beta_t = G_{t+1} @ A^T,      G_t = e_t * beta_t / c_t,      gamma_t = alpha_t * beta_t

overwrites alpha with the posterior marginals gamma (which are the unary gradient), and
accumulates the transition gradient sum_t alpha_{t-1}^T G_t one time-chunk at a time. The
alpha table is laid out like ``unary`` (batch-major, contiguous) and the backward drops its
own reference to it, so autograd adopts it as ``unary.grad`` without a copy: peak memory
is the input plus one (B, T, K) table (which *is* the gradient), the (K, K) transition
matrix and its gradient, and chunk-sized buffers. Betas, the G_t and the exp'd unaries live
only one time-chunk at a time.

Higher derivatives
------------------
The hand-written backward is fast but is not itself differentiable. When a caller asks for
a graph of the gradient (``create_graph=True``: marginals that must be differentiated
again, as structured VI does), the backward instead differentiates the plain semiring
recursion of :mod:`latentlm.structured.reference` with autograd, which is differentiable to
any order (and costs O(B K^2) memory per step).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from latentlm.structured.reference import ReferenceChain

# Temporaries of per-step log-space products and time-chunk buffers hold at most this many
# elements (4 MiB in float32) unless _MIN_ROWS asks for more; the backward pass holds four
# time-chunk buffers, allocated once.
_CHUNK_ELEMS = 1 << 20
# The time-chunk of the backward pass has at least this many rows B * C, so the transition
# gradient is a reasonably shaped matrix product even at B = 1.
_MIN_ROWS = 512


def check_chain(
    init: torch.Tensor | None, trans: torch.Tensor, unary: torch.Tensor, lengths: torch.Tensor | None
) -> torch.Tensor:
    """Validate shapes, dtypes and devices at the boundary; return lengths as a (B,) long tensor."""
    if unary.dim() != 3:
        raise ValueError(f"unary / log_emit must be (B, T, K), got {tuple(unary.shape)}")
    B, T, K = unary.shape
    if not unary.is_floating_point() or unary.dtype not in (torch.float32, torch.float64):
        raise ValueError(f"chain scores must be float32 or float64, got {unary.dtype}")
    if trans.dim() == 2:
        if trans.shape != (K, K):
            raise ValueError(f"transition scores must be (K, K) = ({K}, {K}) for unary {tuple(unary.shape)}, got {tuple(trans.shape)}")
    elif trans.dim() == 4:
        if trans.shape != (B, max(T - 1, 0), K, K):
            raise ValueError(
                f"per-step transition scores must be (B, T-1, K, K) = ({B}, {max(T - 1, 0)}, {K}, {K}) "
                f"for unary {tuple(unary.shape)}, got {tuple(trans.shape)}"
            )
    else:
        raise ValueError(f"transition scores must be (K, K) or (B, T-1, K, K), got {tuple(trans.shape)}")
    tensors = [trans] + ([init] if init is not None else [])
    if init is not None and init.shape not in ((K,), (B, K)):
        raise ValueError(f"initial scores must be (K,) or (B, K) = ({B}, {K}), got {tuple(init.shape)}")
    for x in tensors:
        if x.dtype != unary.dtype or x.device != unary.device:
            raise ValueError(
                f"all chain scores must share dtype and device; got {x.dtype}/{x.device} and "
                f"{unary.dtype}/{unary.device} (shapes {tuple(x.shape)} and {tuple(unary.shape)})"
            )
    if K < 1:
        raise ValueError(f"need at least one state, got unary {tuple(unary.shape)}")
    return check_lengths(lengths, B, T, unary.device)


def check_lengths(lengths, B: int, T: int, device: torch.device) -> torch.Tensor:
    """``lengths`` as a (B,) long tensor in [0, T] on ``device`` (all T when None); a clear
    ValueError otherwise. Shared by the chain and the semi-Markov programs."""
    if lengths is None:
        return torch.full((B,), T, dtype=torch.long, device=device)
    lengths = torch.as_tensor(lengths, device=device)
    if lengths.shape != (B,) or lengths.is_floating_point():
        raise ValueError(f"lengths must be (B,) = ({B},) integers, got {tuple(lengths.shape)} {lengths.dtype}")
    lengths = lengths.long()
    if B and (int(lengths.min()) < 0 or int(lengths.max()) > T):
        raise ValueError(f"lengths must lie in [0, T={T}], got min {int(lengths.min())} max {int(lengths.max())}")
    return lengths


def _safe_max(x: torch.Tensor, dim: int) -> torch.Tensor:
    """max over ``dim``; 0 where the max is not finite (all -inf), so x - max never is NaN."""
    m = x.amax(dim)
    return torch.where(torch.isfinite(m), m, torch.zeros((), dtype=m.dtype, device=m.device))


def log_matvec(v: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
    """out[b, j] = logsumexp_i v[b, i] + trans[(b,) i, j], chunked over j to bound memory.

    v (B, K); trans (K, K) or (B, K, K). Exact for -inf entries (logsumexp of all -inf = -inf).
    """
    B, K = v.shape
    cols = trans.size(-1)
    step = max(1, _CHUNK_ELEMS // max(1, B * K))
    outs = []
    for j0 in range(0, cols, step):
        t = trans[..., j0 : j0 + step]  # (K, c) or (B, K, c)
        outs.append(torch.logsumexp(v.unsqueeze(-1) + t, dim=-2))  # (B, c)
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


def max_matvec(v: torch.Tensor, trans: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(max_i, argmax_i) of v[b, i] + trans[(b,) i, j], chunked over j: two (B, K) tensors."""
    B, K = v.shape
    cols = trans.size(-1)
    step = max(1, _CHUNK_ELEMS // max(1, B * K))
    vals, idxs = [], []
    for j0 in range(0, cols, step):
        s = v.unsqueeze(-1) + trans[..., j0 : j0 + step]  # (B, K, c)
        mv, mi = s.max(dim=-2)
        vals.append(mv)
        idxs.append(mi)
    if len(vals) == 1:
        return vals[0], idxs[0]
    return torch.cat(vals, -1), torch.cat(idxs, -1)


def step_trans(trans: torch.Tensor, t: int) -> torch.Tensor:
    """Transition scores into position t >= 1: (K, K) or (B, K, K)."""
    return trans if trans.dim() == 2 else trans[:, t - 1]


@dataclass
class _Tables:
    """What the forward pass keeps for the backward pass."""

    alpha: torch.Tensor        # (B, T, K) normalized filters; zero on padding and bad rows
    inv_c: torch.Tensor        # (B, T) 1 / c_t on valid steps of good rows, else 0
    log_z: torch.Tensor        # (B,)
    mask: torch.Tensor         # (B, T) bool
    bad: torch.Tensor          # (B,) bool: rows done in log space
    colmax: torch.Tensor | None  # (K,) shared, (B, T-1, K) per step, None when T == 1
    scaled_a: torch.Tensor | None  # (K, K) exp(trans - colmax) for shared transitions
    log_alpha_bad: torch.Tensor | None  # (T, B', K) log-space forward of the bad rows
    consumed: bool = False     # alpha was overwritten by gamma in a backward pass


def _time_chunk(B: int, T: int, K: int) -> int:
    by_mem = _CHUNK_ELEMS // max(1, B * K)
    by_rows = -(-_MIN_ROWS // max(1, B))
    return max(1, min(T, max(by_mem, by_rows) if by_mem >= 1 else 1))


def _emission_factor(
    init: torch.Tensor | None, unary: torch.Tensor, colmax: torch.Tensor | None, mask: torch.Tensor,
    t0: int, t1: int, out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """e (C, B, K) = exp(w_t - m_t) and m (B, C) for steps t0 <= t < t1.

    w_t = unary_t + colmax_t (t >= 1) or unary_0 + init (t = 0). Padding gets e = 1, m = 0 so
    the recursion stays finite there (its values are masked out). ``e`` is written into the
    chunk buffer ``out`` (C_max, B, K), every step in place.
    """
    w = unary[:, t0:t1].transpose(0, 1)  # (C, B, K) view, never written
    e = out[: t1 - t0]
    lo = max(t0, 1)
    if lo < t1:
        if colmax is not None:
            cm = colmax if colmax.dim() == 1 else colmax[:, lo - 1 : t1 - 1].transpose(0, 1)  # (K,) or (C', B, K)
            torch.add(w[lo - t0 :], cm, out=e[lo - t0 :])
        else:
            e[lo - t0 :].copy_(w[lo - t0 :])
    if t0 == 0:
        if init is None:
            e[0].copy_(w[0])
        else:
            torch.add(w[0], init, out=e[0])
    m = _safe_max(e, -1)  # (C, B)
    e.sub_(m.unsqueeze(-1)).exp_()  # exp(w_t - m_t)
    valid = mask[:, t0:t1].transpose(0, 1)  # (C, B)
    e.masked_fill_(~valid.unsqueeze(-1), 1.0)
    m = m.masked_fill(~valid, 0.0)
    return e, m.transpose(0, 1)


def _scaled_step_matrix(trans: torch.Tensor, colmax: torch.Tensor, t: int) -> torch.Tensor:
    """exp(trans_t - colmax_t) for per-step transitions: (B, K, K)."""
    return torch.exp(trans[:, t - 1] - colmax[:, t - 1].unsqueeze(1))


@torch.no_grad()
def scaled_forward(
    init: torch.Tensor | None, trans: torch.Tensor, unary: torch.Tensor, lengths: torch.Tensor,
    force_log: bool = False,
) -> _Tables:
    """Forward pass in scaled probability space; rows that underflow are redone in log space."""
    B, T, K = unary.shape
    dtype, device = unary.dtype, unary.device
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]  # (B, T)
    shared = trans.dim() == 2
    colmax: torch.Tensor | None = None
    scaled_a: torch.Tensor | None = None
    if T > 1:
        colmax = _safe_max(trans, -2)  # (K,) or (B, T-1, K)
        if shared:
            scaled_a = torch.exp(trans - colmax)  # (K, K), every column's max is 1
    alpha = unary.new_empty(B, T, K)  # unary's layout, so it can become unary's gradient as is
    c = unary.new_ones(B, T)
    c_t = unary.new_ones(T, B)  # normalizers, time-major so each step writes a contiguous row
    m_sum = unary.new_zeros(B)
    if not force_log:
        C = _time_chunk(B, T, K)
        prev: torch.Tensor | None = None
        buf = unary.new_empty(B, K) if T > 1 else None  # the matrix product's contiguous output
        e_buf = unary.new_empty(min(C, T), B, K)  # one chunk buffer, reused (no allocator churn)
        for t0 in range(0, T, C):
            t1 = min(T, t0 + C)
            e, m = _emission_factor(init, unary, colmax, mask, t0, t1, e_buf)
            m_sum += m.sum(1)
            for t in range(t0, t1):
                a = alpha[:, t]  # (B, K) view (row stride T K), written in place
                if t == 0:
                    a.copy_(e[0])
                elif shared:
                    torch.mul(torch.mm(prev, scaled_a, out=buf), e[t - t0], out=a)
                else:
                    p = _scaled_step_matrix(trans, colmax, t)
                    torch.bmm(prev.unsqueeze(1), p, out=buf.unsqueeze(1))
                    torch.mul(buf, e[t - t0], out=a)
                torch.sum(a, -1, out=c_t[t])
                a.div_(c_t[t].unsqueeze(-1))
                prev = a
        c = c_t.t()  # (B, T)
        tau = torch.finfo(dtype).tiny ** 0.5
        bad = ((~(c > tau)) & mask).any(1)  # also catches NaN and c = 0
    else:
        bad = torch.ones(B, dtype=torch.bool, device=device)
    valid = mask & ~bad[:, None]
    log_c = torch.where(valid, torch.log(torch.where(valid, c, torch.ones((), dtype=dtype, device=device))), 0.0)
    log_z = log_c.sum(1) + m_sum
    inv_c = torch.where(valid, 1.0 / torch.where(valid, c, torch.ones((), dtype=dtype, device=device)), 0.0)
    alpha.masked_fill_(~valid.unsqueeze(-1), 0.0)
    log_alpha_bad = None
    if bool(bad.any()):
        idx = bad.nonzero().squeeze(1)
        sub_init = None if init is None else (init if init.dim() == 1 else init[idx])
        sub_trans = trans if shared else trans[idx]
        log_alpha_bad, lz = log_forward(sub_init, sub_trans, unary[idx], lengths[idx])
        log_z = log_z.index_copy(0, idx, lz)
    return _Tables(alpha, inv_c, log_z, mask, bad, colmax, scaled_a, log_alpha_bad)


@torch.no_grad()
def log_forward(
    init: torch.Tensor | None, trans: torch.Tensor, unary: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-space forward: (log alpha (T, B, K), log Z (B,)). Padding carries the last valid alpha."""
    B, T, K = unary.shape
    la = unary.new_empty(T, B, K)
    if T == 0:
        return la, unary.new_zeros(B)
    a = unary[:, 0] if init is None else unary[:, 0] + init
    la[0] = a
    for t in range(1, T):
        new = log_matvec(la[t - 1], step_trans(trans, t)) + unary[:, t]
        la[t] = torch.where((t < lengths)[:, None], new, la[t - 1])
    log_z = torch.logsumexp(la[T - 1], dim=-1) if T > 0 else unary.new_zeros(B)
    log_z = torch.where(lengths > 0, log_z, 0.0)
    return la, log_z


@torch.no_grad()
def log_backward(
    init: torch.Tensor | None, trans: torch.Tensor, unary: torch.Tensor, lengths: torch.Tensor,
    la: torch.Tensor, log_z: torch.Tensor, g: torch.Tensor, want_trans: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-space backward: (g-scaled gamma (T, B, K), g-scaled transition gradient or None).

    Rows whose log Z is -inf (impossible observations) get zero gradients.
    """
    B, T, K = unary.shape
    shared = trans.dim() == 2
    finite = torch.isfinite(log_z)
    z = torch.where(finite, log_z, 0.0)
    gs = torch.where(finite, g, 0.0)
    gamma = torch.empty_like(la)
    grad_trans = None
    if want_trans:
        grad_trans = torch.zeros_like(trans)
    lb = unary.new_zeros(B, K)
    for t in range(T - 1, -1, -1):
        if t < T - 1:
            nxt = unary[:, t + 1] + lb  # (B, K)
            tr = step_trans(trans, t + 1)
            new = log_matvec(nxt, tr.transpose(-1, -2))
            lb = torch.where((t >= lengths - 1)[:, None], 0.0, new)
        valid = (t < lengths)[:, None]
        lg = la[t] + lb - z[:, None]
        gamma[t] = torch.where(valid, torch.exp(torch.where(valid, lg, 0.0)), 0.0) * gs[:, None]
        if want_trans and t >= 1:
            tr = step_trans(trans, t)
            right = unary[:, t] + lb - z[:, None]  # (B, K)
            right = torch.where(valid, right, -torch.inf)
            step = max(1, _CHUNK_ELEMS // max(1, B * K))
            for j0 in range(0, K, step):
                xi = torch.exp(la[t - 1].unsqueeze(-1) + tr[..., j0 : j0 + step] + right[:, None, j0 : j0 + step])
                xi = torch.nan_to_num(xi, nan=0.0) * gs[:, None, None]  # (B, K, c)
                if shared:
                    grad_trans[:, j0 : j0 + step] += xi.sum(0)
                else:
                    grad_trans[:, t - 1, :, j0 : j0 + step] = xi
    gamma = torch.nan_to_num(gamma, nan=0.0)
    return gamma, grad_trans


@torch.no_grad()
def scaled_backward(
    tables: _Tables, init: torch.Tensor | None, trans: torch.Tensor, unary: torch.Tensor,
    lengths: torch.Tensor, g: torch.Tensor, want_trans: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor]:
    """Gradients of sum_b g_b log Z_b: (init, trans, unary); unary's is ``tables.alpha`` itself.

    Overwrites ``tables.alpha`` with the (g-scaled) posterior marginals.
    """
    B, T, K = unary.shape
    shared = trans.dim() == 2
    alpha, mask, bad = tables.alpha, tables.mask, tables.bad
    gs = torch.where(bad, 0.0, g)  # (B,)
    scale = tables.inv_c  # (B, T); g enters only the gradients, never the beta recursion
    reset = (torch.arange(T, device=unary.device)[None, :] >= (lengths - 1)[:, None]).to(unary.dtype)  # (B, T)
    grad_trans = None
    if want_trans:
        grad_trans = unary.new_zeros(K, K) if shared else torch.zeros_like(trans)
    at = tables.scaled_a.t() if shared and T > 1 else None
    C = _time_chunk(B, T, K)
    g_next: torch.Tensor | None = None
    p_next: torch.Tensor | None = None  # per-step scaled matrix into t + 1
    chunks = [(t0, min(T, t0 + C)) for t0 in range(0, T, C)]
    # Four chunk buffers, allocated once: exp'd unaries, G_t, beta_t, and alpha_{t-1} time-major.
    Cm = min(C, T)
    e_buf, b_all = unary.new_empty(Cm, B, K), unary.new_empty(Cm, B, K)
    g_all = unary.new_empty(Cm, B, K) if shared else None
    left_all = unary.new_empty(Cm, B, K) if shared and want_trans else None
    for t0, t1 in reversed(chunks):
        e, _ = _emission_factor(init, unary, tables.colmax, mask, t0, t1, e_buf)
        g_buf = g_all[: t1 - t0] if shared else None
        b_buf = b_all[: t1 - t0]
        for t in range(t1 - 1, t0 - 1, -1):
            r = reset[:, t : t + 1]  # (B, 1)
            beta = b_buf[t - t0]  # (B, K), written in place
            if g_next is None:
                beta.copy_(r.expand(B, K))
            elif shared:
                torch.mm(g_next, at, out=beta).add_(r)
            else:
                torch.bmm(p_next, g_next.unsqueeze(-1), out=beta.unsqueeze(-1))
                beta.add_(r)
            gt = g_buf[t - t0] if shared else torch.empty_like(beta)
            torch.mul(e[t - t0], beta, out=gt).mul_(scale[:, t : t + 1])  # unscaled by g
            if not shared and t >= 1:
                p_next = _scaled_step_matrix(trans, tables.colmax, t)  # (B, K, K) into t
                if want_trans:
                    grad_trans[:, t - 1] = alpha[:, t - 1].unsqueeze(-1) * p_next * (gt * gs[:, None]).unsqueeze(1)
            g_next = gt
        lo = max(t0, 1)
        if shared and want_trans and lo < t1:
            # sum_t (g_b alpha_{t-1})^T G_t in one product per chunk
            left = left_all[: t1 - lo]  # time-major like g_buf
            torch.mul(alpha[:, lo - 1 : t1 - 1].transpose(0, 1), gs[None, :, None], out=left)
            right = g_buf[lo - t0 :].reshape(-1, K)
            grad_trans.addmm_(left.reshape(-1, K).t(), right)  # ((t1-lo) B, K) rows
        alpha[:, t0:t1].mul_(b_buf.transpose(0, 1)).mul_(gs[:, None, None])
    tables.consumed = True
    if shared and want_trans:
        grad_trans.mul_(tables.scaled_a if T > 1 else 0.0)
    gamma = alpha  # (B, T, K), zero on padding and on bad rows
    if bool(bad.any()):
        idx = bad.nonzero().squeeze(1)
        sub_init = None if init is None else (init if init.dim() == 1 else init[idx])
        sub_trans = trans if shared else trans[idx]
        sub_lz = tables.log_z[idx]
        lg, lt = log_backward(
            sub_init, sub_trans, unary[idx], lengths[idx], tables.log_alpha_bad, sub_lz, g[idx], want_trans
        )
        gamma.index_copy_(0, idx, lg.transpose(0, 1))
        if want_trans:
            if shared:
                grad_trans += lt
            else:
                grad_trans.index_copy_(0, idx, lt)
    grad_init = None
    if init is not None:
        if T == 0:
            grad_init = torch.zeros_like(init)
        else:
            grad_init = gamma[:, 0].sum(0) if init.dim() == 1 else gamma[:, 0].clone()
    return grad_init, grad_trans, gamma


class ChainLogPartition(torch.autograd.Function):
    """log Z (B,) with the hand-written forward-backward gradient described in the module doc.

    Under ``create_graph=True`` the gradient is instead autograd's through the reference
    recursion, so it can be differentiated again (marginals in structured VI).
    """

    @staticmethod
    def forward(ctx, init, trans, unary, lengths, force_log):  # noqa: D401 - autograd API
        tables = scaled_forward(init, trans, unary, lengths, force_log)
        ctx.tables = tables
        ctx.force_log = force_log
        ctx.save_for_backward(init, trans, unary, lengths)
        return tables.log_z.clone()

    @staticmethod
    def backward(ctx, grad_out):
        init, trans, unary, lengths = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: a differentiable gradient
            return _reference_gradient(init, trans, unary, lengths, grad_out, needs)
        tables = ctx.tables
        ctx.tables = None  # drop our reference: the alpha table becomes unary's gradient, uncopied
        if tables is None or tables.consumed:  # a second backward (retain_graph=True): rebuild
            tables = scaled_forward(init, trans, unary, lengths, ctx.force_log)
        want_trans = bool(needs[1])
        g_init, g_trans, g_unary = scaled_backward(tables, init, trans, unary, lengths, grad_out, want_trans)
        del tables
        return (
            g_init if needs[0] else None,
            g_trans,
            g_unary if needs[2] else None,
            None,
            None,
        )


def _reference_gradient(init, trans, unary, lengths, grad_out, needs):
    """d (sum_b g_b log Z_b) by autograd through the reference recursion, with its graph kept."""
    inputs = [init, trans, unary]
    wanted = [i for i in range(3) if needs[i] and inputs[i] is not None]
    leaves = list(inputs)
    for i in wanted:  # tensors that do not require grad still get a (differentiable in g) gradient
        if not leaves[i].requires_grad:
            leaves[i] = leaves[i].detach().requires_grad_()
    log_z = ReferenceChain(leaves[0], leaves[1], leaves[2], lengths).log_partition()
    grads = torch.autograd.grad(log_z, [leaves[i] for i in wanted], grad_out, create_graph=True, allow_unused=True)
    out: list[torch.Tensor | None] = [None] * 5
    for i, g in zip(wanted, grads):
        out[i] = torch.zeros_like(inputs[i]) if g is None else g
    return tuple(out)


@torch.no_grad()
def log_filters(
    init: torch.Tensor | None, trans: torch.Tensor, unary: torch.Tensor, lengths: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """log of the forward filters (T, B, K), up to a per-(t, b) constant, and log Z (B,)."""
    tables = scaled_forward(init, trans, unary, lengths)
    la = torch.log(tables.alpha).transpose(0, 1)  # (T, B, K) view
    if tables.log_alpha_bad is not None:
        idx = tables.bad.nonzero().squeeze(1)
        la.index_copy_(1, idx, tables.log_alpha_bad)
    return la, tables.log_z
