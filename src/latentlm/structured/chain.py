"""Exact inference on linear chains: HMMs and linear-chain CRFs.

Two spellings of one structure:

* **HMM form** — ``log_init`` (K,), ``log_trans`` (K, K) with row = previous state and
  column = next state, ``log_emit`` (B, T, K) = log p(x_t | z_t = k) already gathered at the
  observed words, so classical and neural emissions share one code path.
* **CRF form** — ``potentials`` (B, T-1, K, K), ``potentials[b, t-1, i, j]`` the score of
  z_{t-1} = i, z_t = j, plus optional ``unary`` (B, T, K).

Every function takes ``lengths`` (B,) (default: all T); positions t >= lengths[b] are padding
and are never read, whatever they hold (-inf, NaN). A row of length 0 has log Z = 0 and an
empty path. Everything is batched and vectorized over states; only time is a Python loop.

Posterior marginals are the gradient of log Z. ``hmm_log_likelihood`` / ``crf_log_partition``
have a hand-written backward pass (forward-backward inside an ``autograd.Function``, see
:mod:`latentlm.structured._engine`), so the gradient costs about as much memory as one more
copy of the emissions, instead of autograd's K x K tensor per step. When a gradient must
itself be differentiated (``create_graph=True``, or :func:`chain_marginals` of inputs that
require grad) the backward differentiates the plain semiring recursion of
:mod:`latentlm.structured.reference` instead, which is differentiable to any order.
:func:`chain_entropy` (with the expected scores and KL terms of
:mod:`latentlm.structured.expectations`) has a hand-written backward sweep too, so inference
networks train through it without a (B, T, K, K) tape. :class:`~latentlm.structured.reference.ReferenceChain` is the
specification all of these are tested against.
"""

from __future__ import annotations

import torch
from torch.autograd.function import once_differentiable

from latentlm.structured._engine import (
    ChainLogPartition,
    check_chain,
    log_filters,
    max_matvec,
    step_trans,
)
from latentlm.structured.expectations import chain_entropy

_METHODS = ("auto", "log")


def _force_log(method: str) -> bool:
    if method not in _METHODS:
        raise ValueError(f"method must be one of {_METHODS}, got {method!r}")
    return method == "log"


# ---- the generic chain -----------------------------------------------------------------


def chain_log_partition(
    init: torch.Tensor | None, trans: torch.Tensor, unary: torch.Tensor,
    lengths: torch.Tensor | None = None, method: str = "auto",
) -> torch.Tensor:
    """log Z (B,) of the chain (init, trans, unary); differentiable in all three.

    ``method="auto"`` runs the scaled-probability recursion (one matrix product per step) and
    redoes in log space only the rows that underflow; ``"log"`` forces log space everywhere.
    Both are exact; they differ in speed.
    """
    lengths = check_chain(init, trans, unary, lengths)
    return ChainLogPartition.apply(init, trans, unary, lengths, _force_log(method))


