"""The reference semi-Markov program: one plain segment recursion over an abstract semiring.

A *segmentation* of a sequence of length L cuts positions 0..L-1 into consecutive segments
(start s, length d in 1..D, state k); its score is

    init(k_1) + sum_j seg(s_j, d_j, k_j) + sum_{j>1} trans(k_{j-1}, k_j),

with ``seg`` (B, T, D, K): ``seg[b, s, d-1, k]`` scores the segment covering s..s+d-1 in
state k (a hidden semi-Markov model puts the duration and the words' log-probabilities
there). Every question is the forward recursion over segment *ends*

    A_0(k)  = init(k)                                    entering a segment that starts at 0
    a_e(k)  = ⊕_{d=1..min(D,e)} A_{e-d}(k) ⊗ seg(e-d, d, k)   a segment in state k ends at e
    A_s(k)  = ⊕_i a_s(i) ⊗ trans(i, k)                   entering a segment that starts at s > 0
    answer  = ⊕_k a_L(k)

read in a semiring of :mod:`latentlm.structured.reference` (log: log Z and, as its gradient,
the segment marginals; max: Viterbi; sample: exact samples; entropy). Plain autograd,
batched over ragged lengths, differentiable to any order — the specification the fast
kernels of :mod:`latentlm.structured.semimarkov` are tested against, itself tested against
enumeration of all segmentations. It keeps (B, D, K) and (B, K, K) tensors per step on the
autograd tape: slow, for tests and small sizes.
"""

from __future__ import annotations

import torch

from latentlm.structured.reference import EntropySemiring, LogSemiring, MaxSemiring, SampleSemiring, Semiring


def semimarkov_semiring_dp(
    semiring: Semiring, init: torch.Tensor | None, trans: torch.Tensor, seg: torch.Tensor, lengths: torch.Tensor,
) -> torch.Tensor:
    """⊕ over all segmentations (size, B): ``seg`` (S, B, T, D, K), ``trans`` (S, K, K),
    ``init`` None / (S, K) / (S, B, K), ``lengths`` (B,) long; S is the semiring dimension.
    Segments reaching past a row's length are never read (replaced by the ⊕-identity's
    log-weight -inf through a mask, so padding may hold anything); a row of length 0 gives
    the ⊗-identity."""
    S, B, T, D, K = seg.shape
    if T == 0:
        return seg.sum(dim=(-3, -2, -1))
    ends = torch.arange(T, device=seg.device)[:, None] + torch.arange(1, D + 1, device=seg.device)[None, :]  # (T, D)
    fits = ends[None] <= lengths[:, None, None]  # (B, T, D)
    # The ⊕-identity: log-weight -inf in the first component (any semiring here reads it as "no path").
    zero = semiring.lift(*([torch.full((), -torch.inf, dtype=seg.dtype, device=seg.device)] * semiring.chains))
    zero = zero.reshape(S, 1, 1, 1, 1)  # (-inf, 0) for entropy: no path, and no entropy term
    seg = torch.where(fits[None, ..., None], seg, zero)
    if init is None:
        start = torch.zeros(S, B, K, dtype=seg.dtype, device=seg.device)
    else:
        start = init if init.dim() == 3 else init.unsqueeze(1).expand(S, B, K)
    enter = [start]  # A_s (S, B, K) for s = 0..
    alphas = [None]  # a_e (S, B, K) for e = 1..
    for e in range(1, T + 1):
        ds = range(1, min(D, e) + 1)
        cand = torch.stack([semiring.times(enter[e - d], seg[:, :, e - d, d - 1]) for d in ds], dim=-2)  # (S, B, d, K)
        alpha = semiring.sum(cand, dim=-2)
        alphas.append(alpha)
        if e < T:
            enter.append(semiring.sum(semiring.times(alpha.unsqueeze(-1), trans.unsqueeze(1)), dim=-2))
    stacked = torch.stack(alphas[1:], dim=2)  # (S, B, T, K)
    last = stacked.gather(2, (lengths - 1).clamp_min(0).view(1, B, 1, 1).expand(S, B, 1, K)).squeeze(2)
    total = semiring.sum(last, dim=-1)  # (S, B)
    return torch.where(lengths > 0, total, 0.0)


class ReferenceSemiMarkov:
    """A batch of semi-Markov chains solved by :func:`semimarkov_semiring_dp`.

    ``init`` (K,) / (B, K) / None, ``trans`` (K, K) [prev, next], ``seg`` (B, T, D, K),
    ``lengths`` (B,) (default all T): the arguments of
    :func:`latentlm.structured.semimarkov_log_partition`.
    """

    def __init__(self, init: torch.Tensor | None, trans: torch.Tensor, seg: torch.Tensor,
                 lengths: torch.Tensor | None = None):
        B, T, D, K = seg.shape
        if trans.shape != (K, K):
            raise ValueError(f"trans must be (K, K) for seg {tuple(seg.shape)}, got {tuple(trans.shape)}")
        if init is not None and init.shape not in ((K,), (B, K)):
            raise ValueError(f"init must be (K,) or (B, K) for seg {tuple(seg.shape)}, got {tuple(init.shape)}")
        self.init, self.trans, self.seg = init, trans, seg
        self.lengths = (torch.full((B,), T, dtype=torch.long, device=seg.device) if lengths is None
                        else torch.as_tensor(lengths, device=seg.device).long())

    def _run(self, semiring: Semiring, seg: torch.Tensor | None = None) -> torch.Tensor:
        seg = self.seg if seg is None else seg
        lift = semiring.lift
        init = None if self.init is None else lift(self.init)
        return semimarkov_semiring_dp(semiring, init, lift(self.trans), lift(seg), self.lengths)

    def log_partition(self) -> torch.Tensor:
        """log Z (B,)."""
        return self._run(LogSemiring())[0]

    def entropy(self) -> torch.Tensor:
        """H[p] over segmentations (B,) in nats."""
        return self._run(EntropySemiring())[1]

    def marginals(self, create_graph: bool = True) -> torch.Tensor:
        """p(a segment starts at s, has length d, state k) (B, T, D, K) = d log Z / d seg."""
        with torch.enable_grad():
            seg = self.seg if self.seg.requires_grad else self.seg.detach().requires_grad_()
            log_z = self._run(LogSemiring(), seg)[0]
            (g,) = torch.autograd.grad(log_z.sum(), [seg], create_graph=create_graph)
        return g

    def _one_hot_paths(self, semiring: Semiring, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, D, K = self.seg.shape
        init = None if self.init is None else (self.init.detach() if self.init.dim() == 1
                                               else self.init.detach().repeat(batch, 1))
        with torch.enable_grad():
            seg = self.seg.detach().repeat(batch, 1, 1, 1).requires_grad_()
            lift = semiring.lift
            value = semimarkov_semiring_dp(semiring, None if init is None else lift(init), lift(self.trans.detach()),
                                           lift(seg), self.lengths.repeat(batch))[0]
            (onehot,) = torch.autograd.grad(value.sum(), [seg])
        return value.detach().reshape(batch, B), onehot.reshape(batch, B, T, D, K)

    def viterbi(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The best segmentation as segment indicators (B, T, D, K) (1 where a segment of the
        best segmentation starts at s with length d and state k) and its score (B,)."""
        score, onehot = self._one_hot_paths(MaxSemiring(), 1)
        return onehot[0], score[0]

    def sample(self, num_samples: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
        """Exact samples as segment indicators (S, B, T, D, K)."""
        return self._one_hot_paths(SampleSemiring(generator), num_samples)[1]


__all__ = ["semimarkov_semiring_dp", "ReferenceSemiMarkov"]
