"""Gradient estimators for the reconstruction term E_q[log p(x | z)].

Each returns ``(value, surrogate)``, both (B,): ``value`` is the Monte Carlo estimate used
for reporting; ``surrogate``'s gradient is the estimator (Pyro's surrogate trick:
report the true bound, differentiate the surrogate).
"""

from __future__ import annotations

import torch
from torch.distributions import Distribution

from latentlm.data.batching import Batch
from latentlm.models.base import LatentVariableModel


class Reparameterization:
    """z = g(eps, lambda): pathwise gradient, for Gaussians and flows (Kingma & Welling 2014)."""

    name = "reparam"

    def __call__(self, model: LatentVariableModel, q: Distribution, batch: Batch, samples: int):
        z = q.rsample((samples,))  # (S, B, ...)
        value = model.log_likelihood(batch, z).mean(0)  # (B,)
        return value, value, z


ESTIMATORS = {"reparam": Reparameterization}
