"""The model side of the model x inference split.

A :class:`LatentVariableModel` is a joint p(x, z) = p(z) p(x | z). It never samples from
q itself and knows nothing of how it is trained; objectives in :mod:`latentlm.inference`
combine it with a posterior q(z | x).
"""

from __future__ import annotations

import functools
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

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

    def log_likelihood_of(self, batch: Batch) -> Callable[[torch.Tensor], torch.Tensor]:
        """z (S, B, ...) -> log p(x | z) (S, B) for one batch and many draws of z (importance
        sampling calls it chunk after chunk): a model may compute once what depends on x alone.
        By default, :meth:`log_likelihood` on each call."""
        return functools.partial(self.log_likelihood, batch)

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
# ---- declared capabilities of models that EM can learn -------------------------------------


@dataclass
class EStep:
    """One batch's exact E-step: expected sufficient statistics summed over the batch and the
    per-example log-likelihood. ``objective`` (B,) is the E-step's free energy term: log p(x)
    itself at temperature 1; under deterministic annealing (1/beta) log sum_z p(x, z)^beta."""

    counts: dict[str, torch.Tensor]
    log_likelihood: torch.Tensor  # (B,) log p(x) in nats at the current parameters
    objective: torch.Tensor       # (B,)


class ExpectedCounts(ABC):
    """A model whose posterior p(z | x) is exact and summarized by expected counts: the
    E-step of EM and generalized EM. Mix into a :class:`LatentVariableModel`."""

    #: whether ``expected_counts`` accepts a temperature other than 1 (deterministic annealing)
    supports_annealing: ClassVar[bool] = False

    @abstractmethod
    def expected_counts(self, batch, temperature: float | torch.Tensor = 1.0) -> EStep:
        """Statistics under p(z | x)^temperature (normalized); ``temperature`` a float or (B,)."""

    def log_prior(self, **prior: Any) -> float:
        """log p(theta) up to a constant, so that log p(X) + log p(theta) never decreases."""
        return 0.0


class ClosedFormEM(ExpectedCounts):
    """A model whose M-step is closed form (MAP under symmetric Dirichlet pseudo-counts ``prior``).

    ``prior`` keyword arguments are the model's own (e.g. ``smoothing``), passed through from
    the config's ``train.em`` section.
    """

    @abstractmethod
    def m_step(self, counts: dict[str, torch.Tensor], **prior: Any) -> None:
        """Overwrite the parameters with the maximizer of the expected complete log-likelihood."""

    def initial_counts(self, batch, generator: torch.Generator) -> dict[str, torch.Tensor] | None:
        """Statistics of a random start (e.g. random responsibilities), or None: start from the
        parameters as initialized."""
        return None

    def perturb(self, scale: float, generator: torch.Generator) -> None:
        """Jitter the parameters (between annealing phases); only annealed models need it."""
        raise NotImplementedError(f"{type(self).__name__} does not support perturbation")


class GeneralizedEM(ExpectedCounts):
    """A model whose M-step is done by an optimizer on the expected complete log-likelihood."""

    @abstractmethod
    def expected_complete_log_likelihood(self, counts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Q(theta) = sum of expected counts x log-probabilities (a differentiable scalar); its
        gradient at the parameters the counts came from is that of log p(X) (Fisher's identity)."""


class InitializedFromData(ABC):
    """A model whose fresh parameters are set from the training data before the first epoch
    (e.g. M10's topics from random training documents); the trainer calls it on a fresh run."""

    @abstractmethod
    def initialize_from_data(self, dataset, seed: int) -> None:
        """Set parameters from ``dataset`` (the training split); a no-op unless configured."""


# ---- per-position discrete latents (attention as a latent alignment) ------------------------


class LocalTerms(ABC):
    """One batch's per-position latent z_t in {0..S-1} (t a target position, S the batch's
    padded source length), independent across t given the data: the prior
    p(z_t | x, y_<t) and the output p(y_t | x, y_<t, z_t) for any alignment."""

    prior_logits: torch.Tensor  # (B, T, S) normalized log p(z_t = s), very negative where s is padding
    mask: torch.Tensor          # (B, T) bool, True on real target positions
    source_mask: torch.Tensor   # (B, S) bool, True on real source positions

    @abstractmethod
    def log_likelihood_table(self) -> torch.Tensor:
        """log p(y_t | z_t = s) for every (t, s), (B, T, S) — what enumeration needs."""

    def log_marginal(self, table: torch.Tensor | None = None) -> torch.Tensor:
        """Exact log p(y | x) (B,): sum_t log sum_s p(z_t = s) p(y_t | z_t = s); ``table`` is
        :meth:`log_likelihood_table` when the caller already has it."""
        table = self.log_likelihood_table() if table is None else table
        return (torch.logsumexp(self.prior_logits.float() + table, -1) * self.mask).sum(-1)

    @abstractmethod
    def log_likelihood_at(self, weights: torch.Tensor) -> torch.Tensor:
        """(B, T) log p(y_t | ...) with the alignment given as weights (B, T, S) over source
        positions: one-hot for a sampled z_t, q's probabilities for soft attention, a relaxed
        sample for Gumbel-softmax."""


class LocalLatentModel(LatentVariableModel):
    """A model whose latent is one discrete choice per target position among the source
    positions (M11's alignments): log p(y | x) = sum_t log sum_s p(z_t = s) p(y_t | z_t = s)
    is exact by enumeration, and the ELBO of a factorized q(z | x, y) = prod_t q(z_t) is a
    sum over positions (``latentlm.inference.local``)."""

    latent: ClassVar[str] = "local"

    @abstractmethod
    def local_terms(self, batch) -> LocalTerms:
        """The prior and the output of every position of ``batch`` (one decoder pass)."""

    def log_marginal(self, batch) -> torch.Tensor:
        return self.local_terms(batch).log_marginal()


class ConditionalGenerator(ABC):
    """A model of y given a source x that decodes left to right (beam search in
    :mod:`latentlm.evaluation.translation`): ``start`` encodes a batch's sources, ``step``
    gives log p(y_t | x, y_<t) over the vocabulary for the previous tokens, ``select``
    reorders (or repeats) the decoding state's rows."""

    @abstractmethod
    def start(self, batch) -> Any:
        """The decoding state of a batch's sources (one row per source sentence)."""

    @abstractmethod
    def step(self, state: Any, previous: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """(log-probabilities (N, V) of the next token, the next state) after tokens ``previous`` (N,)."""

    @abstractmethod
    def select(self, state: Any, rows: torch.Tensor) -> Any:
        """The state of rows ``rows`` (a LongTensor of row numbers, repeats allowed). Rows stay
        grouped by source sentence, sentence-major, every sentence the same number of rows:
        ``rows`` only expands each sentence's rows (``arange(B).repeat_interleave(k)``) or
        picks, for each sentence's k slots, rows of that same sentence (a beam's survivors)."""
