"""L8: semi-amortized variational inference (SA-VAE, Kim et al. 2018).

The encoder gives lambda_0 = (mean, logvar); K steps of gradient ascent on the
per-example ELBO refine it,

    lambda_{k+1} = lambda_k + lr * clip(grad_lambda ELBO(x; theta, lambda_k)),

and the model is trained on ELBO(x; theta, lambda_K). As in the paper:
- the decoder theta gets the partial gradient d ELBO(lambda_K) / d theta (lambda_K held fixed);
- the encoder phi gets d ELBO(lambda_K) / d phi *through the K refinement steps*
  (autograd with ``create_graph=True``: exact Hessian-vector products, where the
  paper used finite differences), with theta held fixed inside the refinement.
``decoder_through_refinement=True`` instead differentiates the decoder through the
refinement too (the total derivative).

The posterior must be a :class:`~latentlm.inference.base.GaussianPosterior` (a diagonal
Gaussian with ``params(batch) -> (mean, logvar)``); a flow posterior is refused with a
``ConfigError`` (refining only its base Gaussian would not refine q).
On CUDA, cuDNN's LSTM has no double backward, so the refinement runs with cuDNN off.
"""

from __future__ import annotations

import contextlib

import torch
from torch.distributions import kl_divergence

from latentlm.data.batching import Batch
from latentlm.errors import ConfigError
from latentlm.inference.base import FlowPosterior, GaussianPosterior, Objective, ObjectiveOutput, Posterior, diagonal_gaussian
from latentlm.inference.kl import free_bits
from latentlm.nn.decoders import twice_differentiable
from latentlm.inference.schedules import make_schedule
from latentlm.models.base import LatentVariableModel


def gaussian_elbo(model: LatentVariableModel, batch: Batch, mean: torch.Tensor, logvar: torch.Tensor,
                  samples: int = 1, noise: torch.Tensor | None = None):
    """Per-example ELBO for q = N(mean, diag exp(logvar)): (elbo, reconstruction, kl_dims).

    ``noise`` (S, B, D) fixes the reparameterization draws (tests, finite differences).
    elbo and reconstruction are (B,), kl_dims is (B, D) in closed form.
    """
    if noise is None:
        noise = torch.randn((samples, *mean.shape), dtype=mean.dtype, device=mean.device)
    z = mean + noise * torch.exp(0.5 * logvar)  # (S, B, D)
    rec = model.log_likelihood(batch, z).mean(0)  # (B,)
    kl_dims = kl_divergence(diagonal_gaussian(mean, logvar).base_dist, model.prior().base_dist)  # (B, D)
    return rec - kl_dims.sum(-1), rec, kl_dims


