"""Bag-of-words blocks: counts from a batch, an MLP encoder over counts, and the
unigram decoder p(w | z) = softmax(W f(z) + b) shared by every position (M3, and the
sentence VAE's collapse-free reference decoder).
"""

from __future__ import annotations

import torch
from torch import nn

from latentlm.data.documents import BowBatch
from latentlm.data.vocab import Vocab
from latentlm.nn.cnn_decoder import masked_token_log_probs
from latentlm.nn.dropout import Dropout


def bag_of_words(batch, vocab_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Dense (B, V) counts of the predicted tokens (words and ``</s>``) of a token
    :class:`~latentlm.data.batching.Batch`, or the counts of a document ``BowBatch``."""
    if isinstance(batch, BowBatch):
        return batch.dense_counts().to(dtype)
    counts = torch.zeros(batch.size, vocab_size, dtype=dtype, device=batch.tokens.device)
    return counts.scatter_add_(1, batch.targets, batch.mask.to(dtype))


class BagOfWordsEncoder(nn.Module):
    """log(1 + counts) -> MLP -> a (B, H) feature vector (order-free amortized encoder)."""

    def __init__(self, vocab_size: int, hidden_dim: int = 256):
        super().__init__()
        self.vocab_size, self.output_dim = vocab_size, hidden_dim
        self.net = nn.Sequential(nn.Linear(vocab_size, hidden_dim), nn.Softplus(),
                                 nn.Linear(hidden_dim, hidden_dim), nn.Softplus())

    def forward(self, counts: torch.Tensor) -> torch.Tensor:  # (B, V) -> (B, H)
        return self.net(torch.log1p(counts))


class BagOfWordsDecoder(nn.Module):
    """Every position draws its token from the same Cat(softmax(W f(z) + b)); f is the identity
    (``hidden_dim`` = 0, M3's log-linear decoder) or a one-layer MLP.

    Offers the LSTM decoder's interface (``hidden_states`` ignores the inputs), so the sentence
    VAE can use it as its weakest decoder, and ``log_probs`` / ``log_likelihood_counts`` for M3.
    """

    def __init__(self, vocab_size: int, embed_dim: int = 0, hidden_dim: int = 0, latent_dim: int = 32,
                 num_layers: int = 1, dropout: float = 0.0):
        super().__init__()
        del embed_dim, num_layers  # accepted for a common decoder signature
        if latent_dim < 1:
            raise ValueError("a bag-of-words decoder needs a latent vector (latent_dim >= 1)")
        self.latent_dim = latent_dim
        self.hidden = (nn.Sequential(nn.Linear(latent_dim, hidden_dim), nn.Tanh(), Dropout(dropout))
                       if hidden_dim else nn.Identity())
        self.out = nn.Linear(hidden_dim or latent_dim, vocab_size)

    def features(self, z: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., H)
        return self.hidden(z)

    def log_probs(self, z: torch.Tensor) -> torch.Tensor:  # (..., D) -> (..., V), fp32
        return torch.log_softmax(self.out(self.features(z)).float(), dim=-1)

    def log_likelihood_counts(self, counts: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """sum_w counts_w log p(w | z): counts (B, V), z (S, B, D) -> (S, B)."""
        return (self.log_probs(z) * counts).sum(-1)

    def hidden_states(self, inputs: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        return self.features(z)[:, None, :].expand(-1, inputs.size(1), -1)  # (N, T, H)

    def token_log_probs(self, states: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_token_log_probs(self.out, states, targets, mask)

    @torch.no_grad()
    def generate(self, z: torch.Tensor, num: int, max_len: int = 50, greedy: bool = False,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """i.i.d. draws from p(w | z) until ``</s>`` (greedy: the mode, repeated)."""
        logits = self.out(self.features(z)).float()  # (N, V)
        logits[:, [Vocab.pad_id, Vocab.bos_id]] = -float("inf")
        if greedy:
            draws = logits.argmax(-1, keepdim=True).expand(-1, max_len)
        else:
            draws = torch.multinomial(logits.softmax(-1), max_len, replacement=True, generator=generator)
        ended = (draws == Vocab.eos_id).long().cumsum(1)
        after_end = (ended - (draws == Vocab.eos_id).long()) > 0  # positions after the first </s>
        out = draws.masked_fill(after_end, Vocab.pad_id)
        keep = int((~after_end).sum(1).max())
        return out[:, :keep]
