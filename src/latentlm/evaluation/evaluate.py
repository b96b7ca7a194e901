"""One function that evaluates any trained system on a split: NLL/PPL, ELBO, KL, MI, AU."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.distributions import Normal

from latentlm.data.batching import TextDataset
from latentlm.evaluation.latent import active_units, mutual_information
from latentlm.evaluation.likelihood import importance_sampled_log_marginal, perplexity
from latentlm.inference.kl import kl_divergence_mc


def gaussian_parameters(q) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(mean, logvar) of a diagonal-Gaussian q, or of a flow's Gaussian base; else None."""
    base = getattr(q, "base", q)  # a flow keeps its Gaussian base distribution as .base
    normal = getattr(base, "base_dist", None)
    if isinstance(normal, Normal):
        return normal.loc, 2 * normal.scale.log()
    return None


@torch.no_grad()
def evaluate(system, dataset: TextDataset, samples: int = 500, batch_size: int = 50, seed: int = 1234,
             progress: bool = False) -> dict[str, Any]:
    """Per-dataset metrics in nats per example (and perplexity per token incl. </s>).

    ``nll`` is exact when the model has a tractable marginal, else the importance-sampled
    estimate with ``samples`` draws from q; ``elbo`` is the single-sample ELBO with
    closed-form KL where one exists. MI and AU use the posterior of every example in the
    split. Objectives that evaluate with another q than the encoder's (SA-VAE's refined q,
    SVI's per-example q) say so through ``evaluation_posterior``, and that q is used.
    For flows, MI and AU are computed from the flow's Gaussian base (an approximation).
    """
    from tqdm.auto import tqdm

    system.eval()
    model, posterior = system.model, system.posterior
    refine = getattr(system.objective, "evaluation_posterior", None)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    nll = elbo_sum = kl_sum = 0.0
    means, logvars = [], []
    for idx in tqdm(dataset.batch_indices(batch_size), desc="evaluate", disable=not progress, leave=False):
        batch = dataset.make_batch(idx)
        if model.has_exact_marginal:
            log_px = model.log_marginal(batch)
            nll -= float(log_px.sum())
            elbo_sum += float(log_px.sum())
            continue
        q = refine(model, posterior, batch) if refine is not None else posterior(batch)
        log_px = importance_sampled_log_marginal(model, posterior, batch, samples, q=q)
        nll -= float(log_px.sum())
        z = q.sample((1,))
        kl = kl_divergence_mc(q, model.prior(), z)
        elbo_sum += float((model.log_likelihood(batch, z)[0] - kl).sum())
        kl_sum += float(kl.sum())
        params = gaussian_parameters(q)
        if params is not None:
            means.append(params[0])
            logvars.append(params[1])
    n, tokens = len(dataset), dataset.num_tokens
    result = {"examples": n, "tokens": tokens, "nll": nll / n, "ppl": perplexity(nll, tokens),
              "elbo": elbo_sum / n, "kl": kl_sum / n, "mi": 0.0, "au": 0, "samples": samples}
    if means:
        means_t, logvars_t = torch.cat(means).float(), torch.cat(logvars).float()
        result["mi"] = mutual_information(means_t, logvars_t, generator=gen)
        result["au"] = active_units(means_t)
    if model.has_exact_marginal:
        result["samples"] = 0
    result["nll_per_token"] = nll / tokens
    result["bits_per_token"] = result["nll_per_token"] / math.log(2)
    return result
