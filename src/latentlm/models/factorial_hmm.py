"""M8: the factorial HMM (Ghahramani & Jordan 1997) — L Markov chains of K states emit one word jointly.

Generative story for a sentence w_1..w_n followed by ``</s>`` (T = n + 1 tokens):

    z^l_1 ~ Cat(init_l),  z^l_t ~ Cat(trans_l[z^l_{t-1}])         for each chain l = 1..L
    x_t   ~ softmax(b + sum_l theta_l[z^l_t])                      theta_l = E_l W^T  (K, V)

i.e. the emission logits are W (sum_l e_l[z^l_t]) + b, a sum of per-chain state embeddings
e_l (K, D) read out by one word matrix W (V, D). ``</s>`` is an ordinary token of the
emission softmax and the sentence ends at it (``<pad>`` and ``<s>`` are never emitted), so
p(x) is a distribution over sentences of every length and perplexity counts ``</s>``.

Exact inference runs the forward algorithm of :mod:`latentlm.structured` on the product
chain: K^L joint states, transition = the Kronecker product of the per-chain transitions
(K^L x K^L) and one emission table (K^L, V). That is exact and cheap for K^L up to a few
thousand; beyond ``max_exact_states`` :meth:`log_marginal` refuses and the model is learned
by structured mean field (:mod:`latentlm.inference.mean_field`), for which it exposes the
per-chain pieces (:meth:`chain_log_probs`, :meth:`emission_parts`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from torch.distributions import Distribution

from latentlm.data.batching import Batch
from latentlm.data.vocab import Vocab
from latentlm.models.base import LatentVariableModel
from latentlm.structured import hmm_log_likelihood

# Token ids no state emits; </s> is emitted (it ends the sentence).
NON_EMITTED = (Vocab.pad_id, Vocab.bos_id)


def tokens_of(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The emitted tokens (B, T) w_1..w_n </s> (padding: ``</s>``, never read) and their counts (B,)."""
    T = max(int(batch.lengths.max()), 1) if batch.lengths.numel() else 1
    x = batch.tokens[:, 1 : 1 + T]  # (B, T)
    mask = torch.arange(T, device=x.device)[None, :] < batch.lengths[:, None]
    return torch.where(mask, x, Vocab.eos_id), batch.lengths


class FactorialMarkovPrior(Distribution):
    """p(z) = prod_l Markov(init_l, trans_l) over paths z (..., B, T, L); -1 marks padding.

    Empty batch shape (the prior of every sentence); ``log_prob`` reads each path's length from
    its padding, so it scores samples of any q over the same batch."""

    arg_constraints: dict = {}

    def __init__(self, log_init: torch.Tensor, log_trans: torch.Tensor):
        self.log_init, self.log_trans = log_init, log_trans  # (L, K), (L, K, K)
        super().__init__(batch_shape=torch.Size(), validate_args=False)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        L = self.log_init.size(0)
        if z.dim() < 3 or z.size(-1) != L:
            raise ValueError(f"z must be (..., B, T, L={L}) state ids, got {tuple(z.shape)}")
        valid = z >= 0  # (..., B, T, L)
        zc = z.clamp_min(0)
        chains = torch.arange(L, device=z.device)
        first = self.log_init[chains, zc[..., 0, :]]  # (..., B, L)
        steps = self.log_trans[chains, zc[..., :-1, :], zc[..., 1:, :]]  # (..., B, T-1, L)
        steps = torch.where(valid[..., 1:, :], steps, 0.0)
        return (torch.where(valid[..., 0, :], first, 0.0) + steps.sum(-2)).sum(-1)


