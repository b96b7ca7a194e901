"""The inference side: posteriors q(z | x) and objectives.

Every objective returns the same :class:`ObjectiveOutput`, so training, evaluation and
reports share one code path whatever the model and the estimator.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.distributions import Distribution, Independent, Normal

from latentlm.data.batching import Batch
from latentlm.models.base import LatentVariableModel


@dataclass
class ObjectiveOutput:
    """What one objective evaluation returns; per-example values are (B,) in nats."""

    loss: torch.Tensor                         # scalar to minimize (mean over examples)
    bound: torch.Tensor                        # (B,) the bound being optimized (or exact log p(x))
    reconstruction: torch.Tensor | None = None  # (B,) E_q log p(x | z)
    kl: torch.Tensor | None = None             # (B,) KL(q(z|x) || p(z)) (no free bits, no weight)
    log_marginal: torch.Tensor | None = None   # (B,) exact log p(x) when known
    tokens: torch.Tensor | None = None         # (B,) predicted tokens per example
    extras: dict[str, torch.Tensor] | None = None  # scalars to log (kl weight, baseline loss, ...)
    q: Distribution | None = None              # the q(z | x) the bound was computed with (for KL / MI / AU)


def diagonal_gaussian(mean: torch.Tensor, logvar: torch.Tensor) -> Independent:
    return Independent(Normal(mean, torch.exp(0.5 * logvar)), 1)


class Posterior(nn.Module):
    """An inference network (or per-instance table) mapping a batch to q(z | x).

    ``forward(batch)`` returns a ``torch.distributions.Distribution`` with batch shape (B,);
    ``rsample((S,))`` / ``sample((S,))`` give (S, B, ...) and ``log_prob`` (S, B).

    What else a family can do is declared by the subclass it derives from, never probed:
    :class:`GaussianPosterior` (a diagonal Gaussian with ``params``), :class:`FlowPosterior`
    (a Gaussian pushed through invertible maps), :class:`StructuredPosterior` (a discrete
    structure with an exact ``entropy``).
    """

    def forward(self, batch: Batch) -> Distribution:  # pragma: no cover - interface
        raise NotImplementedError


class GaussianPosterior(Posterior):
    """q(z | x) = N(mean, diag exp(logvar)). ``params(batch)`` -> (mean, logvar), (B, D) each.

    What semi-amortized refinement, SVI, the amortization gap and per-dimension free bits
    rely on: q is exactly the diagonal Gaussian of these parameters.
    """

    def params(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    def forward(self, batch: Batch) -> Independent:
        return diagonal_gaussian(*self.params(batch))


class FlowPosterior(Posterior):
    """q(z | x) = a diagonal Gaussian base pushed through x-dependent invertible maps.

    Not a :class:`GaussianPosterior`: its KL has no closed form and no per-dimension split,
    and refining it means refining every layer, so objectives that need a diagonal Gaussian
    refuse it with a :class:`~latentlm.errors.ConfigError`.
    """


class StructuredPosterior(Posterior):
    """q(z | x) over a discrete structure (a chain CRF, ...): ``sample`` and ``log_prob``,
    no ``rsample``, and an exact differentiable ``entropy()``. The ELBO uses the entropy in
    closed form and a score-function estimate for E_q[log p(x, z)]."""


class Objective(nn.Module):
    """A learning objective: one object per method (Pyro style), never an if/elif chain.

    Objectives are modules so that stateful parts (moving-average baselines, learned
    baselines, schedules) live in the checkpoint with the model.
    """

    #: True when the objective needs a posterior q(z | x).
    needs_posterior: bool = True

    def check(self, model: LatentVariableModel, posterior: Posterior | None) -> None:
        """Raise :class:`~latentlm.errors.ConfigError` when this objective cannot learn this
        pairing correctly (called by ``build_system`` before any training)."""

    def evaluation_posterior(self, model: LatentVariableModel, posterior: Posterior, batch: Batch) -> Distribution:
        """q(z | x) that evaluation (IS NLL, KL, MI, AU) uses: the encoder's, unless the
        objective refines it (SA-VAE, SVI override this)."""
        return posterior(batch)

    def forward(
        self, model: LatentVariableModel, posterior: Posterior | None, batch: Batch, step: int = 0
    ) -> ObjectiveOutput:  # pragma: no cover - interface
        raise NotImplementedError


class Learner(ABC):
    """How a system's parameters are updated from batches: one object per method, which the
    training loop calls (never an if/elif on the method's name inside the loop).

    The loop calls :meth:`start` once on a fresh run, :meth:`step` on every batch and
    :meth:`end_epoch` after the epoch's last batch; :meth:`state_dict` (JSON-able) goes into
    every checkpoint.
    """

    #: False for learners whose parameters change only at epoch ends (EM): the loop then
    #: checkpoints and validates only there, and a run resumed from a mid-epoch checkpoint
    #: restarts that epoch's E-step (the parameters it saw are those of the checkpoint).
    updates_every_step: bool = True
    #: False when no optimizer updates the parameters (closed-form EM): train.lr and its decay
    #: on plateaus then mean nothing, and a decayed learning rate does not stop the run.
    uses_optimizer: bool = True

    def start(self, dataset, batch_size: int) -> None:
        """Set-up before the first epoch of a fresh run (not on resume)."""

    @abstractmethod
    def step(self, batch, step: int, sample_batch=None) -> ObjectiveOutput:
        """Learn from one batch; return the objective's record for logging. ``sample_batch()``
        draws another training batch (the aggressive encoder phase needs it)."""

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        """Work at the epoch's end (EM's M-step); returns a metrics row to log (``stop``: a reason)."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass
