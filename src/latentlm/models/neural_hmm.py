"""M6: the neural HMM of Tran et al. (2016), "Unsupervised Neural Hidden Markov Models".

Same generative story as :mod:`latentlm.models.hmm` (K states, a STOP column that emits
``</s>``), but the three tables come from networks over embeddings, so states that behave
alike share statistical strength and words that are spelled alike get similar emissions:

    h_k      = MLP_e(s_k)                           state embedding s_k (K, d) -> (K, d)
    emit     = softmax_w(h_k . u_w + b_w)           u_w a word embedding, or CharCNN(w)
    trans    = softmax_j(MLP_t(s_k) . s'_j + c_j)   s'_j next-state embeddings (K + 1 with STOP)
    init     = softmax_j(q . s'_j + c'_j)

The tables do not depend on the sentence, so each batch builds them once ((K, V) and
(K, K+1)) and runs the exact forward algorithm; training is direct gradient ascent on
log p(x) (``ExactMarginal``), or generalized EM (``train.learner: gem``: exact expected counts
over an epoch, then a few optimizer steps on the expected complete log-likelihood, which touch
only the (K, V) and (K, K + 1) tables, never the sentences).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from latentlm.models.hmm import HMMBase
from latentlm.nn.dropout import Dropout


class _ResidualMLP(nn.Module):
    """x + W2 relu(W1 x) twice, with layer norm: the state-side network of Tran et al."""

    def __init__(self, dim: int, layers: int = 2):
        super().__init__()
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.Linear(dim, dim), nn.ReLU(), nn.Linear(dim, dim)) for _ in range(layers)
        )
        self.norms = nn.ModuleList(nn.LayerNorm(dim) for _ in range(layers))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block, norm in zip(self.blocks, self.norms):
            x = norm(x + block(x))
        return x


class CharCNN(nn.Module):
    """Word embeddings from characters: convolutions of several widths, max over positions.

    Built once from the vocabulary's spellings, so the whole (V, d) output table is one
    batched convolution per forward pass.
    """

    def __init__(self, words: Sequence[str], dim: int, char_dim: int = 32, widths: Sequence[int] = (1, 2, 3, 4, 5),
                 filters: int = 64, max_chars: int = 20):
        super().__init__()
        alphabet = sorted({c for w in words for c in w})
        index = {c: i + 2 for i, c in enumerate(alphabet)}  # 0 pad, 1 begin/end of word
        longest = min(max(len(w) for w in words) + 2, max_chars + 2)
        chars = torch.zeros(len(words), max(longest, max(widths)), dtype=torch.long)  # (V, C)
        for v, w in enumerate(words):
            ids = [1] + [index[c] for c in w[:max_chars]] + [1]
            chars[v, : len(ids)] = torch.tensor(ids)
        self.register_buffer("chars", chars, persistent=False)
        self.embed = nn.Embedding(len(alphabet) + 2, char_dim, padding_idx=0)
        self.convs = nn.ModuleList(nn.Conv1d(char_dim, filters, w) for w in widths)
        self.proj = nn.Linear(filters * len(widths), dim)

    def forward(self) -> torch.Tensor:  # (V, d)
        x = self.embed(self.chars).transpose(1, 2)  # (V, char_dim, C)
        pooled = [torch.tanh(conv(x)).amax(-1) for conv in self.convs]  # each (V, filters)
        return self.proj(torch.cat(pooled, -1))


class NeuralHMM(HMMBase):
    """HMM whose init/transition/emission distributions are computed by neural networks."""

    def __init__(
        self, vocab_size: int, num_states: int, dim: int = 128, char_cnn: bool = False,
        words: Sequence[str] | None = None, word_embeddings: bool = True, dropout: float = 0.0,
        char_options: dict | None = None,
    ):
        super().__init__(vocab_size, num_states)
        K, V = num_states, vocab_size
        if char_cnn and (words is None or len(words) != V):
            raise ValueError(f"char_cnn needs the vocabulary's {V} words, got {None if words is None else len(words)}")
        if not char_cnn and not word_embeddings:
            raise ValueError("need word embeddings, a character CNN, or both")
        self.state_emb = nn.Parameter(torch.randn(K, dim) * 0.1)        # (K, d)
        self.next_emb = nn.Parameter(torch.randn(K + 1, dim) * 0.1)     # (K+1, d), last = STOP
        self.start = nn.Parameter(torch.randn(dim) * 0.1)               # (d,)
        self.trans_bias = nn.Parameter(torch.zeros(K + 1))
        self.init_bias = nn.Parameter(torch.zeros(K + 1))
        self.emit_mlp = _ResidualMLP(dim)
        self.trans_mlp = _ResidualMLP(dim)
        self.word_emb = nn.Parameter(torch.randn(V, dim) * 0.1) if word_embeddings else None  # (V, d)
        self.char_cnn = CharCNN(words, dim, **(char_options or {})) if char_cnn else None
        self.word_bias = nn.Parameter(torch.zeros(V))
        self.dropout = Dropout(dropout)

    def word_vectors(self) -> torch.Tensor:  # (V, d)
        u = self.word_emb if self.word_emb is not None else 0.0
        if self.char_cnn is not None:
            u = u + self.char_cnn()
        return u

    def log_probs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = self.dropout(self.emit_mlp(self.state_emb))  # (K, d)
        emit = h @ self.word_vectors().t() + self.word_bias  # (K, V)
        emit = emit.masked_fill(self.non_emitted, -torch.inf)
        g = self.dropout(self.trans_mlp(self.state_emb))  # (K, d)
        trans = g @ self.next_emb.t() + self.trans_bias  # (K, K+1)
        init = self.next_emb @ self.start + self.init_bias  # (K+1,)
        return torch.log_softmax(init, -1), torch.log_softmax(trans, -1), torch.log_softmax(emit, -1)
