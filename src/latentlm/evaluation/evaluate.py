"""One function that evaluates any trained system on a split: NLL/PPL, ELBO, KL, MI, AU."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.distributions import Categorical, Normal, kl_divergence

from latentlm.data.batching import TextDataset
from latentlm.evaluation.latent import active_units, mutual_information
from latentlm.evaluation.likelihood import importance_sampled_log_marginal, perplexity
from latentlm.inference.kl import kl_divergence_mc
from latentlm.precision import autocast


def _evaluate_batch(model, posterior, refine, batch, samples, totals, means, logvars, usage) -> None:
    """Add one batch's NLL, ELBO and KL sums to ``totals``; collect its Gaussian q's parameters
    (or, for a mixture with an amortized q, which component each example uses)."""
    if model.has_exact_marginal and hasattr(model, "log_likelihood_all"):
        _evaluate_mixture_batch(model, posterior, batch, totals, usage)
        return
    if model.has_exact_marginal:
        log_px = float(model.log_marginal(batch).float().sum())
        totals["nll"] -= log_px
        totals["elbo"] += log_px
        return
    q = refine(model, posterior, batch) if refine is not None else posterior(batch)
    log_px = importance_sampled_log_marginal(model, posterior, batch, samples, q=q)
    z = q.sample((1,))
    kl = kl_divergence_mc(q, model.prior(), z).float()
    params = gaussian_parameters(q)
    if params is not None:
        means.append(params[0].float())
        logvars.append(params[1].float())
    totals["nll"] -= float(log_px.sum())
    totals["elbo"] += float((model.log_likelihood(batch, z)[0] - kl).sum())
    totals["kl"] += float(kl.sum())


def _evaluate_mixture_batch(model, posterior, batch, totals, usage) -> None:
    """A finite mixture with q(z | x): exact log p(x) by enumeration, and the ELBO of q with the
    expectation over z also enumerated (no sampling noise); KL(q || p) in closed form."""
    prior = model.prior()
    ll_all = model.log_likelihood_all(batch).float()  # (K, B)
    joint = prior.logits.float()[:, None] + ll_all
    log_px = torch.logsumexp(joint, 0)
    totals["nll"] -= float(log_px.sum())
    usage["exact"].append(joint.argmax(0))
    if posterior is None:  # trained on the exact marginal: the bound is log p(x) itself
        totals["elbo"] += float(log_px.sum())
        return
    q = posterior(batch)
    probs = q.probs.float()  # (B, K)
    kl = kl_divergence(Categorical(logits=q.logits.float()), Categorical(logits=prior.logits.float()))  # (B,)
    totals["elbo"] += float(((probs.T * ll_all).sum(0) - kl).sum())
    totals["kl"] += float(kl.sum())
    usage["q"].append(probs.argmax(-1))


def gaussian_parameters(q) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean, logvar) of a diagonal-Gaussian q, or of a flow's Gaussian base; else None."""
    base = getattr(q, "base", q)  # a flow keeps its Gaussian base distribution as .base
    normal = getattr(base, "base_dist", None)
    if isinstance(normal, Normal):
        return normal.loc, 2 * normal.scale.log()
    return None


@torch.no_grad()
def evaluate(system, dataset: TextDataset, samples: int = 500, batch_size: int = 50, seed: int = 1234,
             progress: bool = False, precision: str = "fp32") -> dict[str, Any]:
    """Per-dataset metrics in nats per example (and perplexity per token incl. </s>).

    ``nll`` is exact when the model has a tractable marginal, else the importance-sampled
    estimate with ``samples`` draws from q; ``elbo`` is the single-sample ELBO with
    closed-form KL where one exists. MI and AU use the posterior of every example in the
    split. Objectives that evaluate with another q than the encoder's (SA-VAE's refined q,
    SVI's per-example q) say so through ``evaluation_posterior``, and that q is used.
    For flows, MI and AU are computed from the flow's Gaussian base (an approximation).
    For a finite mixture with an amortized categorical q (M2), ``nll`` is exact, ``elbo`` and
    ``kl`` enumerate q exactly, and ``components_used`` / ``q_components_used`` count the
    components that are some example's MAP under p(z | x) / under q.
    ``precision="bf16-mixed"`` runs the networks under bf16 autocast (fp32 normalizers);
    BENCHMARKS.md records how far its NLL moves from fp32.
    """
    from tqdm.auto import tqdm

    system.eval()
    model, posterior = system.model, system.posterior
    refine = getattr(system.objective, "evaluation_posterior", None)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    totals = {"nll": 0.0, "elbo": 0.0, "kl": 0.0}
    means, logvars = [], []
    usage: dict[str, list[torch.Tensor]] = {"exact": [], "q": []}
    autocast(precision)  # an unknown precision fails here, before any work
    for idx in tqdm(dataset.batch_indices(batch_size), desc="evaluate", disable=not progress, leave=False):
        with autocast(precision):
            _evaluate_batch(model, posterior, refine, dataset.make_batch(idx), samples, totals, means, logvars,
                            usage)
    n, tokens, nll = len(dataset), dataset.num_tokens, totals["nll"]
    result = {"examples": n, "tokens": tokens, "nll": nll / n, "ppl": perplexity(nll, tokens),
              "elbo": totals["elbo"] / n, "ppl_bound": perplexity(-totals["elbo"], tokens), "kl": totals["kl"] / n, "mi": 0.0, "au": 0, "samples": samples}
    if means:
        means_t, logvars_t = torch.cat(means).float(), torch.cat(logvars).float()
        result["mi"] = mutual_information(means_t, logvars_t, generator=gen)
        result["au"] = active_units(means_t)
    if usage["exact"]:
        # components that are the MAP of some example, under the exact posterior and under q
        result["components_used"] = int(torch.cat(usage["exact"]).unique().numel())
        if usage["q"]:
            result["q_components_used"] = int(torch.cat(usage["q"]).unique().numel())
    if model.has_exact_marginal:
        result["samples"] = 0
    result["nll_per_token"] = nll / tokens
    result["bits_per_token"] = result["nll_per_token"] / math.log(2)
    return result
