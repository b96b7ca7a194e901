"""The inference side: posteriors q(z | x) and objectives.

Every objective returns the same :class:`ObjectiveOutput`, so training, evaluation and
reports share one code path whatever the model and the estimator.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from torch.distributions import Distribution

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


class Posterior(nn.Module):
    """An inference network (or per-instance table) mapping a batch to q(z | x).

    ``forward(batch)`` returns a ``torch.distributions.Distribution`` with batch shape (B,);
    ``rsample((S,))`` / ``sample((S,))`` give (S, B, ...) and ``log_prob`` (S, B).
    """

    def forward(self, batch: Batch) -> Distribution:  # pragma: no cover - interface
        raise NotImplementedError


class Objective(nn.Module):
    """A learning objective: one object per method (Pyro style), never an if/elif chain.

    Objectives are modules so that stateful parts (moving-average baselines, learned
    baselines, schedules) live in the checkpoint with the model.
    """

    #: True when the objective needs a posterior q(z | x).
    needs_posterior: bool = True

    def forward(
        self, model: LatentVariableModel, posterior: Posterior | None, batch: Batch, step: int = 0
    ) -> ObjectiveOutput:  # pragma: no cover - interface
        raise NotImplementedError
