"""The reference linear-chain program: one plain recursion over an abstract semiring.

Every question about a chain p(z) ∝ exp(init(z_1) + sum_t unary_t(z_t) + sum_t trans_t(z_{t-1}, z_t))
is the same forward recursion

    alpha_1(j) = init(j) ⊗ unary_1(j)
    alpha_t(j) = [ ⊕_i alpha_{t-1}(i) ⊗ trans_t(i, j) ] ⊗ unary_t(j)
    answer     = ⊕_j alpha_L(j)

read in another semiring (⊕, ⊗):

=================== ============================ ===========================================
semiring            element                      answer, and what its autograd gradient is
=================== ============================ ===========================================
``LogSemiring``     log-weight                   log Z; gradient = posterior marginals
``MaxSemiring``     log-weight                   best score; gradient = the argmax path
``SampleSemiring``  log-weight                   log Z; gradient = one exact sample (FFBS)
``EntropySemiring`` (log-weight, entropy)        H[p]
``KLSemiring``      (log-weight p, q, KL)        KL(p || q) for two chains of one shape
=================== ============================ ===========================================

It is written once (:func:`chain_semiring_dp`), batched over sentences with ragged lengths,
and uses only differentiable torch operations, so marginals, entropies and KLs are
differentiable to any order. It is the *specification*: the fast kernels of
:mod:`latentlm.structured.chain` (scaled forward-backward, hand-written gradient) are tested
against it, and it is tested against brute-force enumeration. It is slow (autograd keeps a
(B, K, K) tensor per step) and meant for tests, small K, and higher derivatives; the fast
kernels fall back to it when a caller differentiates a gradient (``create_graph=True``).

Semiring values carry a leading *semiring dimension* of size ``semiring.size`` (1 for the
scalar semirings, 2 for entropy, 3 for KL). ⊗ is elementwise addition for every semiring
here (log-weights add, entropies and KLs of independent parts add), so only ⊕ — a reduction
over one dimension — differs between them.
"""

from __future__ import annotations

import torch

# ---- ⊕ helpers that stay NaN-free under -inf, also in their derivatives ------------------


def _logsumexp(x: torch.Tensor, dim: int) -> torch.Tensor:
    """log sum exp over ``dim``; -inf for an all -inf slice, with zero (not NaN) gradients there."""
    m = x.detach().amax(dim, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros((), dtype=x.dtype, device=x.device))
    s = torch.exp(x - m).sum(dim)
    empty = s == 0
    out = torch.log(torch.where(empty, torch.ones((), dtype=s.dtype, device=s.device), s)) + m.squeeze(dim)
    return torch.where(empty, torch.full((), -torch.inf, dtype=s.dtype, device=s.device), out)


