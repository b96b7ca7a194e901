"""Posterior families q(z | x). ``POSTERIORS`` maps a config name to a class."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Independent, Normal

from latentlm.data.batching import Batch
from latentlm.inference.base import Posterior
from latentlm.nn.encoders import LSTMEncoder


def diagonal_gaussian(mean: torch.Tensor, logvar: torch.Tensor) -> Independent:
    return Independent(Normal(mean, torch.exp(0.5 * logvar)), 1)


class GaussianLSTMPosterior(Posterior):
    """Amortized diagonal Gaussian: LSTM over the sentence -> (mean, log-variance)."""

    def __init__(self, vocab_size: int, latent_dim: int, embed_dim: int = 256, hidden_dim: int = 256):
        super().__init__()
        self.encoder = LSTMEncoder(vocab_size, embed_dim, hidden_dim)
        self.to_params = nn.Linear(hidden_dim, 2 * latent_dim)

    def params(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.to_params(self.encoder(batch.tokens, batch.lengths)).chunk(2, dim=-1)
        return mean, logvar  # (B, D) each

    def forward(self, batch: Batch) -> Independent:
        return diagonal_gaussian(*self.params(batch))


POSTERIORS: dict[str, type[Posterior]] = {
    "gaussian_lstm": GaussianLSTMPosterior,
}
