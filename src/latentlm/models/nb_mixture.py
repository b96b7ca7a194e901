"""M1: the naive-Bayes mixture of unigrams.

z ~ Cat(mu) over K clusters; every token of a document ~ Cat(pi_z). The document's token
*sequence* has probability prod_w pi_{z,w}^{c_w}, so with counts c (B, V)

    log p(x, z=k) = log mu_k + c @ log pi_k        (one sparse-dense matmul for all k)
    log p(x)      = logsumexp_k log p(x, z=k)      (exact, K is small)

No multinomial coefficient: we score the sequence, as a language model does, so
perplexities compare with M0/M2. Parameters are unconstrained logits so the same module
is trained by closed-form EM (:mod:`latentlm.inference.em` writes log-probabilities into
them) or by gradient ascent on the exact marginal (``ExactMarginal``).
"""

from __future__ import annotations

import math
from typing import ClassVar

import torch
from torch import nn
from torch.distributions import Categorical

from latentlm.data.documents import BowBatch
from latentlm.models.base import ClosedFormEM, EStep, FiniteLatentModel


def counts_matmul(counts: torch.Tensor, log_probs: torch.Tensor) -> torch.Tensor:
    """counts (B, V) sparse CSR or dense  @  log_probs (K, V)^T  ->  (B, K).

    ``log_probs`` may hold -inf (words a cluster never emits, after unsmoothed EM). A
    sparse product never touches zero counts, but a dense one would compute 0 * -inf =
    nan, so -inf is replaced by the most negative finite float: 0 * min = 0 and
    c * min = -inf (overflow) for c >= 1, which is the exact answer.
    """
    if counts.dim() != 2 or counts.size(1) != log_probs.size(1):
        raise ValueError(f"counts {tuple(counts.shape)} do not match word log-probs {tuple(log_probs.shape)}")
    log_probs = log_probs.to(counts.dtype).clamp_min(torch.finfo(counts.dtype).min)
    return counts @ log_probs.t()  # (B, K)


