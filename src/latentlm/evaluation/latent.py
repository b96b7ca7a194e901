"""E2: how much the latent code is used — KL, mutual information, active units.

All three are computed over a whole dataset, so the numbers do not depend on the
evaluation batch size (the research code's MI estimate did). :class:`LatentStatistics`
is the one definition: ``evaluate``, the trainer's ``validate``, ``latentlm grid`` and the
aggressive phase's MI check all feed it the q(z | x) of every example and read its result.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.distributions import Categorical, Distribution, Independent, Normal, kl_divergence

from latentlm.device import module_device
from latentlm.inference.flows import FlowDistribution

#: z draws per example for the Gaussian MI estimate, everywhere.
MI_SAMPLES = 4


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
    means: torch.Tensor, logvars: torch.Tensor, generator: torch.Generator | None = None, chunk: int = 256,
    samples: int = 1,
) -> float:
    """I_q(x; z) = E_x E_q(z|x)[log q(z|x) - log q(z)] with q(z) the aggregate posterior
    (1/N) sum_n q(z | x_n) over all N examples (Hoffman & Johnson 2016; He et al. 2019).

    ``samples`` draws z ~ q(z | x_n) per example; both log-densities are taken at the same
    z, so their noise cancels: when every posterior is the same the estimate is exactly 0
    (the research code's closed-form entropy minus a sampled cross term has a standard
    error of about sqrt(D / 2N) nats, which swamps a near-collapsed code in 32 dimensions).
    """
    N, D = means.shape
    # drawn on the generator's device (a CPU generator gives the same numbers wherever means live)
    eps = torch.randn((samples, N, D), generator=generator, dtype=means.dtype,
                      device=means.device if generator is None else generator.device).to(means.device)
    z = means + eps * (0.5 * logvars).exp()  # (S, N, D)
    log_own = gaussian_log_density(z, means, logvars)  # (S, N)
    log_agg = []
    for start in range(0, N, chunk):
        zc = z[:, start : start + chunk, None, :]  # (S, c, 1, D)
        log_agg.append(torch.logsumexp(gaussian_log_density(zc, means, logvars), dim=-1) - math.log(N))  # (S, c)
    return float((log_own - torch.cat(log_agg, dim=1)).mean())


@torch.no_grad()
def categorical_mutual_information(probs: torch.Tensor) -> float:
    """Exact I_q(x; z) for categorical q's (N, K): H((1/N) sum_n q_n) - (1/N) sum_n H(q_n)."""
    probs = probs.double()
    def entropy(p):
        return -(p * p.clamp_min(1e-300).log()).sum(-1)
    return float(entropy(probs.mean(0)) - entropy(probs).mean())


def _gaussian(q: Distribution) -> Normal | None:
    """The diagonal Normal of q = Independent(Normal(., .), 1); None for any other q."""
    if isinstance(q, Independent) and isinstance(q.base_dist, Normal) and q.reinterpreted_batch_ndims == 1:
        return q.base_dist
    return None


