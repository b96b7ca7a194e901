"""L7: normalizing flows on the Gaussian posterior — planar (Rezende & Mohamed 2015) and
inverse autoregressive (IAF, Kingma et al. 2016).

q(z_K | x) is a diagonal Gaussian q_0(z_0 | x) pushed through K invertible maps
z_k = f_k(z_{k-1}); by the change of variables

    log q(z_K | x) = log q_0(z_0 | x) - sum_k log |det d f_k / d z_{k-1}|.

:class:`FlowDistribution` is a ``torch.distributions.Distribution`` with ``rsample``
and ``log_prob``. The density of a sample it drew itself is cached (the usual case: the
ELBO and IWAE ask for ``log_prob`` of their own samples); any other z is mapped back to
z_0 by the exact inverse (a scalar root-find per planar layer, D sequential passes per
IAF layer), so ``log_prob`` is a true density everywhere. There is no closed-form KL, so
the ELBO estimates log p(x, z) - log q(z | x) whole, by reparameterization.

Flow parameters are amortized: each layer reads a context vector h(x) from the encoder
(planar: u, w, b are linear in h; IAF: h enters every MADE's first hidden layer).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Distribution, Independent, Normal, constraints

from latentlm.data.batching import Batch
from latentlm.errors import ConfigError
from latentlm.inference.base import FlowPosterior
from latentlm.nn.encoders import LSTMEncoder


class FlowLayer(nn.Module):
    """One invertible map z -> f(z; h). ``forward`` gives (f(z), log|det J|); z is (..., B, D),
    the context h is (B, C) and broadcasts over the leading sample dimensions."""

    def forward(self, z: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError  # pragma: no cover - interface

    def inverse(self, y: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(f^{-1}(y), log|det J_f| at f^{-1}(y))."""
        raise NotImplementedError  # pragma: no cover - interface


_MARGIN = 1e-3


class PlanarFlow(FlowLayer):
    """f(z) = z + u_hat tanh(w.z + b), with u_hat constrained so that w.u_hat >= -1 (invertible).

    log|det J| = log|1 + u_hat.w (1 - tanh^2(w.z + b))|.
    """

    def __init__(self, dim: int, context_dim: int):
        super().__init__()
        self.dim = dim
        self.to_params = nn.Linear(context_dim, 2 * dim + 1)  # u, w, b per example
        nn.init.normal_(self.to_params.weight, std=0.01)
        with torch.no_grad():
            self.to_params.bias.normal_(std=0.1)

    def params(self, context: torch.Tensor):
        u, w, b = self.to_params(context).split([self.dim, self.dim, 1], dim=-1)  # (B, D), (B, D), (B, 1)
        wu = (w * u).sum(-1, keepdim=True)
        # Rezende & Mohamed (2015), appendix A: m(a) = -1 + softplus(a) keeps w.u_hat > -1; the
        # small margin keeps it strictly above -1 in float32, where softplus(a << 0) rounds away.
        u_hat = u + (F.softplus(wu) - 1 + _MARGIN - wu) * w / (w * w).sum(-1, keepdim=True).clamp_min(1e-8)
        return u_hat, w, b

    def forward(self, z, context):
        u, w, b = self.params(context)
        a = (z * w).sum(-1, keepdim=True) + b  # (..., B, 1)
        h = torch.tanh(a)
        psi_u = (1 - h * h) * (w * u).sum(-1, keepdim=True)  # (..., B, 1)
        return z + u * h, torch.log((1 + psi_u).abs().clamp_min(1e-12)).squeeze(-1)

    def inverse(self, y, context, iterations: int = 100):
        u, w, b = self.params(context)
        # y = z + u tanh(w.z + b): with alpha = w.z, w.y = alpha + (w.u) tanh(alpha + b), a strictly
        # increasing function of alpha (w.u > -1), so bisection finds alpha; then z = y - u tanh(alpha + b).
        wy, wu = (y * w).sum(-1, keepdim=True), (w * u).sum(-1, keepdim=True)
        spread = wu.abs() + 1.0
        lo, hi = wy - spread, wy + spread  # |alpha - w.y| <= |w.u|
        for _ in range(iterations):
            mid = 0.5 * (lo + hi)
            above = mid + wu * torch.tanh(mid + b) > wy
            hi, lo = torch.where(above, mid, hi), torch.where(above, lo, mid)
        alpha = 0.5 * (lo + hi)
        z = y - u * torch.tanh(alpha + b)
        _, log_det = self.forward(z, context)
        return z, log_det


