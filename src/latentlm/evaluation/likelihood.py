"""E1: log p(x) exactly or by importance sampling, and perplexity."""

from __future__ import annotations

import math

import torch

from latentlm.data.batching import Batch
from latentlm.data.documents import BowBatch
from latentlm.inference.base import Posterior
from latentlm.models.base import LatentVariableModel
from latentlm.nn.output import frozen_parameters

#: rows x positions the decoder sees at once while importance sampling; bounds the
#: (rows, V) logits buffer to a few hundred MB at V = 10k.
IS_TOKENS_PER_CHUNK = 12_000


@torch.no_grad()
@frozen_parameters()  # no parameter changes inside: bf16 weight copies are kept
def importance_sampled_log_marginal(
    model: LatentVariableModel, posterior: Posterior, batch: Batch, samples: int = 500,
    chunk: int | None = None, noise: torch.Tensor | None = None, q=None,
) -> torch.Tensor:
    """log p(x) ~= log (1/k) sum_k p(x, z_k) / q(z_k | x), z_k ~ q(z | x); (B,).

    The k samples run in chunks of ``chunk`` samples for the whole batch, each chunk one
    batched decoder pass over (chunk * B) rows. ``batch`` is a token ``Batch`` or a document
    ``BowBatch`` (whose default chunk counts one row of V logits per document). Consistent:
    -> log p(x) as k grows, and a lower bound in expectation for every k (the IWAE bound).
    ``noise`` (k, B, D), for a Gaussian q, fixes the standard-normal draws
    (z = mean + std * noise) so that two evaluations can use the same samples. ``q`` skips the call to ``posterior`` when the
    caller already holds q(z | x) for this batch.
    """
    q = posterior(batch) if q is None else q
    p = model.prior()
    if chunk is None:  # a document BowBatch has no positions: one row per document
        positions = 1 if isinstance(batch, BowBatch) else batch.inputs.size(1)
        chunk = max(1, IS_TOKENS_PER_CHUNK // max(1, batch.size * positions))
    log_likelihood = model.log_likelihood_of(batch)  # what depends on x alone, once
    log_w = []
    for start in range(0, samples, chunk):
        n = min(chunk, samples - start)
        if noise is None:
            z = q.sample((n,))  # (c, B, D)
        else:
            z = q.base_dist.loc + q.base_dist.scale * noise[start : start + n]
        log_w.append(log_likelihood(z) + p.log_prob(z) - q.log_prob(z))
    return torch.logsumexp(torch.cat(log_w), 0) - math.log(samples)


def perplexity(total_nll: float, total_tokens: int) -> float:
    """exp(total NLL / total tokens), tokens counting end-of-sentence."""
    try:
        return math.exp(total_nll / max(1, total_tokens))
    except OverflowError:
        return math.inf
