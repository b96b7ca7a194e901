"""One function that evaluates any trained system on a split: NLL/PPL, ELBO, KL, MI, AU."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.distributions import Categorical

from latentlm.data.batching import TextDataset
from latentlm.data.parallel import ParallelDataset
from latentlm.device import module_device
from latentlm.evaluation.latent import LatentStatistics
from latentlm.evaluation.translation import translation_metrics
from latentlm.evaluation.likelihood import importance_sampled_log_marginal, perplexity
from latentlm.inference.local import LocalELBO
from latentlm.models.base import ConditionalGenerator, FiniteLatentModel
from latentlm.nn.output import frozen_parameters
from latentlm.precision import autocast


def _evaluate_batch(model, posterior, objective, batch, samples, totals, stats, usage) -> None:
    """Add one batch's NLL, ELBO and KL sums to ``totals`` and its q(z | x) to ``stats``
    (for a mixture with an amortized q, also which component each example uses)."""
    if isinstance(objective, LocalELBO):  # alignments: log p, the ELBO and the KL all enumerated exactly
        exact = objective.enumerated(model, posterior, batch)
        totals["nll"] -= float(exact["log_marginal"].sum())
        totals["elbo"] += float(exact["elbo"].sum())
        totals["kl"] += float(exact["kl"].sum())
        return
    if model.has_exact_marginal and isinstance(model, FiniteLatentModel):
        _evaluate_mixture_batch(model, posterior, objective, batch, totals, stats, usage)
        return
    if model.has_exact_marginal:
        log_px = float(model.log_marginal(batch).float().sum())
        totals["nll"] -= log_px
        totals["elbo"] += log_px
        return
    q = objective.evaluation_posterior(model, posterior, batch)
    log_px = importance_sampled_log_marginal(model, posterior, batch, samples, q=q)
    z = q.sample((1,))
    kl = stats.add(q)
    totals["nll"] -= float(log_px.sum())
    totals["elbo"] += float((model.log_likelihood(batch, z)[0].float() - kl).sum())
    totals["kl"] += float(kl.sum())


def _evaluate_mixture_batch(model, posterior, objective, batch, totals, stats, usage) -> None:
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
    q = objective.evaluation_posterior(model, posterior, batch)
    q = Categorical(logits=q.logits.float())
    probs = q.probs  # (B, K)
    kl = stats.add(q)
    totals["elbo"] += float(((probs.T * ll_all).sum(0) - kl).sum())
    totals["kl"] += float(kl.sum())
    usage["q"].append(probs.argmax(-1))


@torch.no_grad()
@frozen_parameters()  # no parameter changes inside: bf16 weight copies are kept
def evaluate(system, dataset: TextDataset, samples: int = 500, batch_size: int = 50, seed: int = 1234,
             progress: bool = False, precision: str = "fp32", beam: int = 0,
             max_decode_len: int = 80) -> dict[str, Any]:
    """Per-dataset metrics in nats per example (and perplexity per token incl. </s>).

    ``nll`` is exact when the model has a tractable marginal, else the importance-sampled
    estimate with ``samples`` draws from q; ``elbo`` is the single-sample ELBO with
    closed-form KL where one exists. KL, MI and AU are those of
    :class:`~latentlm.evaluation.latent.LatentStatistics` over every example of the split (the
    same definition as validation, the grid and the aggressive phase); ``mi`` / ``au`` are
    None where undefined (no q, a structured q), and ``latent_of`` names what they describe
    (for flows: the Gaussian base, an approximation). The q is the objective's
    ``evaluation_posterior`` (the encoder's, or SA-VAE's / SVI's refined q).
    For a finite mixture with an amortized categorical q (M2), ``nll`` is exact, ``elbo`` and
    ``kl`` enumerate q exactly, and ``components_used`` / ``q_components_used`` count the
    components that are some example's MAP under p(z | x) / under q.
    ``precision="bf16-mixed"`` runs the networks under bf16 autocast (fp32 normalizers);
    BENCHMARKS.md records how far its NLL moves from fp32.
    A translation model (a ``ConditionalGenerator``) on parallel text is also decoded with beam
    search when ``beam`` > 0 and scored with BLEU (``bleu``, ``bleu_signature``, ``decode_s``);
    its ``nll`` is exact (the marginal over alignments enumerated) and, with a q, so are its
    ``elbo`` and ``kl``.
    Runs on the device of ``system`` (move it first, e.g. ``load_pretrained(dir, device=...)``);
    batches follow it, and ``result["device"]`` says where it ran.
    """
    from tqdm.auto import tqdm

    system.eval()
    model, posterior, objective = system.model, system.posterior, system.objective
    device = module_device(system)
    torch.manual_seed(seed)  # seeds the CPU and every CUDA generator
    totals = {"nll": 0.0, "elbo": 0.0, "kl": 0.0}
    # q(z | x) is scored wherever there is one: the encoder's, or (no encoder, no exact marginal:
    # e.g. structured mean field on a factorial HMM too large to enumerate) the objective's own
    stats = LatentStatistics(model.prior()) if LatentStatistics.describes(model) and (
        posterior is not None or not model.has_exact_marginal) else None
    usage: dict[str, list[torch.Tensor]] = {"exact": [], "q": []}
    autocast(precision, device)  # an unknown precision fails here, before any work
    for idx in tqdm(dataset.batch_indices(batch_size), desc="evaluate", disable=not progress, leave=False):
        with autocast(precision, device):
            _evaluate_batch(model, posterior, objective, dataset.make_batch(idx).to(device), samples, totals, stats,
                            usage)
    n, tokens, nll = len(dataset), dataset.num_tokens, totals["nll"]
    result = {"examples": n, "tokens": tokens, "nll": nll / n, "ppl": perplexity(nll, tokens),
              "elbo": totals["elbo"] / n, "ppl_bound": perplexity(-totals["elbo"], tokens), "kl": totals["kl"] / n,
              "mi": None, "au": None, "latent_of": None, "samples": samples}
    if stats is not None and stats.examples:
        latent = stats.result(seed)
        result.update(mi=latent["mi"], au=latent["au"], latent_of=latent["latent_of"])
    if usage["exact"]:
        # components that are the MAP of some example, under the exact posterior and under q
        result["components_used"] = int(torch.cat(usage["exact"]).unique().numel())
        if usage["q"]:
            result["q_components_used"] = int(torch.cat(usage["q"]).unique().numel())
    if model.has_exact_marginal:
        result["samples"] = 0
    result["nll_per_token"] = nll / tokens
    result["bits_per_token"] = result["nll_per_token"] / math.log(2)
    result["device"] = str(device)
    if beam > 0 and isinstance(model, ConditionalGenerator) and isinstance(dataset, ParallelDataset):
        translation = translation_metrics(system, dataset, beam, batch_size, max_decode_len, precision, progress)
        result.update({k: v for k, v in translation.items() if k != "translations"})
    return result
