"""M3: continuous naive Bayes — the bag-of-words VAE.

z ~ N(0, I); every token x_t ~ Cat(softmax(W z + b)) independently of its position, so
log p(x | z) = sum_w n_w(x) log softmax(W z + b)_w with n(x) the word counts. Works on
PTB sentences (a token :class:`~latentlm.data.batching.Batch`: the counts include one
``</s>`` per sentence, so perplexities match the LMs') and on documents (a ``BowBatch``
of counts). Its default posterior is the amortized bag-of-words encoder ``gaussian_bow``.
"""

from __future__ import annotations

import torch
from torch.distributions import Independent, Normal

from latentlm.models.base import LatentVariableModel
from latentlm.nn.bow import BagOfWordsDecoder, bag_of_words


class BagOfWordsVAE(LatentVariableModel):
    latent = "continuous"
    default_posterior = "gaussian_bow"

    def __init__(self, vocab_size: int, latent_dim: int = 32, hidden_dim: int = 0, dropout: float = 0.0):
        super().__init__()
        self.vocab_size, self.latent_dim = vocab_size, latent_dim
        self.decoder = BagOfWordsDecoder(vocab_size, hidden_dim=hidden_dim, latent_dim=latent_dim, dropout=dropout)
        self.register_buffer("_zeros", torch.zeros(latent_dim), persistent=False)

    def prior(self) -> Independent:
        return Independent(Normal(self._zeros, torch.ones_like(self._zeros)), 1)

    def log_likelihood(self, batch, z: torch.Tensor) -> torch.Tensor:
        """z (S, B, D) -> (S, B); one (S, B, V) log-softmax, no loop over tokens."""
        return self.decoder.log_likelihood_counts(bag_of_words(batch, self.vocab_size), z)

    @torch.no_grad()
    def generate(self, z, num, max_len=50, greedy=False, generator=None):
        if z is None:
            z = self.prior().sample((num,))
        return self.decoder.generate(z, num, max_len, greedy, generator)

    @torch.no_grad()
    def top_words(self, k: int = 10) -> torch.Tensor:
        """(D, k) ids of the words each latent direction raises most (columns of W)."""
        weight = self.decoder.out.weight  # (V, H)
        return weight.t().topk(k, dim=-1).indices
