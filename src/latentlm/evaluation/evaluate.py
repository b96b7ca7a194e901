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


def _evaluate_batch(model, posterior, refine, batch, samples, totals, means, logvars) -> None:
    """Add one batch's NLL, ELBO and KL sums to ``totals``; collect its Gaussian q's parameters."""
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
    ``precision="bf16-mixed"`` runs the networks under bf16 autocast (fp32 normalizers);
    BENCHMARKS.md records how far its NLL moves from fp32.
    """
    import contextlib
    from tqdm.auto import tqdm

    system.eval()
    model, posterior = system.model, system.posterior
    refine = getattr(system.objective, "evaluation_posterior", None)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    totals = {"nll": 0.0, "elbo": 0.0, "kl": 0.0}
    means, logvars = [], []
    if precision not in ("fp32", "bf16-mixed"):
        raise ValueError(f"precision must be 'fp32' or 'bf16-mixed', got {precision!r}")
    cast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if precision == "bf16-mixed" else contextlib.nullcontext
    for idx in tqdm(dataset.batch_indices(batch_size), desc="evaluate", disable=not progress, leave=False):
        with cast():
            _evaluate_batch(model, posterior, refine, dataset.make_batch(idx), samples, totals, means, logvars)
    n, tokens, nll = len(dataset), dataset.num_tokens, totals["nll"]
    result = {"examples": n, "tokens": tokens, "nll": nll / n, "ppl": perplexity(nll, tokens),
              "elbo": totals["elbo"] / n, "kl": totals["kl"] / n, "mi": 0.0, "au": 0, "samples": samples}
    if means:
        means_t, logvars_t = torch.cat(means).float(), torch.cat(logvars).float()
        result["mi"] = mutual_information(means_t, logvars_t, generator=gen)
        result["au"] = active_units(means_t)
    if model.has_exact_marginal:
        result["samples"] = 0
    result["nll_per_token"] = nll / tokens
    result["bits_per_token"] = result["nll_per_token"] / math.log(2)
    return result
