"""L4/L5/L9: the evidence lower bound with a pluggable estimator, KL weight schedule and free bits."""

from __future__ import annotations

import math

import torch

from latentlm.errors import ConfigError
from latentlm.inference.base import Objective, ObjectiveOutput
from latentlm.inference.estimators import ESTIMATORS
from latentlm.inference.kl import free_bits, kl_divergence_mc, kl_per_dimension
from latentlm.inference.schedules import make_schedule


class ELBO(Objective):
    """E_q[log p(x|z)] - beta(step) * KL(q || p), optionally with free bits.

    ``bound`` is always the true ELBO (beta = 1, no floor); only the loss is annealed.
    """

    def __init__(self, samples: int = 1, estimator: str = "reparam", kl_schedule=None,
                 free_bits: float = 0.0, free_bits_per_dimension: bool = True):
        super().__init__()
        if estimator not in ESTIMATORS:
            raise ConfigError(f"unknown estimator {estimator!r}; choose one of {sorted(ESTIMATORS)}")
        self.samples = samples
        self.estimator = ESTIMATORS[estimator]()
        self.kl_schedule = make_schedule(kl_schedule)
        self.free_bits, self.free_bits_per_dimension = free_bits, free_bits_per_dimension

    def forward(self, model, posterior, batch, step: int = 0) -> ObjectiveOutput:
        q, p = posterior(batch), model.prior()
        rec, surrogate, z = self.estimator(model, q, batch, self.samples)
        kl_dims = kl_per_dimension(q, p)  # (B, D) or None
        kl = kl_dims.sum(-1) if kl_dims is not None else kl_divergence_mc(q, p, z)
        penalty = free_bits(kl_dims if kl_dims is not None else kl[:, None], self.free_bits,
                            self.free_bits_per_dimension)
        beta = self.kl_schedule(step)
        loss = -surrogate.mean() + beta * penalty
        return ObjectiveOutput(loss=loss, bound=rec - kl, reconstruction=rec, kl=kl, tokens=batch.lengths,
                               extras={"kl_weight": torch.tensor(beta)})


class IWAE(Objective):
    """L6: importance-weighted bound log (1/k) sum_k p(x, z_k) / q(z_k | x) (Burda et al. 2016)."""

    def __init__(self, samples: int = 5):
        super().__init__()
        self.samples = samples

    def forward(self, model, posterior, batch, step: int = 0) -> ObjectiveOutput:
        q, p = posterior(batch), model.prior()
        z = q.rsample((self.samples,))  # (k, B, D)
        log_px_z = model.log_likelihood(batch, z)  # (k, B)
        log_w = log_px_z + p.log_prob(z) - q.log_prob(z)
        bound = torch.logsumexp(log_w, 0) - math.log(self.samples)
        kl = kl_divergence_mc(q, p, z)
        return ObjectiveOutput(loss=-bound.mean(), bound=bound, reconstruction=log_px_z.mean(0), kl=kl,
                               tokens=batch.lengths)
