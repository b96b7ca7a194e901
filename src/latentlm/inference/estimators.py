"""Gradient estimators for E_q[g(z)] (SPEC L5), g the ELBO's integrand.

The integrand is either the reconstruction term alone, g(z) = log p(x | z), when the
objective takes the KL in closed form (``kl=None``), or the whole ELBO,

    g(z) = log p(x | z) - w * (log q(z | x) - log p(z)),

when it cannot (a :class:`KLTerm` with weight w). Score-function estimators then see
log p(x, z) - log q(z | x) whole, as Pyro's ``Trace_ELBO`` does, so a q with neither
``rsample`` nor a closed-form KL (a chain CRF) still gets an unbiased gradient of the
whole bound. With ``KLTerm.entropy`` (a q whose entropy is exact) the integrand is
log p(x | z) + w log p(z) and w * H(q) is added in closed form.

An estimator returns an :class:`Estimate`: ``value`` (B,) is the Monte Carlo (or exact)
estimate of E_q log p(x | z), ``kl`` (B,) that of KL(q || p) when the estimator took it,
and ``surrogate`` (B,) is what gets differentiated. Every surrogate is built Pyro's way,
``value + (s - s.detach())``: its *value* is the (weighted) bound itself, so the loss an
objective logs is -bound, while its gradient is the estimator. ``extra_loss`` trains any
auxiliary parameters (a learned baseline) and is zero-valued for the same reason.
Estimators are modules so that baselines and their statistics live in the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Categorical, Distribution, RelaxedOneHotCategorical

from latentlm.data.batching import Batch
from latentlm.errors import ConfigError
from latentlm.models.base import FiniteLatentModel, LatentVariableModel
from latentlm.nn.bow import bag_of_words
from latentlm.structured import LinearChainCRF
from latentlm.structured.relaxed import perturb_and_map, relaxed_ffbs


@dataclass
class KLTerm:
    """The KL part of the integrand, when the estimator must take it: weight w (the KL
    schedule's beta, or 0 under the free-bits floor), the prior, and optionally q's exact
    entropy (B,) (then only the cross term E_q log p(z) is sampled)."""

    prior: Distribution
    weight: float = 1.0
    entropy: torch.Tensor | None = None


@dataclass
class Estimate:
    value: torch.Tensor                   # (B,) E_q log p(x|z) estimate (or exact)
    surrogate: torch.Tensor               # (B,) differentiate this; its value is value - w * kl
    z: torch.Tensor | None = None         # the samples used, (S, B, ...)
    extra_loss: torch.Tensor | None = None  # scalar with value 0 whose gradient trains a baseline
    log_q: torch.Tensor | None = None     # (S, B) log q(z) of the samples, when sampled
    kl: torch.Tensor | None = None        # (B,) KL(q || p) estimate when the estimator took the KL


def zero_valued(t: torch.Tensor) -> torch.Tensor:
    """``t - t.detach()``: zero, with the gradient of ``t``."""
    return t - t.detach()


def _integrand(model, batch, z, log_q, kl: KLTerm | None):
    """(log p(x|z), g(z), KL samples or None, the z-dependent learning signal) for samples z (S, B, ...)."""
    ll = model.log_likelihood(batch, z)  # (S, B)
    if kl is None:
        return ll, ll, None, ll.detach()
    log_p = kl.prior.log_prob(z)  # (S, B)
    if kl.entropy is not None:
        kl_samples = -kl.entropy - log_p  # KL = -H(q) - E_q log p(z)
        signal = (ll + kl.weight * log_p).detach()  # H(q) does not depend on z
    else:
        kl_samples = log_q - log_p
        signal = (ll - kl.weight * kl_samples).detach()
    return ll, ll - kl.weight * kl_samples, kl_samples, signal


class Estimator(nn.Module):
    def forward(self, model: LatentVariableModel, q: Distribution, batch: Batch, samples: int,
                step: int = 0, kl: KLTerm | None = None) -> Estimate:  # pragma: no cover - interface
        raise NotImplementedError


class Reparameterization(Estimator):
    """z = g(eps, lambda): pathwise gradient, for Gaussians and flows (Kingma & Welling 2014)."""

    def forward(self, model, q, batch, samples, step=0, kl=None):
        if not q.has_rsample:
            raise ConfigError(f"the reparameterization estimator needs a q with rsample; {type(q).__name__} has "
                              f"none (use score_function, or enumerate for a small categorical z)")
        z = q.rsample((samples,))  # (S, B, ...)
        log_q = q.log_prob(z) if kl is not None and kl.entropy is None else None
        ll, g, kl_samples, _ = _integrand(model, batch, z, log_q, kl)
        return Estimate(ll.mean(0), g.mean(0), z, log_q=log_q,
                        kl=None if kl_samples is None else kl_samples.mean(0))


class Enumeration(Estimator):
    """Exact E_q = sum_k q(k) g(k) for a small discrete z (a :class:`FiniteLatentModel`): no variance."""

    def forward(self, model, q, batch, samples, step=0, kl=None):
        if not isinstance(q, Categorical):
            raise ValueError(f"exact enumeration needs a categorical q, got {type(q).__name__}")
        if not isinstance(model, FiniteLatentModel):
            raise ConfigError(f"exact enumeration needs a model over finitely many z (a FiniteLatentModel); "
                              f"{type(model).__name__} is not one")
        ll = model.log_likelihood_all(batch)  # (K, B)
        probs = q.probs.T  # (K, B)
        value = (probs * ll).sum(0)
        if kl is None:
            return Estimate(value, value)
        log_p = kl.prior.log_prob(torch.arange(ll.size(0), device=ll.device))[:, None]  # (K, 1)
        neg_entropy = -kl.entropy if kl.entropy is not None else (probs * q.logits.T).sum(0)
        kl_value = neg_entropy - (probs * log_p).sum(0)
        return Estimate(value, value - kl.weight * kl_value, kl=kl_value)


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
    """REINFORCE (Williams 1992) with a control variate b, over the whole integrand g:
    grad = E_q[(g(z) - b) grad log q(z)] + E_q[grad g(z)] (the pathwise part: the model's
    parameters, and q's through -log q(z) or the closed-form entropy). The learning signal
    is log p(x, z) - log q(z | x) when the KL is sampled, log p(x | z) when it is closed form.

    ``baseline``: ``none``; ``moving_average`` (exponential average of the learning
    signal, a buffer); ``learned`` (B(x; psi) fit by squared error to the signal);
    ``leave_one_out`` (S >= 2 samples, each baselined by the mean of the others — the
    multi-sample baseline of Kool et al. 2019 / Mnih & Rezende 2016); ``self_critic`` (the
    learning signal at q's most likely z — the Viterbi path of a chain CRF, the argmax of a
    categorical — as in self-critical sequence training, Rennie et al. 2017: one more decoder
    pass, unbiased because that z does not depend on the samples).
    """

    BASELINES = ("none", "moving_average", "learned", "leave_one_out", "self_critic")

    def __init__(self, baseline: str = "none", decay: float = 0.99, vocab_size: int | None = None):
        super().__init__()
        if baseline not in self.BASELINES:
            raise ConfigError(f"score_function baseline {baseline!r} unknown; choose one of {self.BASELINES}")
        self.baseline, self.decay = baseline, decay
        self.register_buffer("average", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))
        self.network = BagOfWordsBaseline(vocab_size) if baseline == "learned" else None

    def forward(self, model, q, batch, samples, step=0, kl=None):
        if self.baseline == "leave_one_out" and samples < 2:
            raise ConfigError("the leave-one-out baseline needs objective.samples >= 2")
        z = q.sample((samples,))  # (S, B, ...): no gradient through the sample itself
        log_q = q.log_prob(z)      # (S, B)
        ll, g, kl_samples, signal = _integrand(model, batch, z, log_q, kl)
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
            extra = zero_valued(((signal - pred) ** 2).mean())
        elif self.baseline == "self_critic":
            with torch.no_grad():
                z_map = _most_likely(q)[None]  # (1, B, ...)
                log_q_map = q.log_prob(z_map) if kl is not None and kl.entropy is None else None
                b = _integrand(model, batch, z_map, log_q_map, kl)[3].expand_as(signal)
        else:  # leave_one_out
            b = (signal.sum(0, keepdim=True) - signal) / (samples - 1)
        surrogate = (g + zero_valued((signal - b) * log_q)).mean(0)  # value: g; gradient: the estimator
        return Estimate(ll.mean(0), surrogate, z, extra, log_q,
                        kl=None if kl_samples is None else kl_samples.mean(0))


def _most_likely(q: Distribution) -> torch.Tensor:
    """The mode of q, (B, ...): a chain CRF's Viterbi path, a categorical's argmax."""
    if isinstance(q, LinearChainCRF):
        return q.argmax
    if isinstance(q, Categorical):
        return q.logits.argmax(-1)
    raise ConfigError(f"the self-critic baseline needs q's most likely z; {type(q).__name__} has no mode here "
                      f"(use a categorical or chain-CRF posterior, or another baseline)")


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

    def forward(self, model, q, batch, samples, step=0, kl=None):
        if not isinstance(q, Categorical):
            raise ValueError(f"Gumbel-softmax needs a categorical q, got {type(q).__name__}")
        if kl is not None:
            raise ConfigError("the Gumbel-softmax estimator needs a closed-form KL(q || p) (a categorical prior)")
        relaxed = RelaxedOneHotCategorical(torch.tensor(self.tau(step), device=q.logits.device), logits=q.logits)
        soft = relaxed.rsample((samples,))  # (S, B, K) on the simplex
        # argmax of the relaxed sample is an exact draw from q (the Gumbel-max trick): the
        # value reported is the true E_q log p(x | z) at that discrete z, never the relaxed one.
        hard = F.one_hot(soft.argmax(-1), soft.size(-1)).to(soft.dtype)
        if self.straight_through:  # forward pass at the hard z, backward through the relaxed one
            z = hard + zero_valued(soft)
            ll = model.log_likelihood(batch, z).mean(0)
            return Estimate(ll, ll, z)
        if not torch.is_grad_enabled():  # nothing to differentiate: only the true value
            ll = model.log_likelihood(batch, hard).mean(0)
            return Estimate(ll, ll, hard)
        both = model.log_likelihood(batch, torch.cat([hard, soft]))  # one decoder pass for both
        value, relaxed_ll = both[:samples].mean(0), both[samples:].mean(0)
        return Estimate(value.detach(), value.detach() + zero_valued(relaxed_ll), soft)


class GumbelCRF(Estimator):
    """Relaxed pathwise gradient through a chain-CRF q (the Gumbel-CRF of Fu et al. 2020):
    ``method: ffbs`` relaxes forward-filtering backward-sampling (each backward step a
    Gumbel-softmax at temperature tau of the exact conditional given the hard next tag);
    ``method: perturb_and_map`` uses the marginals at temperature tau of the chain with
    Gumbel-perturbed unary scores (Papandreou & Yuille 2011). tau anneals as in
    :class:`GumbelSoftmax`; ``straight_through`` evaluates the decoder at the hard path and
    differentiates through the relaxed one. The model must accept relaxed paths (S, B, T, K).

    The KL must be closed form (``objective.kl: analytic`` or ``auto`` with a chain prior whose
    KL from the CRF is registered): the relaxed z has no prior log-probability. The reported
    value is E_q log p(x | z) at exact samples of q — ffbs's hard path is one; perturb-and-MAP's
    is not, so it draws exact samples for the value — never the relaxed one.
    """

    METHODS = ("ffbs", "perturb_and_map")

    def __init__(self, method: str = "ffbs", temperature: float = 1.0, min_temperature: float = 0.1,
                 anneal_rate: float = 0.0, straight_through: bool = False):
        super().__init__()
        if method not in self.METHODS:
            raise ConfigError(f"gumbel_crf method {method!r} unknown; choose one of {self.METHODS}")
        self.method, self.straight_through = method, straight_through
        self.temperature, self.min_temperature, self.anneal_rate = temperature, min_temperature, anneal_rate

    def tau(self, step: int) -> float:
        return max(self.min_temperature, self.temperature * float(torch.exp(torch.tensor(-self.anneal_rate * step))))

    def forward(self, model, q, batch, samples, step=0, kl=None):
        if not isinstance(q, LinearChainCRF):
            raise ConfigError(f"the Gumbel-CRF estimator needs a chain-CRF q, got {type(q).__name__}")
        if kl is not None:
            raise ConfigError("the Gumbel-CRF estimator needs the KL in closed form (objective.kl: analytic, with "
                              "a chain prior such as lstm_tag_chain's); a relaxed path has no log p(z)")
        if not torch.is_grad_enabled():  # nothing to differentiate: only the true value
            z = q.sample((samples,))
            ll = model.log_likelihood(batch, z).mean(0)
            return Estimate(ll, ll, z)
        relax = relaxed_ffbs if self.method == "ffbs" else perturb_and_map
        hard, soft = relax(q.init, q.potentials, q.unary, q.lengths, samples, self.tau(step))
        exact = hard.detach() if self.method == "ffbs" else q.sample((samples,))
        K = soft.size(-1)
        one_hot = lambda z: F.one_hot(z.clamp_min(0), K).to(soft.dtype) * (z >= 0)[..., None]  # noqa: E731
        z = one_hot(hard) + zero_valued(soft) if self.straight_through else soft
        both = model.log_likelihood(batch, torch.cat([one_hot(exact), z]))  # one decoder pass for both
        value, relaxed_ll = both[:samples].mean(0), both[samples:].mean(0)
        return Estimate(value.detach(), value.detach() + zero_valued(relaxed_ll), exact)


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
    "gumbel_crf": GumbelCRF,
}
