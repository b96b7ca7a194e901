"""M0: the LSTM language model, the no-latent baseline with exact log p(x)."""

from __future__ import annotations

import torch

from latentlm.data.batching import Batch
from latentlm.models.base import LatentVariableModel
from latentlm.nn.decoders import LSTMDecoder, word_dropout


class LSTMLanguageModel(LatentVariableModel):
    latent = "none"

    def __init__(self, vocab_size: int, embed_dim: int = 256, hidden_dim: int = 256,
                 num_layers: int = 1, dropout: float = 0.0, word_dropout: float = 0.0):
        super().__init__()
        self.decoder = LSTMDecoder(vocab_size, embed_dim, hidden_dim, 0, num_layers, dropout)
        self.word_dropout = word_dropout

    def log_marginal(self, batch: Batch) -> torch.Tensor:
        inputs = word_dropout(batch.inputs, self.word_dropout) if self.training else batch.inputs
        states = self.decoder.hidden_states(inputs)
        return self.decoder.token_log_probs(states, batch.targets, batch.mask)  # (B,)

    @torch.no_grad()
    def generate(self, z, num, max_len=50, greedy=False, generator=None):
        return self.decoder.generate(None, num, max_len, greedy, generator)