class FactorialHMM(LatentVariableModel):
    """L chains of K states; emission logits b + sum_l E_l[z^l] W^T. See the module docstring."""

    latent: ClassVar[str] = "structured"
    default_posterior: ClassVar[str | None] = None

    def __init__(self, vocab_size: int, num_chains: int = 3, num_states: int = 4, dim: int = 64,
                 init_scale: float = 1.0, max_exact_states: int = 4096, seed: int | None = None):
        super().__init__()
        if num_chains < 1 or num_states < 1 or vocab_size <= len(NON_EMITTED) + 1:
            raise ValueError(f"need num_chains >= 1, num_states >= 1 and a vocabulary beyond the specials, got "
                             f"{num_chains}, {num_states}, {vocab_size}")
        L, K, V = num_chains, num_states, vocab_size
        self.vocab_size, self.num_chains, self.num_states, self.max_exact_states = V, L, K, max_exact_states
        self.latent_dim = L * K  # what an amortized posterior produces per position
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        self.init_logits = nn.Parameter(init_scale * torch.randn(L, K, generator=g))      # (L, K)
        self.trans_logits = nn.Parameter(init_scale * torch.randn(L, K, K, generator=g))  # (L, K, K)
        self.state_emb = nn.Parameter(init_scale * torch.randn(L, K, dim, generator=g))   # (L, K, D)
        self.word_emb = nn.Parameter(torch.randn(V, dim, generator=g) / dim ** 0.5)       # (V, D)
        self.word_bias = nn.Parameter(torch.zeros(V))
        mask = torch.zeros(V, dtype=torch.bool)
        mask[list(NON_EMITTED)] = True
        self.register_buffer("non_emitted", mask, persistent=False)

    # ---- the pieces ------------------------------------------------------------------------

    def chain_log_probs(self) -> tuple[torch.Tensor, torch.Tensor]:
        """log init (L, K) and log trans (L, K, K) [chain, prev, next] of every chain."""
        return torch.log_softmax(self.init_logits, -1), torch.log_softmax(self.trans_logits, -1)

    def emission_parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """theta (L, K, V) per-chain word scores and the bias b (V,) (-inf on never-emitted ids):
        log p(x_t = v | z_t) = b_v + sum_l theta[l, z^l_t, v] - log Z(z_t)."""
        theta = self.state_emb @ self.word_emb.t()  # (L, K, V)
        return theta, self.word_bias.masked_fill(self.non_emitted, -torch.inf)

    def prior(self) -> FactorialMarkovPrior:
        return FactorialMarkovPrior(*self.chain_log_probs())

    @property
    def num_product_states(self) -> int:
        return self.num_states ** self.num_chains

    @property
    def has_exact_marginal(self) -> bool:
        """Exact log p(x) is offered while the product chain has at most ``max_exact_states`` states."""
        return self.num_product_states <= self.max_exact_states

    def product_digits(self, device=None) -> torch.Tensor:
        """(K^L, L): the per-chain states of each product state, chain 0 the most significant digit
        (the order of ``torch.kron(A_0, A_1, ...)``)."""
        K, L = self.num_states, self.num_chains
        s = torch.arange(K ** L, device=device)
        powers = K ** torch.arange(L - 1, -1, -1, device=device)
        return (s[:, None] // powers[None, :]) % K

    def product_chain(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(init (P,), trans (P, P), unary (B, T, P), lengths) of the product chain, P = K^L.

        trans is the Kronecker product of the chains' transitions, built in log space as the
        sum of each chain's log-transition between the product states' digits."""
        P = self.num_product_states
        if P > self.max_exact_states:
            raise ValueError(f"exact inference needs K^L = {P} product states (> max_exact_states = "
                             f"{self.max_exact_states}); use the mean_field objective, or raise max_exact_states")
        log_init, log_trans = self.chain_log_probs()
        theta, bias = self.emission_parts()
        d = self.product_digits(theta.device)  # (P, L)
        chains = torch.arange(self.num_chains, device=theta.device)
        init = log_init[chains, d].sum(-1)  # (P,)
        trans = log_trans[chains, d[:, None, :], d[None, :, :]].sum(-1)  # (P, P)
        logits = theta[chains, d].sum(1) + bias  # (P, V)
        x, n = tokens_of(batch)
        unary = torch.log_softmax(logits, -1).t()[x]  # (B, T, P)
        return init, trans, unary, n

    # ---- the LatentVariableModel interface ---------------------------------------------

    def log_marginal(self, batch: Batch) -> torch.Tensor:
        """Exact log p(w_1..w_n, </s>) (B,) by the forward algorithm over the K^L product states."""
        return hmm_log_likelihood(*self.product_chain(batch))

    def log_likelihood(self, batch: Batch, z: torch.Tensor) -> torch.Tensor:
        """log p(x | z) = sum_t log p(x_t | z_t) for state paths z (S, B, T, L) (-1 on padding) -> (S, B)."""
        x, n = tokens_of(batch)
        S = z.size(0)
        if z.dim() != 4 or z.shape[1:] != (*x.shape, self.num_chains):
            raise ValueError(f"z must be (S, B, T, L) = (S, {x.size(0)}, {x.size(1)}, {self.num_chains}) "
                             f"state ids, got {tuple(z.shape)}")
        chains = torch.arange(self.num_chains, device=z.device)
        h = self.state_emb[chains, z.clamp_min(0)].sum(-2)  # (S, B, T, D)
        logits = h @ self.word_emb.t() + self.emission_parts()[1]  # (S, B, T, V)
        ll = torch.log_softmax(logits.float(), -1).gather(-1, x.expand(S, -1, -1).unsqueeze(-1)).squeeze(-1)
        mask = torch.arange(x.size(1), device=x.device)[None, :] < n[:, None]
        return torch.where(mask, ll, 0.0).sum(-1)

    @torch.no_grad()
    def generate(self, z: torch.Tensor | None, num: int, max_len: int = 50, greedy: bool = False) -> torch.Tensor:
        """``num`` sentences ``<s> w.. </s>`` (num, <= max_len + 2) by ancestral sampling (z ignored)."""
        log_init, log_trans = self.chain_log_probs()
        theta, bias = self.emission_parts()
        chains = torch.arange(self.num_chains, device=bias.device)
        state = torch.distributions.Categorical(logits=log_init).sample((num,))  # (num, L)
        out = torch.full((num, max_len + 2), Vocab.pad_id, dtype=torch.long, device=bias.device)
        out[:, 0] = Vocab.bos_id
        done = torch.zeros(num, dtype=torch.bool, device=bias.device)
        for t in range(max_len + 1):
            logits = theta[chains, state].sum(1) + bias  # (num, V)
            if t == max_len:  # out of room: end the sentence here
                w = torch.full_like(done, Vocab.eos_id, dtype=torch.long)
            else:
                w = logits.argmax(-1) if greedy else torch.distributions.Categorical(logits=logits).sample()
            out[:, t + 1] = torch.where(done, out[:, t + 1], w)
            done = done | (w == Vocab.eos_id)
            if bool(done.all()):
                break
            state = torch.distributions.Categorical(logits=log_trans[chains, state]).sample()
        return out