class LatentStatistics:
    """KL(q || p), I_q(x; z) and active units over a split, from q(z | x) batch by batch.

    ``add(q)`` takes one batch's posterior and returns its per-example KL (B,): closed form
    when torch knows it, else -H(q) - E_q log p(z) when q has an exact entropy, else a
    Monte Carlo estimate with ``kl_samples`` draws. ``result(seed)`` returns ``kl`` (mean per
    example), ``mi``, ``au`` and ``examples``:

    * diagonal Gaussian q: MI by :func:`mutual_information` (``MI_SAMPLES`` draws per example,
      aggregate posterior over the whole split), AU by :func:`active_units` of the means;
    * flow q: the same, of its Gaussian *base* (the flow's own aggregate density has no
      cheap form) — ``latent_of`` says ``"flow base"``;
    * categorical q: MI exact (:func:`categorical_mutual_information`), AU undefined (None);
    * any other q (a chain CRF): MI and AU None.
    """

    @staticmethod
    def describes(model) -> bool:
        """Whether the model has one z per example for these statistics to describe; a latent per
        target position (attention's alignments, ``latent == "local"``) has no KL / MI / AU here."""
        return model.latent != "local"

    def __init__(self, prior: Distribution, kl_samples: int = 1, mi_samples: int = MI_SAMPLES):
        self.prior, self.kl_samples, self.mi_samples = prior, kl_samples, mi_samples
        self.kl_total, self.examples = 0.0, 0
        self.means: list[torch.Tensor] = []
        self.logvars: list[torch.Tensor] = []
        self.probs: list[torch.Tensor] = []
        self.kinds: set[str] = set()

    @torch.no_grad()
    def add(self, q: Distribution) -> torch.Tensor:
        kl = self._kl(q).float()
        self.kl_total += float(kl.sum())
        self.examples += kl.numel()
        normal = _gaussian(q.base if isinstance(q, FlowDistribution) else q)
        if normal is not None:
            self.kinds.add("flow base" if isinstance(q, FlowDistribution) else "gaussian")
            self.means.append(normal.loc.float())
            self.logvars.append(2 * normal.scale.float().log())
        elif isinstance(q, Categorical):
            self.kinds.add("categorical")
            self.probs.append(q.probs.float())
        else:
            self.kinds.add("other")
        return kl

    def state(self) -> dict[str, Any]:
        """What ``merge`` needs, as plain CPU tensors (sent between data-parallel ranks)."""
        return {"kl_total": self.kl_total, "examples": self.examples, "kinds": sorted(self.kinds),
                "means": [t.cpu() for t in self.means], "logvars": [t.cpu() for t in self.logvars],
                "probs": [t.cpu() for t in self.probs]}

    @classmethod
    def from_state(cls, prior: Distribution, state: dict[str, Any]) -> "LatentStatistics":
        out = cls(prior)
        out.kl_total, out.examples, out.kinds = state["kl_total"], state["examples"], set(state["kinds"])
        out.means, out.logvars, out.probs = state["means"], state["logvars"], state["probs"]
        return out

    def merge(self, other: "LatentStatistics") -> None:
        """Add another part of the split (examples after this one's)."""
        self.kl_total += other.kl_total
        self.examples += other.examples
        self.kinds |= other.kinds
        device = self.means[0].device if self.means else None
        move = (lambda t: t.to(device)) if device is not None else (lambda t: t)
        self.means += [move(t) for t in other.means]
        self.logvars += [move(t) for t in other.logvars]
        self.probs += other.probs

    def _kl(self, q: Distribution) -> torch.Tensor:
        try:
            return kl_divergence(q, self.prior)
        except NotImplementedError:
            pass
        z = q.sample((self.kl_samples,))
        try:
            neg_entropy = -q.entropy()
        except NotImplementedError:
            neg_entropy = q.log_prob(z).mean(0)
        return neg_entropy - self.prior.log_prob(z).mean(0)

    def result(self, seed: int = 0) -> dict[str, Any]:
        out: dict[str, Any] = {"kl": self.kl_total / max(1, self.examples), "mi": None, "au": None,
                               "examples": self.examples, "latent_of": None}
        if len(self.kinds) != 1:
            return out
        (kind,) = self.kinds
        out["latent_of"] = kind
        if self.means:
            means, logvars = torch.cat(self.means), torch.cat(self.logvars)
            out["mi"] = mutual_information(means, logvars, generator=torch.Generator().manual_seed(seed),
                                           samples=self.mi_samples)
            out["au"] = active_units(means)
        elif self.probs:
            out["mi"] = categorical_mutual_information(torch.cat(self.probs))
        return out

    def posterior_means(self) -> torch.Tensor | None:
        """E_q[z | x] (N, D) of a Gaussian q (the base's for a flow), in the order added."""
        return torch.cat(self.means) if self.means else None


@torch.no_grad()
def latent_statistics(system, dataset, batch_size: int = 50, seed: int = 0
                      ) -> tuple[dict[str, Any], LatentStatistics | None]:
    """:class:`LatentStatistics` of the q the system evaluates with
    (``objective.evaluation_posterior``: the encoder's q, or SA-VAE's / SVI's refined one) over
    every example of ``dataset``; global RNG seeded with ``seed`` for any sampled KL."""
    model, posterior, objective = system.model, system.posterior, system.objective
    if posterior is None or not LatentStatistics.describes(model):  # no q, or no global z: no latent statistics
        return {"kl": 0.0, "mi": None, "au": None, "examples": len(dataset), "latent_of": None}, None
    stats = LatentStatistics(model.prior())
    device = module_device(system)
    was_training = system.training
    system.eval()
    torch.manual_seed(seed)
    try:
        for batch in dataset.batches(batch_size):
            stats.add(objective.evaluation_posterior(model, posterior, batch.to(device)))
    finally:
        system.train(was_training)
    return stats.result(seed), stats