def chain_marginals(
    init: torch.Tensor | None, trans: torch.Tensor, unary: torch.Tensor,
    lengths: torch.Tensor | None = None, pairwise: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Posterior marginals as the gradient of log Z.

    Returns unary marginals (B, T, K) p(z_t = k | x), zero on padding; with ``pairwise`` also
    (B, T-1, K, K) p(z_{t-1} = i, z_t = j | x).

    If grad mode is on and an input requires grad, the marginals are differentiable (to any
    order) w.r.t. all inputs: they are then computed with ``create_graph=True``, which takes
    the autograd-able reference recursion (O(B K^2) memory per step). Otherwise the
    hand-written forward-backward computes them, with no graph.
    """
    lengths = check_chain(init, trans, unary, lengths)
    B, T, K = unary.shape
    diff = torch.is_grad_enabled() and any(x is not None and x.requires_grad for x in (init, trans, unary))

    def keep(x: torch.Tensor | None) -> torch.Tensor | None:  # no graph unless the marginals need one
        return x if diff or x is None else x.detach()

    with torch.enable_grad():
        u = keep(unary)
        if not u.requires_grad:
            u = u.detach().requires_grad_(True)
        tr = keep(trans)
        if pairwise:
            # The pairwise marginals are the gradient w.r.t. per-step transition scores.
            tr = tr.expand(B, max(T - 1, 0), K, K) if tr.dim() == 2 else tr
            if not tr.requires_grad:
                tr = tr.detach().requires_grad_(True)
        log_z = ChainLogPartition.apply(keep(init), tr, u, lengths, False)
        grads = torch.autograd.grad(log_z.sum(), [u, tr] if pairwise else [u], create_graph=diff)
    unary_m = grads[0].contiguous()
    return (unary_m, grads[1]) if pairwise else unary_m


@torch.no_grad()
def chain_viterbi(
    init: torch.Tensor | None, trans: torch.Tensor, unary: torch.Tensor, lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Highest-scoring path (B, T) long (-1 on padding) and its score (B,) (0 for empty rows)."""
    lengths = check_chain(init, trans, unary, lengths)
    B, T, K = unary.shape
    device = unary.device
    if T == 0:
        return torch.empty(B, 0, dtype=torch.long, device=device), unary.new_zeros(B)
    delta = unary[:, 0] if init is None else unary[:, 0] + init  # (B, K)
    back = torch.empty(T, B, K, dtype=torch.long, device=device)
    ident = torch.arange(K, device=device).expand(B, K)
    for t in range(1, T):
        best, arg = max_matvec(delta, step_trans(trans, t))
        valid = (t < lengths)[:, None]
        delta = torch.where(valid, best + unary[:, t], delta)
        back[t] = torch.where(valid, arg, ident)
    score, z = delta.max(-1)
    path = torch.empty(B, T, dtype=torch.long, device=device)
    for t in range(T - 1, -1, -1):
        path[:, t] = z
        if t > 0:
            z = back[t].gather(1, z.unsqueeze(1)).squeeze(1)
    mask = torch.arange(T, device=device)[None, :] < lengths[:, None]
    path.masked_fill_(~mask, -1)
    score = torch.where(lengths > 0, score, 0.0)
    return path, score


@torch.no_grad()
def chain_sample(
    init: torch.Tensor | None, trans: torch.Tensor, unary: torch.Tensor, lengths: torch.Tensor | None = None,
    num_samples: int = 1, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Exact samples from p(z | x) by forward filtering, backward sampling: (S, B, T), -1 on padding."""
    lengths = check_chain(init, trans, unary, lengths)
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    B, T, K = unary.shape
    S = num_samples
    la, _ = log_filters(init, trans, unary, lengths)  # (T, B, K) view
    out = torch.full((S, B, T), -1, dtype=torch.long, device=unary.device)
    z = torch.zeros(S, B, dtype=torch.long, device=unary.device)
    b_idx = torch.arange(B, device=unary.device)
    for t in range(T - 1, -1, -1):
        logits = la[t].expand(S, B, K)
        if t < T - 1:
            tr = step_trans(trans, t + 1)
            if tr.dim() == 2:
                col = tr.t()[z]  # (S, B, K): trans[:, z_{t+1}]
            else:
                col = tr[b_idx[None, :], :, z]  # (S, B, K)
            cont = (t < lengths - 1)[None, :, None]
            logits = torch.where(cont, logits + col, logits)
        u = torch.rand(S, B, K, dtype=unary.dtype, device=unary.device, generator=generator)
        gumbel = -torch.log(-torch.log(u))
        z_new = torch.argmax(logits + gumbel, dim=-1)  # (S, B)
        valid = (t < lengths)[None, :]
        z = torch.where(valid, z_new, z)
        out[:, :, t] = torch.where(valid, z_new, -1)
    return out


def chain_score(
    init: torch.Tensor | None, trans: torch.Tensor, unary: torch.Tensor, path: torch.Tensor,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Score of given paths: path (..., B, T) long -> (..., B); differentiable in the scores."""
    lengths = check_chain(init, trans, unary, lengths)
    B, T, K = unary.shape
    if path.shape[-2:] != (B, T):
        raise ValueError(f"paths must be (..., B, T) = (..., {B}, {T}), got {tuple(path.shape)}")
    mask = torch.arange(T, device=unary.device)[None, :] < lengths[:, None]  # (B, T)
    z = torch.where(mask, path, 0)
    lead = z.shape[:-2]
    u = unary.expand(*lead, B, T, K).gather(-1, z.unsqueeze(-1)).squeeze(-1)  # (..., B, T)
    total = torch.where(mask, u, 0.0).sum(-1)
    if init is not None and T > 0:
        ini = init.expand(*lead, B, K) if init.dim() == 1 else init.expand(*lead, B, K)
        first = ini.gather(-1, z[..., :1]).squeeze(-1)
        total = total + torch.where(lengths > 0, first, 0.0)
    if T > 1:
        prev, nxt = z[..., :-1], z[..., 1:]
        if trans.dim() == 2:
            tr = trans[prev, nxt]  # (..., B, T-1)
        else:
            b = torch.arange(B, device=unary.device)[:, None]
            s = torch.arange(T - 1, device=unary.device)[None, :]
            tr = trans[b, s, prev, nxt]
        total = total + torch.where(mask[:, 1:], tr, 0.0).sum(-1)
    return total


class _EmissionScores(torch.autograd.Function):
    """log_emit (K, V) gathered at words (B, T) -> (B, T, K), with a contiguous (K, V) gradient.

    Plain ``log_emit.t()[words]`` reads and accumulates through a transposed view, which
    costs more than the whole forward-backward at small K.
    """

    @staticmethod
    def forward(ctx, log_emit, words):
        ctx.save_for_backward(words)
        ctx.shape = log_emit.shape
        flat = words.reshape(-1)
        return log_emit.index_select(1, flat).t().reshape(*words.shape, log_emit.size(0))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        (words,) = ctx.saved_tensors
        K, V = ctx.shape
        out = grad.new_zeros(K, V).index_add_(1, words.reshape(-1), grad.reshape(-1, K).t())
        return out, None


def emission_scores(log_emit: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
    """``log_emit`` (K, V) at the observed ``words`` (B, T) long: the (B, T, K) HMM unary scores."""
    if log_emit.dim() != 2 or words.dim() != 2 or words.is_floating_point():
        raise ValueError(f"need log_emit (K, V) and integer words (B, T), got {tuple(log_emit.shape)} and {tuple(words.shape)} {words.dtype}")
    return _EmissionScores.apply(log_emit, words)


# ---- HMM spelling ----------------------------------------------------------------------


def hmm_log_likelihood(
    log_init: torch.Tensor, log_trans: torch.Tensor, log_emit: torch.Tensor,
    lengths: torch.Tensor | None = None, method: str = "auto",
) -> torch.Tensor:
    """log p(x_1..x_L) (B,) by the forward algorithm, with a memory-lean custom backward.

    log_init (K,) or (B, K); log_trans (K, K), row = previous state; log_emit (B, T, K) =
    log p(x_t | z_t = k) at the observed words. Gradients: d/d log_emit = posterior marginals.
    """
    return chain_log_partition(log_init, log_trans, log_emit, lengths, method)


def hmm_marginals(
    log_init: torch.Tensor, log_trans: torch.Tensor, log_emit: torch.Tensor,
    lengths: torch.Tensor | None = None, pairwise: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """p(z_t | x) (B, T, K) and, with ``pairwise``, p(z_{t-1}, z_t | x) (B, T-1, K, K)."""
    return chain_marginals(log_init, log_trans, log_emit, lengths, pairwise)


def hmm_viterbi(
    log_init: torch.Tensor, log_trans: torch.Tensor, log_emit: torch.Tensor, lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """argmax_z p(z, x): states (B, T) long (-1 on padding) and log p(z*, x) (B,)."""
    return chain_viterbi(log_init, log_trans, log_emit, lengths)


def hmm_sample(
    log_init: torch.Tensor, log_trans: torch.Tensor, log_emit: torch.Tensor, lengths: torch.Tensor | None = None,
    num_samples: int = 1, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Exact posterior samples z ~ p(z | x): (S, B, T) long, -1 on padding."""
    return chain_sample(log_init, log_trans, log_emit, lengths, num_samples, generator)


def hmm_entropy(
    log_init: torch.Tensor, log_trans: torch.Tensor, log_emit: torch.Tensor, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """H[p(z | x)] (B,) in nats; differentiable."""
    return chain_entropy(log_init, log_trans, log_emit, lengths)


# ---- CRF spelling ----------------------------------------------------------------------


def _crf_unary(potentials: torch.Tensor, unary: torch.Tensor | None) -> torch.Tensor:
    if potentials.dim() != 4 or potentials.size(-1) != potentials.size(-2):
        raise ValueError(f"potentials must be (B, T-1, K, K), got {tuple(potentials.shape)}")
    B, Tm1, K, _ = potentials.shape
    if unary is None:
        return potentials.new_zeros(B, Tm1 + 1, K)
    if unary.shape != (B, Tm1 + 1, K):
        raise ValueError(
            f"unary must be (B, T, K) = ({B}, {Tm1 + 1}, {K}) for potentials {tuple(potentials.shape)}, "
            f"got {tuple(unary.shape)}"
        )
    return unary


def crf_log_partition(
    potentials: torch.Tensor, unary: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
    method: str = "auto",
) -> torch.Tensor:
    """log Z (B,) of a linear-chain CRF; potentials (B, T-1, K, K) [prev, next], unary (B, T, K)."""
    return chain_log_partition(None, potentials, _crf_unary(potentials, unary), lengths, method)


def crf_marginals(
    potentials: torch.Tensor, unary: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
    pairwise: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Unary marginals (B, T, K) and, with ``pairwise``, edge marginals (B, T-1, K, K)."""
    return chain_marginals(None, potentials, _crf_unary(potentials, unary), lengths, pairwise)


def crf_viterbi(
    potentials: torch.Tensor, unary: torch.Tensor | None = None, lengths: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Best path (B, T) (-1 on padding) and its score (B,)."""
    return chain_viterbi(None, potentials, _crf_unary(potentials, unary), lengths)


def crf_sample(
    potentials: torch.Tensor, unary: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
    num_samples: int = 1, generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Exact samples (S, B, T), -1 on padding."""
    return chain_sample(None, potentials, _crf_unary(potentials, unary), lengths, num_samples, generator)


def crf_entropy(
    potentials: torch.Tensor, unary: torch.Tensor | None = None, lengths: torch.Tensor | None = None
) -> torch.Tensor:
    """Entropy (B,) of the CRF distribution; differentiable."""
    return chain_entropy(None, potentials, _crf_unary(potentials, unary), lengths)


def crf_score(
    potentials: torch.Tensor, path: torch.Tensor, unary: torch.Tensor | None = None,
    lengths: torch.Tensor | None = None,
) -> torch.Tensor:
    """Unnormalized score of paths (..., B, T) -> (..., B)."""
    return chain_score(None, potentials, _crf_unary(potentials, unary), path, lengths)


__all__ = [
    "chain_log_partition", "chain_marginals", "chain_viterbi", "chain_sample", "chain_entropy", "chain_score",
    "emission_scores", "hmm_log_likelihood", "hmm_marginals", "hmm_viterbi", "hmm_sample", "hmm_entropy",
    "crf_log_partition", "crf_marginals", "crf_viterbi", "crf_sample", "crf_entropy", "crf_score",
]
