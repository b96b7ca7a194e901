"""L4/L5/L9: the evidence lower bound with a pluggable estimator, KL weight schedule and free bits."""

from __future__ import annotations

import math

import torch
from torch.distributions import kl_divergence

from latentlm.errors import ConfigError
from latentlm.inference.base import FlowPosterior, Objective, ObjectiveOutput, StructuredPosterior
from latentlm.inference.estimators import KLTerm, make_estimator, zero_valued
from latentlm.inference.kl import free_bits, kl_divergence_mc, kl_per_dimension
from latentlm.inference.schedules import make_schedule

KL_MODES = ("auto", "analytic", "entropy", "sampled")


class ELBO(Objective):
    """E_q[log p(x|z)] - beta(step) * KL(q || p), optionally with free bits.

    ``bound`` is always the true ELBO (beta = 1, no floor); only the loss is annealed, and
    with beta = 1 and no floor the loss's value is exactly -mean(bound) whatever the estimator.

    ``kl`` says how the KL enters: ``analytic`` (closed form, torch's KL registry — Gaussian
    and categorical q), ``entropy`` (q's exact entropy in closed form, the cross term
    E_q log p(z) sampled inside the estimator's integrand — a StructuredPosterior),
    ``sampled`` (the estimator sees log p(x, z) - log q(z | x) whole), or ``auto`` (the
    first that applies, in that order). Free bits in ``entropy`` / ``sampled`` mode floor the
    batch's total KL: the KL term's weight is beta while an independent estimate of the
    batch-mean KL is above the floor, 0 below it. A per-dimension floor needs a per-dimension
    closed-form KL (a diagonal Gaussian); on any other q with more than one latent dimension
    (a flow, a chain) it is refused rather than silently turned into a total floor.
    """

    def __init__(self, samples: int = 1, estimator="reparam", kl_schedule=None,
                 free_bits: float = 0.0, free_bits_per_dimension: bool = True, vocab_size: int | None = None,
                 kl: str = "auto"):
        super().__init__()
        if kl not in KL_MODES:
            raise ConfigError(f"objective.kl {kl!r} unknown; choose one of {KL_MODES}")
        self.samples = samples
        self.estimator = make_estimator(estimator, vocab_size)
        self.kl_schedule = make_schedule(kl_schedule)
        self.free_bits, self.free_bits_per_dimension = free_bits, free_bits_per_dimension
        self.kl_mode = kl

    def check(self, model, posterior) -> None:
        if self.free_bits > 0 and self.free_bits_per_dimension and isinstance(posterior, FlowPosterior):
            raise ConfigError(_PER_DIMENSION_REFUSED.format(type(posterior).__name__))

    def _mode(self, posterior, q, p) -> tuple[str, torch.Tensor | None]:
        """(the KL mode, the closed-form KL when ``auto`` had to compute it to decide)."""
        if self.kl_mode != "auto":
            return self.kl_mode, None
        try:
            return "analytic", kl_divergence(q, p)  # kept: a chain's closed form costs a DP
        except NotImplementedError:
            return ("entropy" if isinstance(posterior, StructuredPosterior) else "sampled"), None

    def forward(self, model, posterior, batch, step: int = 0) -> ObjectiveOutput:
        q, p = posterior(batch), model.prior()
        beta = self.kl_schedule(step)
        mode, kl_known = self._mode(posterior, q, p)
        per_dimension = self.free_bits > 0 and self.free_bits_per_dimension
        if mode == "analytic":
            kl_dims = kl_per_dimension(q, p)  # (B, D) or None
            if kl_dims is None and kl_known is not None:
                kl = kl_known
                if per_dimension and len(q.event_shape) > 0:
                    raise ConfigError(_PER_DIMENSION_REFUSED.format(type(posterior).__name__))
            elif kl_dims is None:
                try:
                    kl = kl_divergence(q, p)
                except NotImplementedError:
                    raise ConfigError(f"objective.kl analytic: no closed-form KL({type(q).__name__} || "
                                      f"{type(p).__name__}); use kl: sampled") from None
                if per_dimension and len(q.event_shape) > 0:
                    raise ConfigError(_PER_DIMENSION_REFUSED.format(type(posterior).__name__))
            else:
                kl = kl_dims.sum(-1)
            est = self.estimator(model, q, batch, self.samples, step)
            penalty = free_bits(kl_dims if kl_dims is not None else kl[:, None], self.free_bits,
                                self.free_bits_per_dimension)
            loss = -est.surrogate.mean() + beta * penalty
        else:
            if per_dimension and len(q.event_shape) > 0:
                raise ConfigError(_PER_DIMENSION_REFUSED.format(type(posterior).__name__))
            entropy = q.entropy() if mode == "entropy" else None
            weight, floor_penalty = beta, 0.0
            if self.free_bits > 0:
                with torch.no_grad():
                    z = q.sample((self.samples,))
                    cross = p.log_prob(z).mean(0)
                    kl_hat = float(((-entropy if entropy is not None else q.log_prob(z).mean(0)) - cross).mean())
                if kl_hat <= self.free_bits:  # below the floor: the KL term is a constant, no gradient
                    weight, floor_penalty = 0.0, beta * self.free_bits
            est = self.estimator(model, q, batch, self.samples, step, kl=KLTerm(p, weight, entropy))
            kl = est.kl
            loss = -est.surrogate.mean() + floor_penalty
        if est.extra_loss is not None:
            loss = loss + est.extra_loss
        rec = est.value
        return ObjectiveOutput(loss=loss, bound=rec - kl, reconstruction=rec, kl=kl, tokens=batch.lengths,
                               extras={"kl_weight": torch.tensor(beta)}, q=q)


