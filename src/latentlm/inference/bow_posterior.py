"""Amortized bag-of-words Gaussian posterior q(z | x) for M3 / M10 (order-free encoder)."""

from __future__ import annotations

import torch
from torch import nn

from latentlm.inference.base import Posterior
from latentlm.inference.posteriors import diagonal_gaussian
from latentlm.nn.bow import BagOfWordsEncoder, bag_of_words


class GaussianBOWPosterior(Posterior):
    """log(1 + counts) -> MLP -> (mean, log-variance); reads a token ``Batch`` or a ``BowBatch``."""

    def __init__(self, vocab_size: int, latent_dim: int, hidden_dim: int = 256):
        super().__init__()
        self.vocab_size = vocab_size
        self.encoder = BagOfWordsEncoder(vocab_size, hidden_dim)
        self.to_params = nn.Linear(hidden_dim, 2 * latent_dim)

    def params(self, batch) -> tuple[torch.Tensor, torch.Tensor]:
        counts = bag_of_words(batch, self.vocab_size, self.to_params.weight.dtype)
        mean, logvar = self.to_params(self.encoder(counts)).chunk(2, dim=-1)
        return mean, logvar  # (B, D) each

    def forward(self, batch):
        return diagonal_gaussian(*self.params(batch))
