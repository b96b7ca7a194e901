"""L3: variational inference with per-instance parameters (no encoder), and the
amortization gap.

Stochastic VI (Hoffman et al. 2013) keeps a local lambda_n = (mean_n, logvar_n) per
training example. For each minibatch, :class:`StochasticVI` optimizes the batch's local
parameters by ``steps`` gradient steps on their per-example ELBO (warm-started from the
table :class:`PerInstanceGaussian`, which stores the result back), then updates the model
on the ELBO at the optimized lambda. Examples outside the table (validation, test) start
from the prior, N(0, I), with ``eval_steps`` steps.

:func:`amortization_gap` measures, on any split, how much ELBO an encoder leaves on the
table: ELBO(lambda*_n) - ELBO(encoder(x_n)), lambda*_n optimized per example starting
from the encoder's output (Cremer et al. 2018).
"""

from __future__ import annotations

import torch
from torch import nn

from latentlm.data.batching import Batch
from latentlm.errors import ConfigError
from latentlm.inference.base import GaussianPosterior, Objective, ObjectiveOutput, Posterior, diagonal_gaussian
from latentlm.inference.kl import free_bits
from latentlm.inference.schedules import make_schedule
from latentlm.inference.semi_amortized import gaussian_elbo, refine_gaussian


class PerInstanceGaussian(GaussianPosterior):
    """A table of diagonal Gaussians, one row per training example, indexed by ``batch.index``.

    ``num_examples`` is the size of the training split. Rows start at the prior (mean 0,
    log-variance 0). The table is a buffer, not a parameter: :class:`StochasticVI`
    optimizes rows itself and writes them back (so no optimizer state for 40k rows).
    """

    def __init__(self, latent_dim: int, num_examples: int, vocab_size: int | None = None):
        super().__init__()
        if num_examples < 1:
            raise ConfigError(f"posterior.num_examples must be the training-set size, got {num_examples}")
        self.register_buffer("mean", torch.zeros(num_examples, latent_dim))
        self.register_buffer("logvar", torch.zeros(num_examples, latent_dim))

    def params(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        if int(batch.index.max()) >= self.mean.size(0):
            raise ValueError(f"example index {int(batch.index.max())} outside the per-instance table of "
                             f"{self.mean.size(0)} rows; set posterior.num_examples to the training-set size")
        return self.mean[batch.index], self.logvar[batch.index]  # (B, D) each

    @torch.no_grad()
    def store(self, batch: Batch, mean: torch.Tensor, logvar: torch.Tensor) -> None:
        self.mean[batch.index] = mean.detach().to(self.mean.dtype)
        self.logvar[batch.index] = logvar.detach().to(self.logvar.dtype)


class StochasticVI(Objective):
    """ELBO at per-example optimized lambda; config ``objective: {type: svi, steps: 20}`` with
    ``posterior: {type: per_instance_gaussian, num_examples: N}``.

    In training the batch's rows of the table are the starting point and are updated;
    in evaluation every example starts from the prior and runs ``eval_steps`` steps.
    """

    def __init__(self, steps: int = 20, lr: float = 1.0, eval_steps: int = 100, samples: int = 1,
                 refine_samples: int = 1, max_grad_norm: float | None = 5.0, kl_schedule=None,
                 free_bits: float = 0.0, free_bits_per_dimension: bool = True):
        super().__init__()
        self.steps, self.lr, self.eval_steps, self.samples = steps, lr, eval_steps, samples
        self.refine_samples, self.max_grad_norm = refine_samples, max_grad_norm
        self.kl_schedule = make_schedule(kl_schedule)
        self.free_bits, self.free_bits_per_dimension = free_bits, free_bits_per_dimension

    def local_parameters(self, model, posterior, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Optimized (mean, logvar), (B, D) each, detached."""
        training = self.training and isinstance(posterior, PerInstanceGaussian)
        if training:
            mean0, logvar0 = posterior.params(batch)
        else:
            mean0 = torch.zeros(batch.size, model.latent_dim, device=batch.tokens.device)
            logvar0 = torch.zeros_like(mean0)
        mean, logvar = refine_gaussian(model, batch, mean0, logvar0, self.steps if training else self.eval_steps,
                                       self.lr, self.refine_samples, self.max_grad_norm, create_graph=False)
        if training:
            posterior.store(batch, mean, logvar)
        return mean, logvar

    def evaluation_posterior(self, model, posterior, batch: Batch):
        """q(z | x) to importance-sample with in evaluation: the optimized local Gaussian."""
        was = self.training
        self.eval()
        try:
            return diagonal_gaussian(*self.local_parameters(model, posterior, batch))
        finally:
            self.train(was)

    def forward(self, model, posterior: Posterior, batch: Batch, step: int = 0) -> ObjectiveOutput:
        mean, logvar = self.local_parameters(model, posterior, batch)
        elbo, rec, kl_dims = gaussian_elbo(model, batch, mean, logvar, self.samples)
        beta = self.kl_schedule(step)
        loss = -rec.mean() + beta * free_bits(kl_dims, self.free_bits, self.free_bits_per_dimension)
        return ObjectiveOutput(loss=loss, bound=elbo, reconstruction=rec, kl=kl_dims.sum(-1), tokens=batch.lengths,
                               extras={"kl_weight": torch.tensor(beta)}, q=diagonal_gaussian(mean, logvar))


def amortization_gap(model, posterior: nn.Module, batches, steps: int = 100, lr: float = 0.5,
                     samples: int = 1, eval_samples: int = 100, seed: int = 0) -> dict[str, float]:
    """Mean per-example ELBO of the encoder's q vs of q optimized per example from it.

    ``batches`` is an iterable of :class:`Batch`; the ELBOs use ``eval_samples`` draws with
    common random numbers for the two posteriors. Returns nats per example:
    ``encoder_elbo``, ``optimized_elbo`` and ``gap`` = optimized - encoder (>= 0 up to noise).
    """
    gen = torch.Generator().manual_seed(seed)
    total_enc = total_opt = 0.0
    n = 0
    was_model, was_post = model.training, posterior.training
    model.eval()
    posterior.eval()
    try:
        for batch in batches:
            with torch.no_grad():
                mean0, logvar0 = posterior.params(batch)
            mean, logvar = refine_gaussian(model, batch, mean0, logvar0, steps, lr, samples, create_graph=False)
            noise = torch.randn((eval_samples, *mean0.shape), generator=gen).to(mean0)
            with torch.no_grad():
                total_enc += float(gaussian_elbo(model, batch, mean0, logvar0, noise=noise)[0].sum())
                total_opt += float(gaussian_elbo(model, batch, mean, logvar, noise=noise)[0].sum())
            n += batch.size
    finally:
        model.train(was_model)
        posterior.train(was_post)
    n = max(1, n)
    return {"encoder_elbo": total_enc / n, "optimized_elbo": total_opt / n, "gap": (total_opt - total_enc) / n}
