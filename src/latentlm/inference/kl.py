"""KL terms: closed form when torch.distributions knows it, Monte Carlo otherwise; free bits."""

from __future__ import annotations

import torch
from torch.distributions import Distribution, Independent, kl_divergence


def kl_per_dimension(q: Distribution, p: Distribution) -> torch.Tensor | None:
    """Closed-form KL per latent dimension, (B, D), for factorized q and p; else None."""
    if isinstance(q, Independent) and isinstance(p, Independent):
        try:
            return kl_divergence(q.base_dist, p.base_dist)
        except NotImplementedError:
            return None
    return None


def kl_divergence_mc(q: Distribution, p: Distribution, z: torch.Tensor) -> torch.Tensor:
    """KL(q || p) per example, (B,): closed form if known, else mean over samples z (S, B, ...)."""
    try:
        return kl_divergence(q, p)
    except NotImplementedError:
        return (q.log_prob(z) - p.log_prob(z)).mean(0)


def free_bits(kl_dims: torch.Tensor, floor: float, per_dimension: bool = True) -> torch.Tensor:
    """Batch-level KL penalty with a floor (Kingma et al. 2016): sum_d max(floor, mean_b KL_bd).

    Below the floor the penalty is constant, so its gradient is zero there and the encoder
    is free to encode up to ``floor`` nats per dimension (or in total) at no cost.
    ``kl_dims`` is (B, D); returns a scalar, the penalty per example.
    """
    if floor <= 0:
        return kl_dims.sum(-1).mean()
    if per_dimension:
        return kl_dims.mean(0).clamp(min=floor).sum()
    return kl_dims.sum(-1).mean().clamp(min=floor)
