"""A linear-chain CRF as a ``torch.distributions.Distribution`` (torch-struct's interface).

The posterior family of structured inference networks: an encoder produces potentials,
this object answers every question about the distribution they define by the exact
chain dynamic programs of :mod:`latentlm.structured.chain`.
"""

from __future__ import annotations

import torch
from torch.distributions import Distribution

from latentlm.structured._engine import check_chain
from latentlm.structured.chain import (
    chain_entropy,
    chain_log_partition,
    chain_marginals,
    chain_sample,
    chain_score,
    chain_viterbi,
)


class LinearChainCRF(Distribution):
    """p(z) ∝ exp(init(z_1) + sum_t unary_t(z_t) + sum_t trans_t(z_{t-1}, z_t)), batch shape (B,).

    ``potentials`` (B, T-1, K, K) per-step edge scores [prev, next], or (K, K) shared (then
    ``unary`` is required to give B and T); ``unary`` (B, T, K) optional; ``init`` (K,) or
    (B, K) optional; ``lengths`` (B,). Samples and ``argmax`` are (…, B, T) long state ids
    with -1 on padding.
    """

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(
        self, potentials: torch.Tensor, unary: torch.Tensor | None = None, lengths: torch.Tensor | None = None,
        init: torch.Tensor | None = None,
    ):
        if unary is None:
            if potentials.dim() != 4:
                raise ValueError(f"without unary scores potentials must be (B, T-1, K, K), got {tuple(potentials.shape)}")
            B, Tm1, K, _ = potentials.shape
            unary = potentials.new_zeros(B, Tm1 + 1, K)
        self.potentials, self.unary, self.init = potentials, unary, init
        self.lengths = check_chain(init, potentials, unary, lengths)
        B, T, K = unary.shape
        super().__init__(batch_shape=torch.Size([B]), event_shape=torch.Size([T]), validate_args=False)

    @property
    def _args(self) -> tuple:
        return self.init, self.potentials, self.unary

    @property
    def partition(self) -> torch.Tensor:
        """log Z (B,)."""
        return chain_log_partition(*self._args, self.lengths)

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log p(z) for paths (…, B, T) -> (…, B)."""
        return chain_score(*self._args, value, self.lengths) - self.partition

    @property
    def marginals(self) -> torch.Tensor:
        """p(z_t = k) (B, T, K)."""
        return chain_marginals(*self._args, self.lengths)

    def edge_marginals(self) -> torch.Tensor:
        """p(z_{t-1} = i, z_t = j) (B, T-1, K, K)."""
        return chain_marginals(*self._args, self.lengths, pairwise=True)[1]

    @property
    def argmax(self) -> torch.Tensor:
        """The most likely path (B, T)."""
        return chain_viterbi(*self._args, self.lengths)[0]

    @property
    def max(self) -> torch.Tensor:
        """The best path's unnormalized score (B,)."""
        return chain_viterbi(*self._args, self.lengths)[1]

    def sample(self, sample_shape: torch.Size | tuple = torch.Size()) -> torch.Tensor:
        n = int(torch.Size(sample_shape).numel())
        z = chain_sample(*self._args, self.lengths, num_samples=max(n, 1))
        return z.reshape(*sample_shape, *z.shape[1:]) if len(sample_shape) else z[0]

    def entropy(self) -> torch.Tensor:
        return chain_entropy(*self._args, self.lengths)
