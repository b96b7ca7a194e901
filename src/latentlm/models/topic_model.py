"""M10: a neural topic model (the tutorial's case study; Miao et al. 2017's GSM).

z0 ~ N(0, I) (D dims); theta = softmax(W z0 + c) are K topic proportions; each topic is
a word distribution beta_k = softmax(B_k); every token ~ Cat(theta . beta). So
log p(x | z0) = sum_w n_w(x) log sum_k theta_k beta_kw. Reads document counts
(``BowBatch``) or token batches; its default posterior is ``gaussian_bow``.
"""

from __future__ import annotations


import torch
from torch import nn
from torch.distributions import Independent, Normal

from latentlm.models.base import LatentVariableModel
from latentlm.nn.bow import bag_of_words


class NeuralTopicModel(LatentVariableModel):
    latent = "continuous"
    default_posterior = "gaussian_bow"

    def __init__(self, vocab_size: int, num_topics: int = 50, latent_dim: int = 50):
        super().__init__()
        self.vocab_size, self.latent_dim, self.num_topics = vocab_size, latent_dim, num_topics
        self.to_theta = nn.Linear(latent_dim, num_topics)
        self.topic_logits = nn.Parameter(torch.randn(num_topics, vocab_size) * 0.01)  # (K, V)
        self.register_buffer("_zeros", torch.zeros(latent_dim), persistent=False)

    def prior(self) -> Independent:
        return Independent(Normal(self._zeros, torch.ones_like(self._zeros)), 1)

    def topics(self) -> torch.Tensor:
        """log beta, (K, V)."""
        return torch.log_softmax(self.topic_logits.float(), -1)

    def word_log_probs(self, z: torch.Tensor) -> torch.Tensor:
        """log sum_k theta_k(z) beta_kw, (..., V), in log space (logsumexp over topics)."""
        log_theta = torch.log_softmax(self.to_theta(z).float(), -1)  # (..., K)
        return torch.logsumexp(log_theta[..., :, None] + self.topics(), dim=-2)  # (..., V)

    def log_likelihood(self, batch, z: torch.Tensor) -> torch.Tensor:
        """z (S, B, D) -> (S, B)."""
        counts = bag_of_words(batch, self.vocab_size)  # (B, V)
        return (self.word_log_probs(z) * counts).sum(-1)

    @torch.no_grad()
    def top_words(self, k: int = 10) -> torch.Tensor:
        """(K, k) ids of each topic's most probable words."""
        return self.topic_logits.topk(k, dim=-1).indices


def npmi_coherence(top_words: torch.Tensor, doc_word: torch.Tensor) -> torch.Tensor:
    """Topic coherence: mean NPMI over pairs of each topic's top words (Lau et al. 2014),
    from document co-occurrence. ``top_words`` (K, n) ids; ``doc_word`` (N, V) counts or
    0/1 presence of the reference (training) documents. Returns (K,) in [-1, 1]; a pair
    never seen together scores -1.
    """
    present = (doc_word > 0).float()  # (N, V)
    n_docs = present.size(0)
    scores = []
    for words in top_words:
        cols = present[:, words]  # (N, n)
        p_i = cols.mean(0)  # (n,)
        p_ij = (cols.t() @ cols) / n_docs  # (n, n)
        pmi = torch.log(p_ij / (p_i[:, None] * p_i[None, :]))
        npmi = torch.where(p_ij > 0, pmi / -torch.log(p_ij), torch.full_like(p_ij, -1.0))
        iu = torch.triu_indices(len(words), len(words), offset=1)
        scores.append(npmi[iu[0], iu[1]].mean())
    return torch.stack(scores) if scores else torch.zeros(0)


