"""The model side of the model x inference split.

A :class:`LatentVariableModel` is a joint p(x, z) = p(z) p(x | z). It never samples from
q itself and knows nothing of how it is trained; objectives in :mod:`latentlm.inference`
combine it with a posterior q(z | x).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from torch.distributions import Distribution

from latentlm.data.batching import Batch


class LatentVariableModel(nn.Module):
    """Interface every generative model implements.

    ``latent`` says what kind of z the model has: ``"none"`` (a plain LM, log p(x) exact),
    ``"continuous"``, ``"discrete"`` or ``"structured"``.
    """

    latent: ClassVar[str] = "none"
    #: name of the posterior family in ``latentlm.inference.POSTERIORS`` used when the
    #: config does not choose one; ``None`` for models without a latent.
    default_posterior: ClassVar[str | None] = None
    #: the size of z a posterior must produce (dimensions of a continuous code, K of a mixture);
    #: ``None`` where no posterior family needs it.
    latent_dim: int | None = None

    def prior(self) -> Distribution:
        """p(z), with an empty batch shape."""
        raise NotImplementedError(f"{type(self).__name__} has no latent variable")

    def log_likelihood(self, batch: Batch, z: torch.Tensor) -> torch.Tensor:
        """log p(x | z) in nats. ``z`` is (S, B, ...) — S samples per example; returns (S, B)."""
        raise NotImplementedError

    def log_marginal(self, batch: Batch) -> torch.Tensor:
        """Exact log p(x), (B,), for models where it is tractable."""
        raise NotImplementedError(f"{type(self).__name__} has no exact marginal likelihood")

    @property
    def has_exact_marginal(self) -> bool:
        return type(self).log_marginal is not LatentVariableModel.log_marginal

    @torch.no_grad()
    def generate(self, z: torch.Tensor | None, num: int, max_len: int = 50, greedy: bool = False) -> torch.Tensor:
        """Token ids (num, <= max_len) decoded given z (num, ...) or unconditionally."""
        raise NotImplementedError


class FiniteLatentModel(LatentVariableModel):
    """A model whose z takes one of K values (a finite mixture): it can score every value
    at once, so E_q[.] and log p(x) are exact sums over k (enumeration, exact evaluation,
    the estimator study's exact gradient). ``prior()`` is a ``Categorical`` over the K values.
    """

    latent: ClassVar[str] = "discrete"

    def log_likelihood_all(self, batch) -> torch.Tensor:  # pragma: no cover - interface
        """log p(x | z = k) for every k, (K, B)."""
        raise NotImplementedError
