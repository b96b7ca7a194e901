"""L4/L5/L9: the evidence lower bound with a pluggable estimator, KL weight schedule and free bits."""

from __future__ import annotations

import math

import torch

from latentlm.inference.base import Objective, ObjectiveOutput
from latentlm.inference.estimators import make_estimator
from latentlm.inference.kl import free_bits, kl_divergence_mc, kl_per_dimension
from latentlm.inference.schedules import make_schedule


class ELBO(Objective):
    """E_q[log p(x|z)] - beta(step) * KL(q || p), optionally with free bits.

    ``bound`` is always the true ELBO (beta = 1, no floor); only the loss is annealed.
    """

    def __init__(self, samples: int = 1, estimator="reparam", kl_schedule=None,
                 free_bits: float = 0.0, free_bits_per_dimension: bool = True, vocab_size: int | None = None):
        super().__init__()
        self.samples = samples
        self.estimator = make_estimator(estimator, vocab_size)
        self.kl_schedule = make_schedule(kl_schedule)
        self.free_bits, self.free_bits_per_dimension = free_bits, free_bits_per_dimension

    def forward(self, model, posterior, batch, step: int = 0) -> ObjectiveOutput:
        q, p = posterior(batch), model.prior()
        est = self.estimator(model, q, batch, self.samples, step)
        rec, surrogate, z = est.value, est.surrogate, est.z
        kl_dims = kl_per_dimension(q, p)  # (B, D) or None
        kl = kl_dims.sum(-1) if kl_dims is not None else kl_divergence_mc(q, p, z)
        penalty = free_bits(kl_dims if kl_dims is not None else kl[:, None], self.free_bits,
                            self.free_bits_per_dimension)
        beta = self.kl_schedule(step)
        loss = -surrogate.mean() + beta * penalty
        if est.extra_loss is not None:
            loss = loss + est.extra_loss
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
        surrogate = bound + (signal * log_q).sum(0)
        return ObjectiveOutput(loss=-surrogate.mean(), bound=bound, reconstruction=ll.mean(0),
                               kl=kl_divergence_mc(q, p, z), tokens=batch.lengths)
