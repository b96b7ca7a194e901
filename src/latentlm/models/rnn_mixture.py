"""M2: mixture of RNN language models, z ~ Cat(mu); x ~ RNNLM(x; pi_z).

Two parameterizations: ``shared`` — one LSTM LM conditioned on a learned embedding of z
(at the initial state and every input, exactly the sentence VAE's decoder); ``separate``
— K independent small LSTM LMs (shared input embedding), run as one batched recurrence
with the K components as a batch dimension. Exact log p(x) enumerates the K components
in one batched pass.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Categorical

from latentlm.data.batching import Batch
from latentlm.data.vocab import Vocab
from latentlm.models.base import FiniteLatentModel
from latentlm.nn.decoders import LSTMDecoder, word_dropout


class BatchedLSTMLMs(nn.Module):
    """K LSTM language models evaluated together: weights (K, ...), one bmm per step."""

    def __init__(self, vocab_size: int, num_components: int, embed_dim: int, hidden_dim: int):
        super().__init__()
        K, E, H = num_components, embed_dim, hidden_dim
        self.embed = nn.Embedding(vocab_size, E, padding_idx=Vocab.pad_id)
        scale = H ** -0.5
        self.w_ih = nn.Parameter(torch.empty(K, E, 4 * H).uniform_(-scale, scale))
        self.w_hh = nn.Parameter(torch.empty(K, H, 4 * H).uniform_(-scale, scale))
        self.bias = nn.Parameter(torch.zeros(K, 1, 4 * H))
        self.out_w = nn.Parameter(torch.empty(K, H, vocab_size).uniform_(-scale, scale))
        self.out_b = nn.Parameter(torch.zeros(K, 1, vocab_size))
        self.hidden_dim = H

    def log_likelihood_all(self, inputs: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """log p_k(x) for every component: (K, B)."""
        K, H = self.w_ih.size(0), self.hidden_dim
        B, T = inputs.shape
        emb = self.embed(inputs)                                    # (B, T, E)
        x_proj = torch.einsum("bte,keg->ktbg", emb, self.w_ih) + self.bias[:, None]  # (K, T, B, 4H)
        h = emb.new_zeros(K, B, H)
        c = emb.new_zeros(K, B, H)
        states = []
        for t in range(T):
            gates = x_proj[:, t] + torch.bmm(h, self.w_hh)          # (K, B, 4H)
            i, f, g, o = gates.chunk(4, -1)
            c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
            h = torch.sigmoid(o) * torch.tanh(c)
            states.append(h)
        states = torch.stack(states, 2)                             # (K, B, T, H)
        flat = states[:, mask]                                      # (K, M, H)
        logits = torch.baddbmm(self.out_b, flat, self.out_w).float()  # (K, M, V)
        tok = logits.gather(-1, targets[mask][None, :, None].expand(K, -1, 1)).squeeze(-1) - logits.logsumexp(-1)
        out = tok.new_zeros(K, B, T)
        out[:, mask] = tok
        return out.sum(-1)


class MixtureOfRNNLMs(FiniteLatentModel):
    latent = "discrete"
    default_posterior = "categorical_lstm"

    def __init__(self, vocab_size: int, num_components: int = 4, embed_dim: int = 128, hidden_dim: int = 128,
                 component_dim: int = 32, mode: str = "shared", dropout: float = 0.0, word_dropout: float = 0.0):
        super().__init__()
        if mode not in ("shared", "separate"):
            raise ValueError(f"mode must be 'shared' or 'separate', got {mode!r}")
        self.mode, self.latent_dim = mode, num_components  # latent_dim = K for the posterior
        self.word_dropout = word_dropout
        self.prior_logits = nn.Parameter(torch.zeros(num_components))
        if mode == "shared":
            self.component_embed = nn.Parameter(torch.randn(num_components, component_dim))
            self.decoder = LSTMDecoder(vocab_size, embed_dim, hidden_dim, component_dim, 1, dropout)
        else:
            self.components = BatchedLSTMLMs(vocab_size, num_components, embed_dim, hidden_dim)

    @property
    def num_components(self) -> int:
        return self.prior_logits.numel()

    def prior(self) -> Categorical:
        return Categorical(logits=self.prior_logits)

    def _inputs(self, batch: Batch) -> torch.Tensor:
        return word_dropout(batch.inputs, self.word_dropout) if self.training else batch.inputs

    def log_likelihood_all(self, batch: Batch) -> torch.Tensor:
        """log p(x | z = k) for every k, (K, B), in one batched pass."""
        K, B = self.num_components, batch.size
        inputs = self._inputs(batch)
        if self.mode == "separate":
            return self.components.log_likelihood_all(inputs, batch.targets, batch.mask)
        z = self.component_embed.repeat_interleave(B, 0)  # (K*B, Dz): k-major rows
        states = self.decoder.hidden_states(inputs.repeat(K, 1), z)
        ll = self.decoder.token_log_probs(states, batch.targets.repeat(K, 1), batch.mask.repeat(K, 1))
        return ll.view(K, B)

    def log_likelihood(self, batch: Batch, z: torch.Tensor) -> torch.Tensor:
        """z: (S, B) component ids, or (S, B, K) one-hot / relaxed one-hot (Gumbel-softmax).

        A relaxed z mixes component embeddings (shared mode) or component
        log-likelihoods (separate mode); for a one-hot z both are exact.
        """
        if z.dim() == 2:
            if self.mode == "separate":
                return self.log_likelihood_all(batch).gather(0, z)  # (S, B)
            z = F.one_hot(z, self.num_components).to(self.prior_logits.dtype)
        S, B, K = z.shape
        if self.mode == "separate":
            return torch.einsum("sbk,kb->sb", z, self.log_likelihood_all(batch))
        emb = (z @ self.component_embed).reshape(S * B, -1)  # (S*B, Dz)
        rep = (S, 1)
        states = self.decoder.hidden_states(self._inputs(batch).repeat(rep), emb)
        return self.decoder.token_log_probs(states, batch.targets.repeat(rep), batch.mask.repeat(rep)).view(S, B)

    def log_marginal(self, batch: Batch) -> torch.Tensor:
        return torch.logsumexp(self.prior().logits[:, None] + self.log_likelihood_all(batch), 0)  # (B,)

    def posterior_probs(self, batch: Batch) -> torch.Tensor:
        """Exact p(z | x), (B, K)."""
        joint = self.prior().logits[:, None] + self.log_likelihood_all(batch)
        return joint.softmax(0).T

    @torch.no_grad()
    def generate(self, z, num, max_len=50, greedy=False, generator=None):
        if self.mode == "separate":
            raise NotImplementedError("sampling from separate-LSTM mixtures is not implemented")
        if z is None:
            z = self.prior().sample((num,))
        return self.decoder.generate(self.component_embed[z], num, max_len, greedy, generator)