@contextlib.contextmanager
def frozen(module: torch.nn.Module):
    """Parameters of ``module`` stop requiring grad inside the block (restored after)."""
    params = [p for p in module.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


@contextlib.contextmanager
def _double_backward_ok(tensor: torch.Tensor):
    """cuDNN RNNs do not support double backward (the native kernels do), nor does the fused
    output layer's hand-written backward."""
    with contextlib.ExitStack() as stack:
        stack.enter_context(twice_differentiable())
        if tensor.is_cuda:
            stack.enter_context(torch.backends.cudnn.flags(enabled=False))
        yield


def refine_gaussian(
    model: LatentVariableModel, batch: Batch, mean: torch.Tensor, logvar: torch.Tensor, steps: int,
    lr: float = 1.0, samples: int = 1, max_grad_norm: float | None = 5.0, create_graph: bool = True,
    noise: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """K steps of gradient ascent on the per-example ELBO from (mean, logvar), both (B, D).

    With ``create_graph`` the result is differentiable w.r.t. the inputs (and anything they
    depend on) through every step; without, it is detached. ``max_grad_norm`` clips each
    example's gradient (over mean and logvar together), as the SA-VAE code does.
    ``noise`` is an optional list of ``steps`` tensors (S, B, D) fixing the draws.
    """
    if steps < 0:
        raise ValueError(f"refinement steps must be >= 0, got {steps}")
    if not create_graph:
        mean, logvar = mean.detach(), logvar.detach()
    with torch.enable_grad(), _double_backward_ok(mean):
        if not mean.requires_grad:
            mean, logvar = mean.requires_grad_(), logvar.requires_grad_()
        for k in range(steps):
            elbo, _, _ = gaussian_elbo(model, batch, mean, logvar, samples, None if noise is None else noise[k])
            g_mean, g_logvar = torch.autograd.grad(elbo.sum(), (mean, logvar), create_graph=create_graph)
            if max_grad_norm:
                norm = torch.sqrt((g_mean**2).sum(-1, keepdim=True) + (g_logvar**2).sum(-1, keepdim=True))
                scale = (max_grad_norm / (norm + 1e-12)).clamp(max=1.0)  # (B, 1)
                g_mean, g_logvar = g_mean * scale, g_logvar * scale
            mean, logvar = mean + lr * g_mean, logvar + lr * g_logvar
            if not create_graph:
                mean, logvar = mean.detach().requires_grad_(), logvar.detach().requires_grad_()
    if not create_graph:
        mean, logvar = mean.detach(), logvar.detach()
    return mean, logvar


class SemiAmortizedELBO(Objective):
    """The ELBO at the refined posterior lambda_K (SA-VAE); config ``objective: {type: sa_elbo}``.

    ``bound`` is the true ELBO at lambda_K (in evaluation too, where refinement runs
    without a graph when ``refine_in_eval``); ``extras`` carries the encoder's own ELBO at
    lambda_0 so the refinement gain (an amortization gap estimate) can be logged.
    KL annealing and free bits apply to the training loss only, as in :class:`ELBO`.
    """

    def __init__(self, refine_steps: int = 20, refine_lr: float = 1.0, refine_samples: int = 1,
                 max_grad_norm: float | None = 5.0, samples: int = 1, kl_schedule=None,
                 free_bits: float = 0.0, free_bits_per_dimension: bool = True,
                 decoder_through_refinement: bool = False, refine_in_eval: bool = True):
        super().__init__()
        if refine_steps < 0 or refine_lr <= 0:
            raise ConfigError(f"objective (sa_elbo): need refine_steps >= 0 and refine_lr > 0, "
                              f"got {refine_steps} and {refine_lr}")
        self.refine_steps, self.refine_lr, self.refine_samples = refine_steps, refine_lr, refine_samples
        self.max_grad_norm, self.samples = max_grad_norm, samples
        self.kl_schedule = make_schedule(kl_schedule)
        self.free_bits, self.free_bits_per_dimension = free_bits, free_bits_per_dimension
        self.decoder_through_refinement, self.refine_in_eval = decoder_through_refinement, refine_in_eval

    def _refine(self, model, batch, mean, logvar, create_graph):
        return refine_gaussian(model, batch, mean, logvar, self.refine_steps, self.refine_lr,
                               self.refine_samples, self.max_grad_norm, create_graph)

    def check(self, model: LatentVariableModel, posterior: Posterior | None) -> None:
        if not isinstance(posterior, GaussianPosterior):
            raise ConfigError(
                f"objective sa_elbo refines a diagonal Gaussian q(z | x) (a GaussianPosterior such as "
                f"gaussian_lstm); posterior {type(posterior).__name__} is not one"
                + (" — a flow's q is its base pushed through every layer, and refining the base alone "
                   "would not refine q; use objective elbo or iwae with a flow" if isinstance(posterior, FlowPosterior)
                   else ""))

    def evaluation_posterior(self, model: LatentVariableModel, posterior: Posterior, batch: Batch):
        """q(z | x) to importance-sample with in evaluation: the refined Gaussian at lambda_K."""
        self.check(model, posterior)
        mean0, logvar0 = posterior.params(batch)
        return diagonal_gaussian(*self._refine(model, batch, mean0, logvar0, create_graph=False))

    def forward(self, model: LatentVariableModel, posterior: Posterior, batch: Batch, step: int = 0) -> ObjectiveOutput:
        self.check(model, posterior)
        mean0, logvar0 = posterior.params(batch)  # (B, D) each
        beta = self.kl_schedule(step)
        extras = {"kl_weight": torch.tensor(beta)}

        def penalty(kl_dims):  # annealed, floored KL term of the training loss
            return beta * free_bits(kl_dims, self.free_bits, self.free_bits_per_dimension)

        if not (torch.is_grad_enabled() and self.training):
            mean_k, logvar_k = (self._refine(model, batch, mean0, logvar0, create_graph=False)
                                if self.refine_in_eval else (mean0, logvar0))
            elbo, rec, kl_dims = gaussian_elbo(model, batch, mean_k, logvar_k, self.samples)
            loss = -rec.mean() + penalty(kl_dims)
        elif self.decoder_through_refinement:
            with _double_backward_ok(mean0):
                mean_k, logvar_k = self._refine(model, batch, mean0, logvar0, create_graph=True)
                elbo, rec, kl_dims = gaussian_elbo(model, batch, mean_k, logvar_k, self.samples)
            loss = -rec.mean() + penalty(kl_dims)
        else:
            # One set of draws for both paths, so the encoder's gradient is that of the reported value.
            noise = torch.randn((self.samples, *mean0.shape), dtype=mean0.dtype, device=mean0.device)
            with frozen(model), _double_backward_ok(mean0):  # encoder path: theta fixed
                mean_k, logvar_k = self._refine(model, batch, mean0, logvar0, create_graph=True)
                _, rec_e, kl_e = gaussian_elbo(model, batch, mean_k, logvar_k, noise=noise)
                enc_loss = -rec_e.mean() + penalty(kl_e)
            # decoder path: lambda_K fixed
            elbo, rec, kl_dims = gaussian_elbo(model, batch, mean_k.detach(), logvar_k.detach(), noise=noise)
            loss = -rec.mean() + penalty(kl_dims) + (enc_loss - enc_loss.detach())  # value: decoder path's
        with torch.no_grad():
            before = gaussian_elbo(model, batch, mean0.detach(), logvar0.detach(), self.samples)[0]
        extras["elbo_before_refinement"] = before.mean()
        return ObjectiveOutput(loss=loss, bound=elbo, reconstruction=rec, kl=kl_dims.sum(-1),
                               tokens=batch.lengths, extras=extras,
                               q=diagonal_gaussian(mean_k.detach(), logvar_k.detach()))
