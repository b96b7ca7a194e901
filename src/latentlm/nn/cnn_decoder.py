"""A dilated causal CNN decoder p(x | z) (Yang et al. 2017): a weaker-than-LSTM decoder
whose receptive field, set by the dilations, limits how much it can model without z.

Same interface as :class:`latentlm.nn.decoders.LSTMDecoder` (``hidden_states``,
``token_log_probs``, ``generate``), so the sentence VAE can swap it in by config.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from latentlm.data.vocab import Vocab
from latentlm.nn.dropout import Dropout


def masked_token_log_probs(out: nn.Linear, states: torch.Tensor, targets: torch.Tensor,
                           mask: torch.Tensor) -> torch.Tensor:
    """log softmax(out(h_t))[target_t] summed over real positions: (N,). Only masked positions
    go through the (H x V) output layer; the log-softmax is fp32 even under bf16 autocast."""
    logits = out(states[mask]).float()  # (M, V)
    tok = -F.cross_entropy(logits, targets[mask], reduction="none")  # (M,)
    full = torch.zeros(mask.shape, dtype=tok.dtype, device=tok.device)
    full[mask] = tok
    return full.sum(1)


class CausalConvBlock(nn.Module):
    """Residual block: x + conv_d(ReLU(x)) with a causal (left-padded) dilated convolution."""

    def __init__(self, channels: int, kernel_size: int, dilation: int, dropout: float):
        super().__init__()
        self.pad = (kernel_size - 1) * dilation
        self.conv = nn.Conv1d(channels, channels, kernel_size, dilation=dilation)
        self.dropout = Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # (N, C, T)
        return x + self.dropout(self.conv(F.pad(F.relu(x), (self.pad, 0))))


class DilatedCNNDecoder(nn.Module):
    """Embeddings of ``<s> w_1 .. w_n`` (with z concatenated at every position when
    ``latent_dim`` > 0) -> 1x1 projection -> residual causal dilated convolutions.

    Receptive field: 1 + (kernel_size - 1) * sum(dilations) positions (63 by default).
    """

    def __init__(self, vocab_size: int, embed_dim: int = 256, hidden_dim: int = 256, latent_dim: int = 0,
                 num_layers: int = 1, dropout: float = 0.0, kernel_size: int = 3,
                 dilations: tuple[int, ...] | list[int] = (1, 2, 4, 8, 16)):
        super().__init__()
        del num_layers  # the depth is len(dilations); accepted for a common decoder signature
        self.latent_dim, self.hidden_dim = latent_dim, hidden_dim
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=Vocab.pad_id)
        self.inp = nn.Conv1d(embed_dim + latent_dim, hidden_dim, 1)
        self.blocks = nn.ModuleList(CausalConvBlock(hidden_dim, kernel_size, d, dropout) for d in dilations)
        self.dropout = Dropout(dropout)
        self.out = nn.Linear(hidden_dim, vocab_size)
        self.receptive_field = 1 + (kernel_size - 1) * sum(dilations)

    def hidden_states(self, inputs: torch.Tensor, z: torch.Tensor | None = None) -> torch.Tensor:
        """Top states (N, T, H); position t sees inputs <= t only."""
        emb = self.dropout(self.embed(inputs))  # (N, T, E)
        if self.latent_dim:
            emb = torch.cat([emb, z[:, None, :].expand(-1, emb.size(1), -1)], dim=-1)
        x = self.inp(emb.transpose(1, 2))  # (N, H, T)
        for block in self.blocks:
            x = block(x)
        return self.dropout(F.relu(x).transpose(1, 2))  # (N, T, H)

    def token_log_probs(self, states: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return masked_token_log_probs(self.out, states, targets, mask)

    @torch.no_grad()
    def generate(self, z: torch.Tensor | None, num: int, max_len: int = 50, greedy: bool = False,
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """Ancestral sampling (or greedy); re-runs the window of the prefix at each step."""
        device = self.out.weight.device
        seq = torch.full((num, 1), Vocab.bos_id, dtype=torch.long, device=device)
        done = torch.zeros(num, dtype=torch.bool, device=device)
        for _ in range(max_len):
            h = self.hidden_states(seq[:, -self.receptive_field:], z)[:, -1]  # (N, H)
            logits = self.out(h).float()
            logits[:, [Vocab.pad_id, Vocab.bos_id]] = -float("inf")
            token = (logits.argmax(-1, keepdim=True) if greedy
                     else torch.multinomial(logits.softmax(-1), 1, generator=generator))
            token = token.masked_fill(done[:, None], Vocab.pad_id)
            seq = torch.cat([seq, token], dim=1)
            done |= token[:, 0] == Vocab.eos_id
            if bool(done.all()):
                break
        return seq[:, 1:]