def responsibilities(joint: torch.Tensor, beta: float | torch.Tensor = 1.0
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """softmax(beta J) (N, K), log p(x) = logsumexp J (N,) and (1/beta) logsumexp(beta J) (N,).

    ``joint`` J (N, K) = log p(x, z = k) is consumed (modified in place); ``beta`` a float or
    per-document (N,). Responsibilities below ~K * tiny become exact zeros: subnormal floats
    would make the exp and the M-step's sparse product several times slower, for a change < 1e-36.
    """
    per_doc = isinstance(beta, torch.Tensor)
    if per_doc and bool((beta == 1).all()):
        beta, per_doc = 1.0, False
    log_likelihood = None
    if per_doc or beta != 1.0:
        log_likelihood = torch.logsumexp(joint, dim=-1).to(torch.float64)
        joint.mul_(beta.to(joint.dtype).unsqueeze(-1) if per_doc else beta)
    # softmax and logsumexp from one exp pass: resp = exp(J - m) / s, log-normalizer m + log s
    top = joint.amax(dim=-1, keepdim=True)              # (N, 1)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # all -inf rows: no nan
    joint.sub_(top)
    floor = math.log(torch.finfo(joint.dtype).tiny) + math.log(joint.size(-1)) + 1.0
    resp = joint.masked_fill_(joint < floor, -math.inf).exp_()  # (N, K) unnormalized
    total = resp.sum(dim=-1, keepdim=True)              # (N, 1)
    log_norm = (top + total.log()).squeeze(-1).to(torch.float64)  # (N,)
    resp.div_(total)
    tempered = log_norm / (beta.to(torch.float64) if per_doc else beta)
    return resp, (tempered if log_likelihood is None else log_likelihood), tempered


class NaiveBayesMixture(FiniteLatentModel, ClosedFormEM):
    """Mixture of K unigram distributions over a V-word vocabulary.

    Learned by closed-form EM (``train.learner: em``; deterministic annealing and Dirichlet
    smoothing are options of the learner) or by gradient on the exact marginal.
    """

    latent: ClassVar[str] = "discrete"
    supports_annealing: ClassVar[bool] = True
    default_posterior: ClassVar[str | None] = "categorical_bow"

    def __init__(self, vocab_size: int, num_clusters: int, init_scale: float = 0.01):
        super().__init__()
        if num_clusters < 1 or vocab_size < 1:
            raise ValueError(f"need num_clusters >= 1 and vocab_size >= 1, got {num_clusters}, {vocab_size}")
        self.vocab_size, self.num_clusters = vocab_size, num_clusters
        self.mixture_logits = nn.Parameter(torch.zeros(num_clusters))                       # (K,)
        # small random logits break the symmetry between clusters for gradient training
        self.word_logits = nn.Parameter(init_scale * torch.randn(num_clusters, vocab_size))  # (K, V)

    @property
    def latent_dim(self) -> int:
        """Size of the latent's support: the posterior family builds K logits from it."""
        return self.num_clusters

    # ---- parameters ------------------------------------------------------------------

    def log_mixture(self) -> torch.Tensor:  # (K,) log mu
        return torch.log_softmax(self.mixture_logits, dim=-1)

    def log_word_probs(self) -> torch.Tensor:  # (K, V) log pi
        return torch.log_softmax(self.word_logits, dim=-1)

    @torch.no_grad()
    def set_log_probs(self, log_mixture: torch.Tensor, log_word_probs: torch.Tensor) -> None:
        """Overwrite the parameters with (normalized) log-probabilities, e.g. after an M-step."""
        if log_mixture.shape != self.mixture_logits.shape or log_word_probs.shape != self.word_logits.shape:
            raise ValueError(
                f"expected log-probs of shapes {tuple(self.mixture_logits.shape)} and "
                f"{tuple(self.word_logits.shape)}, got {tuple(log_mixture.shape)} and {tuple(log_word_probs.shape)}"
            )
        self.mixture_logits.copy_(log_mixture)
        self.word_logits.copy_(log_word_probs)

    # ---- the LatentVariableModel interface -------------------------------------------

    def prior(self) -> Categorical:
        return Categorical(logits=self.mixture_logits)

    def cluster_log_likelihood(self, batch: BowBatch) -> torch.Tensor:
        """log p(x | z=k) for every k: (B, K)."""
        counts = batch.counts
        if counts.dtype != self.word_logits.dtype:
            counts = counts.to(self.word_logits.dtype)
        return counts_matmul(counts, self.log_word_probs())

    def log_likelihood_all(self, batch: BowBatch) -> torch.Tensor:
        """log p(x | z=k) for every k, (K, B): what exact enumeration of E_q needs."""
        return self.cluster_log_likelihood(batch).t()

    def log_joint(self, batch: BowBatch) -> torch.Tensor:
        """log p(x, z=k) for every k: (B, K)."""
        return self.cluster_log_likelihood(batch) + self.log_mixture()

    def log_likelihood(self, batch: BowBatch, z: torch.Tensor) -> torch.Tensor:
        """log p(x | z), (S, B).

        ``z`` is (S, B) cluster ids, or (S, B, K) one-hot / relaxed (Gumbel-softmax) vectors,
        for which the result is the z-weighted sum of the per-cluster log-likelihoods.
        """
        per_cluster = self.cluster_log_likelihood(batch)  # (B, K)
        if z.dim() == 2 and not z.is_floating_point():
            if z.size(1) != per_cluster.size(0):
                raise ValueError(f"z {tuple(z.shape)} does not match a batch of {per_cluster.size(0)}")
            return per_cluster.t().gather(0, z)  # (K, B) gathered at (S, B) -> (S, B)
        if z.dim() == 3 and z.size(-1) == self.num_clusters and z.size(1) == per_cluster.size(0):
            return (z.to(per_cluster.dtype) * per_cluster.unsqueeze(0)).sum(-1)  # (S, B)
        raise ValueError(
            f"z must be (S, B) long cluster ids or (S, B, K={self.num_clusters}) weights, got "
            f"{tuple(z.shape)} {z.dtype}"
        )

    def log_marginal(self, batch: BowBatch) -> torch.Tensor:
        """Exact log p(x) = logsumexp_k log p(x, z=k), (B,)."""
        return torch.logsumexp(self.log_joint(batch), dim=-1)

    def posterior(self, batch: BowBatch) -> Categorical:
        """The exact p(z | x), batch shape (B,)."""
        return Categorical(logits=self.log_joint(batch))

    @torch.no_grad()
    def assign(self, batch: BowBatch) -> torch.Tensor:
        """MAP cluster of every document, (B,) long."""
        return self.log_joint(batch).argmax(-1)

    # ---- EM (the ClosedFormEM capability) -------------------------------------------------

    def _word_counts(self, batch: BowBatch, resp: torch.Tensor) -> dict[str, torch.Tensor]:
        """Expected statistics of responsibilities ``resp`` (B, K): words (K, V) and clusters (K,)."""
        counts = batch.counts.to(resp.dtype)
        if batch.is_sparse:  # X^T R as a sparse-dense product, no dense (B, V) copy
            words = (counts.to_sparse_coo().t() @ resp).t()  # (K, V)
        else:
            words = resp.t() @ counts  # (K, V)
        return {"words": words, "clusters": resp.sum(0), "documents": torch.tensor(float(batch.size))}

    @torch.no_grad()
    def expected_counts(self, batch: BowBatch, temperature: float | torch.Tensor = 1.0) -> EStep:
        """E-step of a batch: responsibilities ∝ p(x, z)^temperature, summarized as counts."""
        resp, log_lik, tempered = responsibilities(self.log_joint(batch), temperature)
        return EStep(self._word_counts(batch, resp), log_lik, tempered)

    @torch.no_grad()
    def initial_counts(self, batch: BowBatch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        """Statistics of Dirichlet(1) random responsibilities: the textbook EM start."""
        # drawn by the (CPU) generator, then moved: the same start on any device
        gamma = torch.empty(batch.size, self.num_clusters, dtype=torch.float64).exponential_(generator=generator)
        return self._word_counts(batch, (gamma / gamma.sum(-1, keepdim=True)).to(self.word_logits))

    @torch.no_grad()
    def m_step(self, counts: dict[str, torch.Tensor], smoothing: float = 0.0, mixture_smoothing: float = 0.0) -> None:
        """MAP parameters under Dirichlet(1 + smoothing) on every pi_k and Dirichlet(1 +
        mixture_smoothing) on mu, from expected counts (``smoothing = 0``: maximum likelihood)."""
        if smoothing < 0 or mixture_smoothing < 0:
            raise ValueError(f"smoothing must be >= 0, got {smoothing}, {mixture_smoothing}")
        expected = counts["words"].to(self.word_logits.dtype) + smoothing  # (K, V)
        totals = expected.sum(-1, keepdim=True)                            # (K, 1)
        # A cluster that lost every token (possible without smoothing) has no MLE: keep its old
        # words; its weight mu_k = 0 makes it irrelevant to the likelihood.
        log_words = torch.where(totals > 0, expected.log() - totals.log(), self.log_word_probs())
        clusters = counts["clusters"].to(self.word_logits.dtype)
        log_mix = torch.log(clusters + mixture_smoothing) - math.log(
            float(counts["documents"]) + mixture_smoothing * self.num_clusters)
        self.set_log_probs(log_mix, log_words)

    @torch.no_grad()
    def log_prior(self, smoothing: float = 0.0, mixture_smoothing: float = 0.0) -> float:
        total = 0.0
        if smoothing > 0:
            total += smoothing * float(self.log_word_probs().sum(dtype=torch.float64))
        if mixture_smoothing > 0:
            total += mixture_smoothing * float(self.log_mixture().sum(dtype=torch.float64))
        return total

    @torch.no_grad()
    def perturb(self, scale: float, generator: torch.Generator) -> None:
        """log pi_k += scale * noise, renormalized: at small beta the symmetric solution is a
        stable fixed point, and the jitter lets clusters split once beta passes the critical value."""
        noise = torch.randn(self.word_logits.shape, generator=generator, dtype=torch.float64)
        self.word_logits.copy_(torch.log_softmax(self.log_word_probs() + scale * noise.to(self.word_logits), -1))

    # ---- sampling --------------------------------------------------------------------

    @torch.no_grad()
    def sample(
        self, lengths: torch.Tensor, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw documents of the given ``lengths`` (N,): cluster ids (N,) and dense counts (N, V)."""
        mix = self.log_mixture().exp()
        lengths = torch.as_tensor(lengths, dtype=torch.long, device=mix.device)
        z = torch.multinomial(mix, lengths.numel(), replacement=True, generator=generator)  # (N,)
        probs = self.log_word_probs().exp()  # (K, V)
        counts = torch.zeros(lengths.numel(), self.vocab_size, dtype=probs.dtype, device=probs.device)
        for k in z.unique().tolist():  # loop over clusters (K), not documents or tokens
            rows = (z == k).nonzero().squeeze(1)
            total = int(lengths[rows].sum())
            if total == 0:
                continue
            words = torch.multinomial(probs[k], total, replacement=True, generator=generator)  # (sum n,)
            owner = torch.repeat_interleave(rows, lengths[rows])                                # (sum n,)
            counts.index_put_((owner, words), torch.ones_like(words, dtype=probs.dtype), accumulate=True)
        return z, counts

    @torch.no_grad()
    def generate(self, z, num, max_len=50, greedy=False, generator=None):
        """Token ids (num, max_len): each row a bag of words from its cluster (order is meaningless)."""
        if z is None:
            z = torch.multinomial(self.log_mixture().exp(), num, replacement=True, generator=generator)
        probs = self.log_word_probs().exp()[z]  # (num, V)
        if greedy:
            return probs.topk(max_len, dim=-1).indices
        return torch.multinomial(probs, max_len, replacement=True, generator=generator)