class MaskedLinear(nn.Linear):
    def __init__(self, in_features: int, out_features: int, mask: torch.Tensor):
        super().__init__(in_features, out_features)
        self.register_buffer("mask", mask.float(), persistent=False)

    def forward(self, x):
        return F.linear(x, self.weight * self.mask, self.bias)


class MADE(nn.Module):
    """Autoregressive network (Germain et al. 2015): outputs (m, s), each (..., D), where output
    d depends on inputs < d only (and on the context, through the first hidden layer)."""

    def __init__(self, dim: int, hidden_dim: int, context_dim: int):
        super().__init__()
        in_deg = torch.arange(1, dim + 1)
        hid_deg = torch.arange(hidden_dim) % max(1, dim - 1) + 1  # degrees 1..D-1
        self.inp = MaskedLinear(dim, hidden_dim, hid_deg[:, None] >= in_deg[None, :])
        self.hid = MaskedLinear(hidden_dim, hidden_dim, hid_deg[:, None] >= hid_deg[None, :])
        out_mask = in_deg[:, None] > hid_deg[None, :]  # (D, H): output d sees hidden units of degree < d
        self.out = MaskedLinear(hidden_dim, 2 * dim, torch.cat([out_mask, out_mask]))
        self.context = nn.Linear(context_dim, hidden_dim, bias=False)
        nn.init.zeros_(self.out.weight)  # start at the identity map
        nn.init.zeros_(self.out.bias)

    def forward(self, z, context):
        h = F.elu(self.inp(z) + self.context(context))
        h = F.elu(self.hid(h))
        return self.out(h).chunk(2, dim=-1)


class IAFLayer(FlowLayer):
    """z' = sigma * z + (1 - sigma) * m, sigma = sigmoid(s + forget_bias); (m, s) = MADE(z, h),
    then the dimensions are reversed so the next layer conditions the other way
    (Kingma et al. 2016, the numerically stable LSTM-style update). log|det J| = sum log sigma.
    """

    def __init__(self, dim: int, context_dim: int, hidden_dim: int = 64, forget_bias: float = 1.0):
        super().__init__()
        self.made = MADE(dim, hidden_dim, context_dim)
        self.forget_bias = forget_bias

    def _gate(self, z, context):
        m, s = self.made(z, context)
        return m, torch.sigmoid(s + self.forget_bias)

    def forward(self, z, context):
        m, sigma = self._gate(z, context)
        out = sigma * z + (1 - sigma) * m
        return out.flip(-1), torch.log(sigma).sum(-1)

    def inverse(self, y, context):
        y = y.flip(-1)
        z = torch.zeros_like(y)
        for d in range(y.size(-1)):  # (m_d, sigma_d) depend on z_<d only: D sequential passes
            m, sigma = self._gate(z, context)
            z = z.clone()
            z[..., d] = (y[..., d] - (1 - sigma[..., d]) * m[..., d]) / sigma[..., d]
        m, sigma = self._gate(z, context)
        return z, torch.log(sigma).sum(-1)


FLOWS: dict[str, type[FlowLayer]] = {"planar": PlanarFlow, "iaf": IAFLayer}