def _log_normalize(a: torch.Tensor, dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(log sum exp a, a - that): -inf total gives all -inf log-probabilities, no NaN."""
    total = _logsumexp(a, dim)
    shift = torch.where(torch.isfinite(total), total, torch.zeros((), dtype=a.dtype, device=a.device))
    return total, a - shift.unsqueeze(dim)


# ---- semirings ---------------------------------------------------------------------------


class Semiring:
    """⊕ (``sum`` over a dimension) and ⊗ (elementwise ``+``) on values (size, ...)."""

    size = 1  # length of the leading semiring dimension
    chains = 1  # how many raw score tensors ``lift`` takes

    def lift(self, *scores: torch.Tensor) -> torch.Tensor:
        """Raw log-potentials -> semiring values with a leading semiring dimension."""
        (s,) = scores
        return s.unsqueeze(0)

    def sum(self, x: torch.Tensor, dim: int) -> torch.Tensor:  # pragma: no cover - abstract
        """⊕ over ``dim``, a negative index (so it names the same dimension with or without
        the leading semiring dimension)."""
        raise NotImplementedError

    @staticmethod
    def times(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """⊗: elementwise addition, for every semiring here."""
        return a + b


class LogSemiring(Semiring):
    """(logsumexp, +): the answer is log Z and its gradient the marginals."""

    def sum(self, x, dim):
        return _logsumexp(x, dim)


class MaxSemiring(Semiring):
    """(max, +): Viterbi. ``max`` sends the gradient to one maximizer, so d score / d unary is
    the best path as one-hot vectors."""

    def sum(self, x, dim):
        return x.max(dim).values


class _SampledLogSumExp(torch.autograd.Function):
    """logsumexp forward; backward draws i ~ softmax(x) and routes the incoming gradient to it."""

    @staticmethod
    def forward(ctx, x, dim, generator):
        ctx.save_for_backward(x)
        ctx.dim, ctx.generator = dim, generator
        return torch.logsumexp(x, dim)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        u = torch.rand(x.shape, dtype=x.dtype, device=x.device, generator=ctx.generator)
        u = u.clamp_min(torch.finfo(x.dtype).tiny)
        pick = (x - torch.log(-torch.log(u))).argmax(ctx.dim, keepdim=True)  # Gumbel-max
        onehot = torch.zeros_like(x).scatter_(ctx.dim, pick, 1.0)
        return onehot * grad.unsqueeze(ctx.dim), None, None


class SampleSemiring(Semiring):
    """log Z forward; the backward pass samples, so d log Z / d unary is one exact posterior
    path (forward filtering, backward sampling) as one-hot vectors."""

    def __init__(self, generator: torch.Generator | None = None):
        self.generator = generator

    def sum(self, x, dim):
        return _SampledLogSumExp.apply(x, dim, self.generator)


class EntropySemiring(Semiring):
    """Elements (a, h): total log-weight a of a set of paths and the entropy h of the
    distribution they define once normalized. ⊗ adds both (independent parts);
    ⊕_i gives (log sum_i e^{a_i}, sum_i p_i (h_i - log p_i)) with p = softmax(a), the chain
    rule of entropy. Potentials lift to (score, 0)."""

    size = 2

    def lift(self, *scores):
        (s,) = scores
        return torch.stack([s, torch.zeros_like(s)])

    def sum(self, x, dim):
        a, h = x[0], x[1]
        total, logp = _log_normalize(a, dim)
        p = logp.exp()
        logp = torch.where(p > 0, logp, torch.zeros((), dtype=a.dtype, device=a.device))
        return torch.stack([total, (p * (h - logp)).sum(dim)])


class KLSemiring(Semiring):
    """Elements (a, b, k): log-weights of a set of paths under p and under q, and
    KL(p || q) between their normalizations. ⊗ adds all three; ⊕_i gives
    (lse a, lse b, sum_i p_i (k_i + log p_i - log q_i)), the chain rule of KL.
    Potentials lift to (score_p, score_q, 0)."""

    size = 3
    chains = 2

    def lift(self, *scores):
        sp, sq = scores
        return torch.stack([sp, sq, torch.zeros_like(sp)])

    def sum(self, x, dim):
        a, b, k = x[0], x[1], x[2]
        total_p, logp = _log_normalize(a, dim)
        total_q, logq = _log_normalize(b, dim)
        p = logp.exp()
        zero = torch.zeros((), dtype=a.dtype, device=a.device)
        on = p > 0  # terms with p_i = 0 contribute 0 (and no NaN gradient)
        kl = (p * (k + torch.where(on, logp, zero) - torch.where(on, logq, zero))).sum(dim)
        return torch.stack([total_p, total_q, kl])


# ---- the recursion -----------------------------------------------------------------------


def chain_semiring_dp(
    semiring: Semiring, init: torch.Tensor | None, trans: torch.Tensor, unary: torch.Tensor,
    lengths: torch.Tensor,
) -> torch.Tensor:
    """The one chain recursion: semiring values in, ⊕ over all paths (size, B) out.

    ``unary`` (S, B, T, K); ``trans`` (S, K, K) shared or (S, B, T-1, K, K) per step,
    [prev, next]; ``init`` None, (S, K) or (S, B, K); ``lengths`` (B,) long. S is the
    semiring dimension. Positions t >= lengths[b] are replaced by the ⊗-identity before use
    (so NaN padding is never read, in either pass); a row of length 0 gives the identity.
    """
    S, B, T, K = unary.shape
    if T == 0:
        return unary.sum(dim=(-2, -1))  # the empty sum, 0 = the ⊗-identity, still on the graph
    shared = trans.dim() == 3
    mask = torch.arange(T, device=unary.device)[None, :] < lengths[:, None]  # (B, T)
    unary = torch.where(mask[..., None], unary, 0.0)
    alpha = unary[:, :, 0]  # (S, B, K)
    if init is not None:
        alpha = semiring.times(alpha, init if init.dim() == 3 else init.unsqueeze(1))
    for t in range(1, T):
        valid = (t < lengths)[:, None]  # (B, 1)
        if shared:
            step = trans.unsqueeze(1)  # (S, 1, K, K)
        else:
            step = torch.where(valid[..., None], trans[:, :, t - 1], 0.0)  # (S, B, K, K)
        new = semiring.times(semiring.sum(semiring.times(alpha.unsqueeze(-1), step), dim=-2), unary[:, :, t])
        alpha = torch.where(valid, new, alpha)
    total = semiring.sum(alpha, dim=-1)  # (S, B)
    return torch.where(lengths > 0, total, 0.0)


class ReferenceChain:
    """A batch of linear chains solved by :func:`chain_semiring_dp`: the reference the fast
    chain kernels are tested against.

    ``init`` (K,) / (B, K) / None, ``trans`` (K, K) shared or (B, T-1, K, K) per step with
    row = previous state, ``unary`` (B, T, K), ``lengths`` (B,) (default all T) — the
    arguments of :func:`latentlm.structured.chain_log_partition`. Every method is plain
    autograd: differentiable to any order, exact for -inf scores (no NaN in values or
    gradients of possible rows), and O(B K^2) memory per step.
    """

    def __init__(
        self, init: torch.Tensor | None, trans: torch.Tensor, unary: torch.Tensor,
        lengths: torch.Tensor | None = None,
    ):
        B, T, K = unary.shape
        if trans.shape not in ((K, K), (B, max(T - 1, 0), K, K)):
            raise ValueError(f"trans must be (K, K) or (B, T-1, K, K) for unary {tuple(unary.shape)}, got {tuple(trans.shape)}")
        if init is not None and init.shape not in ((K,), (B, K)):
            raise ValueError(f"init must be (K,) or (B, K) for unary {tuple(unary.shape)}, got {tuple(init.shape)}")
        self.init, self.trans, self.unary = init, trans, unary
        self.lengths = (torch.full((B,), T, dtype=torch.long, device=unary.device) if lengths is None
                        else torch.as_tensor(lengths, device=unary.device).long())

    def _run(self, semiring: Semiring, *chains: ReferenceChain) -> torch.Tensor:
        chains = (self,) + chains
        lift = semiring.lift
        init = None if self.init is None else lift(*(c.init for c in chains))
        return chain_semiring_dp(semiring, init, lift(*(c.trans for c in chains)),
                                 lift(*(c.unary for c in chains)), self.lengths)

    def log_partition(self) -> torch.Tensor:
        """log Z (B,)."""
        return self._run(LogSemiring())[0]

    def marginals(self, pairwise: bool = False, create_graph: bool = True):
        """p(z_t = k) (B, T, K), zero on padding, as d log Z / d unary (with ``create_graph``
        the marginals are themselves differentiable); with ``pairwise`` also
        p(z_{t-1} = i, z_t = j) (B, T-1, K, K)."""
        B, T, K = self.unary.shape
        with torch.enable_grad():
            u = self.unary if self.unary.requires_grad else self.unary.detach().requires_grad_()
            tr = self.trans
            if pairwise:
                tr = tr.expand(B, max(T - 1, 0), K, K) if tr.dim() == 2 else tr
                if not tr.requires_grad:
                    tr = tr.detach().requires_grad_()
            chain = ReferenceChain(self.init, tr, u, self.lengths)
            log_z = chain.log_partition()
            grads = torch.autograd.grad(log_z.sum(), [u, tr] if pairwise else [u], create_graph=create_graph,
                                        allow_unused=True)
        grads = [torch.zeros_like(x) if g is None else g for g, x in zip(grads, [u, tr])]
        return (grads[0], grads[1]) if pairwise else grads[0]

    def _path_from_gradient(self, semiring: Semiring, batch: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
        """Run ``semiring`` on ``batch`` copies of every row; (answer (batch, B), path (batch, B, T))."""
        B, T, K = self.unary.shape

        def rows(x: torch.Tensor) -> torch.Tensor:  # per-row tensors: copy c of row b at c B + b
            return x.detach().repeat(batch, *([1] * (x.dim() - 1)))

        init = None if self.init is None else (self.init.detach() if self.init.dim() == 1 else rows(self.init))
        trans = self.trans.detach() if self.trans.dim() == 2 else rows(self.trans)
        with torch.enable_grad():
            u = rows(self.unary).requires_grad_()
            lift = semiring.lift
            value = chain_semiring_dp(semiring, None if init is None else lift(init), lift(trans), lift(u),
                                      self.lengths.repeat(batch))[0]
            (onehot,) = torch.autograd.grad(value.sum(), [u])
        mask = torch.arange(T, device=u.device)[None, :] < self.lengths.repeat(batch)[:, None]
        path = torch.where(mask, onehot.argmax(-1), -1)
        return value.detach().reshape(batch, B), path.reshape(batch, B, T)

    def viterbi(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Best path (B, T) long (-1 on padding) and its score (B,) (0 for empty rows)."""
        score, path = self._path_from_gradient(MaxSemiring())
        return path[0], score[0]

    def max(self) -> torch.Tensor:
        """The best path's score (B,), differentiable (subgradient: the best path's indicators)."""
        return self._run(MaxSemiring())[0]

    def sample(self, num_samples: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """Exact samples from p(z) (S, B, T) long, -1 on padding."""
        return self._path_from_gradient(SampleSemiring(generator), num_samples)[1]

    def entropy(self) -> torch.Tensor:
        """H[p] (B,) in nats."""
        return self._run(EntropySemiring())[1]

    def kl(self, other: ReferenceChain) -> torch.Tensor:
        """KL(self || other) (B,) for a chain ``other`` of the same shape, lengths and init presence."""
        if other.unary.shape != self.unary.shape or other.trans.shape != self.trans.shape or (
                (other.init is None) != (self.init is None)):
            raise ValueError("KL needs two chains of the same structure (shapes and init presence)")
        if not torch.equal(other.lengths, self.lengths):
            raise ValueError("KL needs two chains with the same lengths")
        init_p, init_q = self.init, other.init
        if init_p is not None and init_p.shape != init_q.shape:  # (K,) vs (B, K): broadcast both
            B = self.unary.shape[0]
            init_p, init_q = init_p.expand(B, -1), init_q.expand(B, -1)
        p = ReferenceChain(init_p, self.trans, self.unary, self.lengths)
        q = ReferenceChain(init_q, other.trans, other.unary, other.lengths)
        return p._run(KLSemiring(), q)[2]


__all__ = [
    "Semiring", "LogSemiring", "MaxSemiring", "SampleSemiring", "EntropySemiring", "KLSemiring",
    "chain_semiring_dp", "ReferenceChain",
]
