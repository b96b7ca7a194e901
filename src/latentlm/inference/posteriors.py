"""Posterior families q(z | x). ``POSTERIORS`` maps a config name to a class."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Categorical

from latentlm.data.batching import Batch
from latentlm.inference.base import GaussianPosterior, Posterior, diagonal_gaussian  # noqa: F401 (re-export)
from latentlm.inference.bow_posterior import GaussianBOWPosterior
from latentlm.inference.crf_posterior import CRFBiLSTMPosterior
from latentlm.inference.flows import FlowLSTMPosterior
from latentlm.inference.local import AlignmentPosterior
from latentlm.inference.mean_field import FactorialChainPosterior
from latentlm.inference.svi import PerInstanceGaussian
from latentlm.nn.bow import bag_of_words
from latentlm.nn.encoders import LSTMEncoder


class GaussianLSTMPosterior(GaussianPosterior):
    """Amortized diagonal Gaussian: LSTM over the sentence -> (mean, log-variance)."""

    def __init__(self, vocab_size: int, latent_dim: int, embed_dim: int = 256, hidden_dim: int = 256):
        super().__init__()
        self.encoder = LSTMEncoder(vocab_size, embed_dim, hidden_dim)
        self.to_params = nn.Linear(hidden_dim, 2 * latent_dim)

    def params(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        mean, logvar = self.to_params(self.encoder(batch.tokens, batch.lengths)).chunk(2, dim=-1)
        return mean, logvar  # (B, D) each


class CategoricalLSTMPosterior(Posterior):
    """Amortized q(z | x) over K components: LSTM over the sentence -> K logits."""

    def __init__(self, vocab_size: int, latent_dim: int, embed_dim: int = 128, hidden_dim: int = 128):
        super().__init__()
        self.encoder = LSTMEncoder(vocab_size, embed_dim, hidden_dim)
        self.to_logits = nn.Linear(hidden_dim, latent_dim)

    def forward(self, batch: Batch) -> Categorical:
        # fp32 logits even under bf16 autocast: the relaxed and enumerated estimators need a
        # simplex that sums to 1 within fp32 tolerance
        return Categorical(logits=self.to_logits(self.encoder(batch.tokens, batch.lengths)).float())  # (B, K)


class CategoricalBowPosterior(Posterior):
    """Amortized q(z | x) over K clusters from a bag of words: log(1 + counts) -> MLP -> K logits."""

    def __init__(self, vocab_size: int, latent_dim: int, hidden_dim: int = 128):
        super().__init__()
        self.vocab_size = vocab_size
        self.mlp = nn.Sequential(nn.Linear(vocab_size, hidden_dim), nn.Tanh())
        self.to_logits = nn.Linear(hidden_dim, latent_dim)

    def forward(self, batch) -> Categorical:
        counts = bag_of_words(batch, self.vocab_size, self.to_logits.weight.dtype)
        return Categorical(logits=self.to_logits(self.mlp(torch.log1p(counts))).float())


POSTERIORS: dict[str, type[Posterior]] = {
    "categorical_bow": CategoricalBowPosterior,
    "gaussian_lstm": GaussianLSTMPosterior,
    "categorical_lstm": CategoricalLSTMPosterior,
    "crf_bilstm": CRFBiLSTMPosterior,
    "flow_lstm": FlowLSTMPosterior,
    "gaussian_bow": GaussianBOWPosterior,
    "per_instance_gaussian": PerInstanceGaussian,
    "factorial_chains": FactorialChainPosterior,
    "alignment_bilstm": AlignmentPosterior,
}
