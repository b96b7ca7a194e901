"""Gradient estimators for the reconstruction term E_q[log p(x | z)] (SPEC L5).

An estimator returns an :class:`Estimate`: ``value`` (B,) is the Monte Carlo estimate
reported as part of the bound; ``surrogate`` (B,) is what gets differentiated (Pyro's
surrogate trick: ``value + (s - s.detach())`` style terms whose gradient is the
estimator while the number logged is the true bound); ``extra_loss`` trains any
auxiliary parameters (a learned baseline). Estimators are modules so that baselines and
their statistics live in the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Categorical, Distribution, RelaxedOneHotCategorical

from latentlm.data.batching import Batch
from latentlm.errors import ConfigError
from latentlm.models.base import LatentVariableModel
from latentlm.nn.bow import bag_of_words


@dataclass
class Estimate:
    value: torch.Tensor                   # (B,) E_q log p(x|z) estimate (or exact)
    surrogate: torch.Tensor               # (B,) differentiate this
    z: torch.Tensor | None = None         # the samples used, (S, B, ...)
    extra_loss: torch.Tensor | None = None  # scalar, e.g. the baseline's squared error
    log_q: torch.Tensor | None = None     # (S, B) log q(z) of the samples, when sampled


class Estimator(nn.Module):
    def forward(self, model: LatentVariableModel, q: Distribution, batch: Batch, samples: int,
                step: int = 0) -> Estimate:  # pragma: no cover - interface
        raise NotImplementedError


class Reparameterization(Estimator):
    """z = g(eps, lambda): pathwise gradient, for Gaussians and flows (Kingma & Welling 2014)."""

    def forward(self, model, q, batch, samples, step=0):
        z = q.rsample((samples,))  # (S, B, ...)
        value = model.log_likelihood(batch, z).mean(0)  # (B,)
        return Estimate(value, value, z)


class Enumeration(Estimator):
    """Exact E_q = sum_k q(k) log p(x | k) for a small discrete z: no variance at all."""

    def forward(self, model, q, batch, samples, step=0):
        if not isinstance(q, Categorical):
            raise ValueError(f"exact enumeration needs a categorical q, got {type(q).__name__}")
        ll = model.log_likelihood_all(batch)  # (K, B)
        value = (q.probs.T * ll).sum(0)
        return Estimate(value, value)


class BagOfWordsBaseline(nn.Module):
    """Input-dependent baseline B(x; psi): log(1 + word counts) -> MLP -> scalar (Mnih & Gregor 2014).

    Reads a text ``Batch`` or a document ``BowBatch`` alike (see :func:`latentlm.nn.bow.bag_of_words`).
    """

    def __init__(self, vocab_size: int, dim: int = 64):
        super().__init__()
        self.vocab_size = vocab_size
        self.mlp = nn.Sequential(nn.Linear(vocab_size, dim), nn.Tanh(), nn.Linear(dim, 1))

    def forward(self, batch) -> torch.Tensor:
        counts = bag_of_words(batch, self.vocab_size, self.mlp[0].weight.dtype)  # (B, V)
        return self.mlp(torch.log1p(counts)).squeeze(-1)  # (B,)


class ScoreFunction(Estimator):
    """REINFORCE (Williams 1992) with a control variate b:
    grad = E_q[(log p(x|z) - b) grad log q(z)] + E_q[grad log p(x|z)].

    ``baseline``: ``none``; ``moving_average`` (exponential average of the learning
    signal, a buffer); ``learned`` (B(x; psi) fit by squared error to the signal);
    ``leave_one_out`` (S >= 2 samples, each baselined by the mean of the others — the
    multi-sample baseline of Kool et al. 2019 / Mnih & Rezende 2016).
    """

    BASELINES = ("none", "moving_average", "learned", "leave_one_out")

    def __init__(self, baseline: str = "none", decay: float = 0.99, vocab_size: int | None = None):
        super().__init__()
        if baseline not in self.BASELINES:
            raise ConfigError(f"score_function baseline {baseline!r} unknown; choose one of {self.BASELINES}")
        self.baseline, self.decay = baseline, decay
        self.register_buffer("average", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.network = BagOfWordsBaseline(vocab_size) if baseline == "learned" else None

    def forward(self, model, q, batch, samples, step=0):
        if self.baseline == "leave_one_out" and samples < 2:
            raise ConfigError("the leave-one-out baseline needs objective.samples >= 2")
        z = q.sample((samples,))  # (S, B): no gradient through the sample itself
        log_q = q.log_prob(z)      # (S, B)
        ll = model.log_likelihood(batch, z)  # (S, B)
        signal = ll.detach()
        extra = None
        if self.baseline == "none":
            b = torch.zeros_like(signal)
        elif self.baseline == "moving_average":
            b = self.average.clone().expand_as(signal)  # the average *before* this draw's update
            if self.training:
                with torch.no_grad():
                    mean = signal.mean()
                    new = torch.where(self.initialized, self.decay * self.average + (1 - self.decay) * mean, mean)
                    self.average.copy_(new)
                    self.initialized.fill_(True)
        elif self.baseline == "learned":
            pred = self.network(batch)  # (B,)
            b = pred.detach().expand_as(signal)
            extra = ((signal - pred) ** 2).mean()
        else:  # leave_one_out
            b = (signal.sum(0, keepdim=True) - signal) / (samples - 1)
        surrogate = (ll + (signal - b) * log_q).mean(0)
        return Estimate(ll.mean(0), surrogate, z, extra, log_q)


class GumbelSoftmax(Estimator):
    """Concrete / Gumbel-softmax relaxation (Jang et al. 2017; Maddison et al. 2017):
    a reparameterized relaxed one-hot z at temperature tau, annealed
    tau(step) = max(tau_min, tau * exp(-anneal_rate * step)). Biased for tau > 0; the
    bias falls as tau -> 0 while the variance grows. ``straight_through``: the forward
    pass uses the hard one-hot argmax, the backward pass the relaxed sample's gradient.
    """

    def __init__(self, temperature: float = 1.0, min_temperature: float = 0.1, anneal_rate: float = 0.0,
                 straight_through: bool = False):
        super().__init__()
        self.temperature, self.min_temperature, self.anneal_rate = temperature, min_temperature, anneal_rate
        self.straight_through = straight_through

    def tau(self, step: int) -> float:
        return max(self.min_temperature, self.temperature * float(torch.exp(torch.tensor(-self.anneal_rate * step))))

    def forward(self, model, q, batch, samples, step=0):
        if not isinstance(q, Categorical):
            raise ValueError(f"Gumbel-softmax needs a categorical q, got {type(q).__name__}")
        relaxed = RelaxedOneHotCategorical(torch.tensor(self.tau(step), device=q.logits.device), logits=q.logits)
        z = relaxed.rsample((samples,))  # (S, B, K) on the simplex
        if self.straight_through:
            hard = F.one_hot(z.argmax(-1), z.size(-1)).to(z.dtype)
            z = hard + z - z.detach()
        ll = model.log_likelihood(batch, z)  # (S, B)
        return Estimate(ll.mean(0), ll.mean(0), z)


def make_estimator(spec, vocab_size: int | None = None) -> Estimator:
    """``"reparam"`` or ``{"type": "score_function", "baseline": "learned"}`` -> estimator."""
    spec = {"type": spec} if isinstance(spec, str) else dict(spec)
    kind = spec.pop("type")
    if kind == "straight_through":
        kind, spec["straight_through"] = "gumbel", True
    if kind not in ESTIMATORS:
        raise ConfigError(f"unknown estimator {kind!r}; choose one of {sorted(ESTIMATORS) + ['straight_through']}")
    if kind == "score_function":
        spec.setdefault("vocab_size", vocab_size)
    try:
        return ESTIMATORS[kind](**spec)
    except TypeError as err:
        raise ConfigError(f"estimator {kind!r}: {err}") from None


ESTIMATORS: dict[str, type[Estimator]] = {
    "reparam": Reparameterization,
    "enumerate": Enumeration,
    "score_function": ScoreFunction,
    "gumbel": GumbelSoftmax,
}