_PER_DIMENSION_REFUSED = (
    "free bits per dimension need a closed-form KL per latent dimension (a diagonal Gaussian q); posterior "
    "{} has none, and flooring its total KL instead would change the method. Set "
    "objective.free_bits_per_dimension: false to floor the total KL, or use a Gaussian posterior")


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
                               tokens=batch.lengths, q=q)


class VIMCO(Objective):
    """L5/L6 for discrete q: the IWAE-k bound with the VIMCO leave-one-out control variate
    (Mnih & Rezende 2016). Each sample's learning signal is L - L_{-j}, where L_{-j}
    replaces log w_j by the mean of the other log-weights; the model's gradient is pathwise.
    """

    def __init__(self, samples: int = 5):
        super().__init__()
        if samples < 2:
            raise ValueError(f"VIMCO needs at least 2 samples, got {samples}")
        self.samples = samples

    def forward(self, model, posterior, batch, step: int = 0) -> ObjectiveOutput:
        q, p = posterior(batch), model.prior()
        k = self.samples
        z = q.sample((k,))                  # (k, B)
        log_q = q.log_prob(z)               # (k, B)
        ll = model.log_likelihood(batch, z)  # (k, B)
        log_w = ll + p.log_prob(z) - log_q   # gradient flows to model (and to q via -log_q)
        bound = torch.logsumexp(log_w, 0) - math.log(k)
        with torch.no_grad():
            lw = log_w.detach()
            others_mean = (lw.sum(0, keepdim=True) - lw) / (k - 1)  # (k, B)
            # L_{-j}: sample j's log-weight replaced by the others' mean
            eye = torch.eye(k, dtype=torch.bool, device=lw.device)[:, :, None]        # (k, k, 1)
            replaced = torch.where(eye, others_mean[None], lw[None].expand(k, -1, -1))  # (j, k, B)
            loo = torch.logsumexp(replaced, 1) - math.log(k)         # (k, B)
            signal = bound.detach()[None] - loo
        surrogate = bound + zero_valued((signal * log_q).sum(0))  # value: the bound itself
        return ObjectiveOutput(loss=-surrogate.mean(), bound=bound, reconstruction=ll.mean(0),
                               kl=kl_divergence_mc(q, p, z), tokens=batch.lengths, q=q)
