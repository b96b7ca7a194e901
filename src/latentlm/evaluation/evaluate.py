"""One function that evaluates any trained system on a split: NLL/PPL, ELBO, KL, MI, AU."""

from __future__ import annotations

import math
from typing import Any

import torch

from latentlm.data.batching import TextDataset
from latentlm.evaluation.latent import active_units, mutual_information
from latentlm.evaluation.likelihood import importance_sampled_log_marginal, perplexity
from latentlm.inference.elbo import ELBO


@torch.no_grad()
def evaluate(system, dataset: TextDataset, samples: int = 500, batch_size: int = 50, seed: int = 1234,
             progress: bool = False) -> dict[str, Any]:
    """Per-dataset metrics in nats per example (and perplexity per token incl. </s>).

    ``nll`` is exact when the model has a tractable marginal, else the importance-sampled
    estimate with ``samples`` draws from q; ``elbo`` is the single-sample ELBO with
    closed-form KL. MI and AU use the posterior of every example in the split.
    """
    from tqdm.auto import tqdm

    system.eval()
    model, posterior = system.model, system.posterior
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    elbo_objective = ELBO(samples=1)
    nll = elbo_sum = kl_sum = 0.0
    means, logvars = [], []
    batches = list(dataset.batch_indices(batch_size))
    for idx in tqdm(batches, desc="evaluate", disable=not progress, leave=False):
        batch = dataset.make_batch(idx)
        if model.has_exact_marginal:
            log_px = model.log_marginal(batch)
            nll -= float(log_px.sum())
            elbo_sum += float(log_px.sum())
            continue
        log_px = importance_sampled_log_marginal(model, posterior, batch, samples)
        nll -= float(log_px.sum())
        out = elbo_objective(model, posterior, batch)
        elbo_sum += float(out.bound.sum())
        kl_sum += float(out.kl.sum())
        if hasattr(posterior, "params"):
            m, lv = posterior.params(batch)
            means.append(m)
            logvars.append(lv)
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
