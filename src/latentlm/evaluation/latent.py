"""E2: how much the latent code is used — KL, mutual information, active units.

All three are computed over a whole dataset, so the numbers do not depend on the
evaluation batch size (the research code's MI estimate did).
"""

from __future__ import annotations

import math

import torch


def active_units(means: torch.Tensor, threshold: float = 0.01) -> int:
    """Dimensions d with Cov_x(E_q[z_d | x]) > threshold (Burda et al. 2016); means is (N, D)."""
    if means.size(0) < 2:
        return 0
    return int((means.var(0, unbiased=True) > threshold).sum())


def gaussian_log_density(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, diag exp(logvar)) summed over the last dim, broadcasting."""
    return -0.5 * (math.log(2 * math.pi) + logvar + (z - mean) ** 2 / logvar.exp()).sum(-1)


@torch.no_grad()
def mutual_information(
    means: torch.Tensor, logvars: torch.Tensor, generator: torch.Generator | None = None, chunk: int = 256
) -> float:
    """I_q(x; z) = E_x E_q(z|x)[log q(z|x)] - E_q(z)[log q(z)] with q(z) the aggregate
    posterior (1/N) sum_n q(z | x_n) over all N examples (Hoffman & Johnson 2016; He et al. 2019).

    One z per example from its own posterior; the first term is in closed form.
    """
    N, D = means.shape
    neg_entropy = (-0.5 * D * math.log(2 * math.pi) - 0.5 * (1 + logvars).sum(-1)).mean()
    eps = torch.randn(means.shape, generator=generator, dtype=means.dtype)
    z = means + eps * (0.5 * logvars).exp()  # (N, D)
    log_qz = []
    for start in range(0, N, chunk):
        zc = z[start : start + chunk, None, :]  # (c, 1, D)
        log_qz.append(torch.logsumexp(gaussian_log_density(zc, means[None], logvars[None]), dim=1) - math.log(N))
    return float(neg_entropy - torch.cat(log_qz).mean())
