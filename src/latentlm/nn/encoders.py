"""Sequence encoders: a sentence to a fixed-size vector."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence

from latentlm.data.vocab import Vocab


class LSTMEncoder(nn.Module):
    """Final hidden state of an LSTM over ``<s> w_1 .. w_n </s>``: (B, H)."""

    def __init__(self, vocab_size: int, embed_dim: int = 256, hidden_dim: int = 256):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=Vocab.pad_id)
        self.lstm = nn.LSTM(embed_dim, hidden_dim, batch_first=True)
        self.output_dim = hidden_dim

    def forward(self, tokens: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        emb = self.embed(tokens)  # (B, T+1, E)
        if bool((lengths == tokens.size(1) - 1).all()):
            # equal lengths (no padding): no packing, no sort and gathers
            _, (h, _) = self.lstm(emb)
            return h[-1]
        # lengths count targets; the encoder reads all lengths + 1 tokens.
        packed = pack_padded_sequence(emb, (lengths + 1).cpu(), batch_first=True, enforce_sorted=False)
        _, (h, _) = self.lstm(packed)
        return h[-1]  # (B, H)