class FlowDistribution(Distribution):
    """q(z | x) = a diagonal Gaussian base (batch (B,), event (D,)) pushed through ``layers``."""

    arg_constraints: dict = {}
    support = constraints.real_vector
    has_rsample = True

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor, layers: nn.ModuleList, context: torch.Tensor):
        self.base = Independent(Normal(mean, torch.exp(0.5 * logvar), validate_args=False), 1, validate_args=False)
        self.layers, self.context = layers, context
        self._cache: tuple[torch.Tensor, torch.Tensor] | None = None  # (z, log q(z)) of the last rsample
        super().__init__(mean.shape[:-1], mean.shape[-1:], validate_args=False)

    def transform(self, z0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_K, sum_k log|det J_k|) for z_0 (..., B, D)."""
        log_det = torch.zeros(z0.shape[:-1], dtype=z0.dtype, device=z0.device)
        z = z0
        for layer in self.layers:
            z, ld = layer(z, self.context)
            log_det = log_det + ld
        return z, log_det

    def inverse(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(z_0, sum_k log|det J_k|) for z_K (..., B, D)."""
        log_det = torch.zeros(z.shape[:-1], dtype=z.dtype, device=z.device)
        for layer in reversed(self.layers):
            z, ld = layer.inverse(z, self.context)
            log_det = log_det + ld
        return z, log_det

    def rsample(self, sample_shape=torch.Size()) -> torch.Tensor:
        z0 = self.base.rsample(sample_shape)  # (S, B, D)
        z, log_det = self.transform(z0)
        self._cache = (z, self.base.log_prob(z0) - log_det)
        return z

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._cache is not None and value is self._cache[0]:
            return self._cache[1]
        z0, log_det = self.inverse(value)
        out = self.base.log_prob(z0) - log_det
        # A contracting flow maps a huge region far from the data to a sliver of z-space; points
        # there have preimages that overflow. Their density underflows too: report -inf, not NaN.
        return out.masked_fill(~torch.isfinite(z0).all(-1), -torch.inf)

    @property
    def mean(self) -> torch.Tensor:  # pragma: no cover - no closed form
        raise NotImplementedError("a flow posterior has no closed-form mean; average rsample() draws")


class FlowLSTMPosterior(FlowPosterior):
    """Amortized flow posterior: LSTM over the sentence -> base (mean, log-variance) and a
    context vector for ``layers`` flow layers of kind ``flow`` (``planar`` or ``iaf``).

    A :class:`~latentlm.inference.base.FlowPosterior`, not a Gaussian one: SA-VAE / SVI
    refinement and per-dimension free bits refuse it (they would act on the base alone).
    ``base_params(batch)`` gives the base Gaussian's (mean, log-variance).
    """

    def __init__(self, vocab_size: int, latent_dim: int, flow: str = "planar", layers: int = 4,
                 embed_dim: int = 256, hidden_dim: int = 256, context_dim: int = 64, flow_hidden_dim: int = 64):
        super().__init__()
        if flow not in FLOWS:
            raise ConfigError(f"posterior.flow {flow!r} unknown; choose one of {sorted(FLOWS)}")
        self.encoder = LSTMEncoder(vocab_size, embed_dim, hidden_dim)
        self.to_params = nn.Linear(hidden_dim, 2 * latent_dim)
        self.to_context = nn.Linear(hidden_dim, context_dim)
        extra = {"hidden_dim": flow_hidden_dim} if flow == "iaf" else {}
        self.layers = nn.ModuleList(FLOWS[flow](latent_dim, context_dim, **extra) for _ in range(layers))

    def encode(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.encoder(batch.tokens, batch.lengths)  # (B, H)
        mean, logvar = self.to_params(h).chunk(2, dim=-1)
        return mean, logvar, torch.tanh(self.to_context(h))  # (B, D), (B, D), (B, C)

    def base_params(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar, _ = self.encode(batch)
        return mean, logvar

    def forward(self, batch: Batch) -> FlowDistribution:
        mean, logvar, context = self.encode(batch)
        return FlowDistribution(mean, logvar, self.layers, context)
