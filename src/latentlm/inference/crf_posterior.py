"""q(z | x) over tag paths: a BiLSTM (optionally with a character CNN) over the words produces
the scores of a linear-chain CRF, whose every question (log Z, log-prob, exact samples,
entropy, marginals, Viterbi) the chain programs of :mod:`latentlm.structured` answer exactly.

    unary_t(k) = W_k . BiLSTM(x)_t + c[w_t, k]      (B, N, K)  c: a per-word score table
    score(z)   = init(z_1) + sum_t unary_t(z_t) + sum_t trans(z_{t-1}, z_t) + final(z_n)

The per-word table and the three shared tables make the family contain the exact posterior of
an HMM (unary = log emit[:, w_t], trans = log trans, init, final = log STOP), which the sanity
test of M7 relies on: with the LSTM emissions switched off, the ELBO's optimum is log p(x).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from latentlm.data.batching import Batch
from latentlm.inference.base import StructuredPosterior
from latentlm.models.hmm import words_of
from latentlm.models.neural_hmm import CharCNN
from latentlm.nn.dropout import Dropout
from latentlm.structured import LinearChainCRF


class CRFBiLSTMPosterior(StructuredPosterior):
    """Amortized chain CRF over K tags (``latent_dim``): BiLSTM unary scores plus a per-word
    table, shared init / transition / final scores. ``char_cnn`` adds spelling features
    (needs the vocabulary's ``words``)."""

    def __init__(self, vocab_size: int, latent_dim: int, embed_dim: int = 64, hidden_dim: int = 64,
                 word_scores: bool = True, char_cnn: bool = False, words: Sequence[str] | None = None,
                 char_options: dict | None = None, dropout: float = 0.0):
        super().__init__()
        K, V = latent_dim, vocab_size
        if char_cnn and (words is None or len(words) != V):
            raise ValueError(f"char_cnn needs the vocabulary's {V} words, got {None if words is None else len(words)}")
        self.num_states = K
        self.embed = nn.Embedding(V, embed_dim)
        self.char_cnn = CharCNN(words, embed_dim, **(char_options or {})) if char_cnn else None
        self.lstm = nn.LSTM(embed_dim, hidden_dim, batch_first=True, bidirectional=True)
        self.to_unary = nn.Linear(2 * hidden_dim, K)
        self.word_unary = nn.Embedding(V, K) if word_scores else None
        if self.word_unary is not None:
            nn.init.zeros_(self.word_unary.weight)
        self.trans = nn.Parameter(torch.zeros(K, K))
        self.init = nn.Parameter(torch.zeros(K))
        self.final = nn.Parameter(torch.zeros(K))
        self.dropout = Dropout(dropout)

    def forward(self, batch: Batch) -> LinearChainCRF:
        words, n = words_of(batch)  # (B, N), (B,)
        B, N = words.shape
        x = self.embed(words)
        if self.char_cnn is not None:
            x = x + self.char_cnn()[words]
        packed = pack_padded_sequence(self.dropout(x), n.clamp_min(1).cpu(), batch_first=True, enforce_sorted=False)
        h, _ = pad_packed_sequence(self.lstm(packed)[0], batch_first=True, total_length=N)  # (B, N, 2H)
        unary = self.to_unary(self.dropout(h))  # (B, N, K)
        if self.word_unary is not None:
            unary = unary + self.word_unary(words)
        last = (n - 1).clamp_min(0)[:, None, None].expand(-1, 1, self.num_states)
        final = torch.where((n > 0)[:, None], self.final, 0.0)[:, None]  # (B, 1, K)
        unary = unary.scatter_add(1, last, final.expand(-1, 1, -1))
        # fp32 scores even under bf16 autocast (the chain programs take float32 / float64)
        dtype = unary.dtype if unary.dtype == torch.float64 else torch.float32
        return LinearChainCRF(self.trans.to(dtype), unary.to(dtype), n, init=self.init.to(dtype))
