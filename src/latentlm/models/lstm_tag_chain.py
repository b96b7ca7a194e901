"""M7: a first-order Markov chain of K tags whose words are emitted by an LSTM language model.

Generative story for a sentence w_1..w_n followed by ``</s>`` (the HMM's, :mod:`latentlm.models.hmm`,
with a context-dependent emission):

    z_1 ~ Cat(init)               init has K + 1 outcomes; the last, STOP, is the empty sentence
    h_t = LSTM(<s>, w_1 .. w_{t-1})   the words so far
    w_t ~ softmax_w((s_{z_t} + W h_t) . u_w + b_w)    s_k a tag embedding, u_w an output word embedding
    z_{t+1} ~ Cat(trans[z_t])     trans is (K, K + 1); its last column is STOP, which emits </s>

Because w_t depends on every earlier word through h_t, p(z | x) is no longer a chain: exact
inference is lost, and the model is learned with an amortized chain-CRF q(z | x)
(``posterior: crf_bilstm``) by the ELBO. ``lstm: false`` drops h_t, which leaves an HMM with the
same parameterization (rank-``dim`` emissions); :meth:`LSTMTagChain.exact_log_marginal` and
:meth:`LSTMTagChain.exact_posterior` then give the exact answers the ELBO is tested against.

p(z) is :class:`MarkovChainPrior`, a distribution over tag paths (``-1`` on padding) whose KL
from a :class:`~latentlm.structured.LinearChainCRF` q is registered with torch's KL registry,
so ``objective.kl: auto | analytic`` takes it in closed form:
KL(q || p) = -H(q) - E_q log p(z), the entropy by the chain DP and the cross term from q's
unary and edge marginals (first-tag marginal x log init + edge marginals x log trans + last-tag
marginal x log STOP), both exact and differentiable.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn
from torch.distributions import Distribution, register_kl

from latentlm.data.batching import Batch
from latentlm.models.base import LatentVariableModel
from latentlm.models.hmm import NON_EMITTED, HMMBase, words_of
from latentlm.nn.dropout import Dropout
from latentlm.nn.factored_output import pairwise_target_log_probs
from latentlm.structured import LinearChainCRF, hmm_log_likelihood
from latentlm.structured.expectations import chain_expectations


class MarkovChainPrior(Distribution):
    """p(z) of a tag path with a STOP outcome: ``log_init`` (K+1,), ``log_trans`` (K, K+1), both
    normalized, last entry STOP. ``log_prob(z)`` for paths z (..., T) long with ``-1`` after the
    sentence's end: log init[z_1] + sum_t log trans[z_{t-1}, z_t] + log trans[z_n, STOP]
    (log init[STOP] for the empty path). Empty batch shape; the lengths come from the paths."""

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, log_init: torch.Tensor, log_trans: torch.Tensor):
        K = log_trans.size(0)
        if log_init.shape != (K + 1,) or log_trans.shape != (K, K + 1):
            raise ValueError(f"need log_init (K+1,) and log_trans (K, K+1), got {tuple(log_init.shape)} and "
                             f"{tuple(log_trans.shape)}")
        self.log_init, self.log_trans, self.num_states = log_init, log_trans, K
        super().__init__(batch_shape=torch.Size(), validate_args=False)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        if z.dtype != torch.long or z.dim() < 1:
            raise ValueError(f"MarkovChainPrior scores tag paths (..., T) of long ids, got {z.dtype} {tuple(z.shape)}")
        K = self.num_states
        valid = z >= 0                        # (..., T)
        n = valid.sum(-1)                     # (...,)
        s = z.clamp_min(0)
        if z.size(-1) == 0:
            return self.log_init[K].expand(z.shape[:-1])
        first = torch.where(n > 0, self.log_init[s[..., 0]], self.log_init[K])
        steps = torch.where(valid[..., 1:], self.log_trans[s[..., :-1], s[..., 1:]], 0.0).sum(-1)
        last = s.gather(-1, (n - 1).clamp_min(0).unsqueeze(-1)).squeeze(-1)
        stop = torch.where(n > 0, self.log_trans[last, K], 0.0)
        return first + steps + stop

    def expected_log_prob(self, q: LinearChainCRF) -> torch.Tensor:
        """E_q log p(z) (B,) exactly from q's marginals (first tag x log init, edges x log trans,
        last tag x log STOP); differentiable in q's scores and in p."""
        return self.expectations(q)[1]

    def expectations(self, q: LinearChainCRF) -> tuple[torch.Tensor, torch.Tensor]:
        """(E_q log q(z), E_q log p(z)), each (B,), from one sweep of
        :func:`~latentlm.structured.expectations.chain_expectations`."""
        K, n = self.num_states, q.lengths
        B, T, _ = q.unary.shape
        if T == 0:
            zero = q.unary.sum(dim=(1, 2))
            return zero, self.log_init[K].expand(B) + zero
        last = torch.arange(T, device=n.device)[None, :] == (n - 1)[:, None]  # (B, T)
        stop = torch.where(last[..., None], self.log_trans[:, K], 0.0)      # (B, T, K)
        init, trans = self.log_init[:K].to(stop.dtype), self.log_trans[:, :K].to(stop.dtype)
        neg_entropy, cross = chain_expectations(q.init, q.potentials, q.unary, n, init, trans,
                                                stop.to(q.unary.dtype))
        return neg_entropy, torch.where(n > 0, cross, self.log_init[K])


@register_kl(LinearChainCRF, MarkovChainPrior)
def _kl_chain_crf_markov_chain(q: LinearChainCRF, p: MarkovChainPrior) -> torch.Tensor:
    """KL(q || p) = E_q log q(z) - E_q log p(z), (B,): exact, both terms from one sweep."""
    neg_entropy, cross = p.expectations(q)
    return neg_entropy - cross


class LSTMTagChain(LatentVariableModel):
    """M7: Markov chain of K tags, words emitted given the tag and an LSTM state over the words so far.

    ``lstm: false`` gives the HMM of the same parameterization (the sanity anchor);
    ``dim`` is the size of tag and word embeddings, ``hidden_dim`` the LSTM's.
    """

    latent: ClassVar[str] = "structured"
    default_posterior: ClassVar[str | None] = "crf_bilstm"

    def __init__(self, vocab_size: int, num_states: int, dim: int = 64, hidden_dim: int = 128, lstm: bool = True,
                 dropout: float = 0.0, init_scale: float = 0.1, seed: int | None = None):
        super().__init__()
        if num_states < 1 or vocab_size <= len(NON_EMITTED):
            raise ValueError(f"need num_states >= 1 and vocab_size > {len(NON_EMITTED)}, got {num_states}, {vocab_size}")
        K, V = num_states, vocab_size
        self.vocab_size, self.num_states, self.latent_dim = V, K, K
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        self.init_logits = nn.Parameter(init_scale * torch.randn(K + 1, generator=g))     # (K+1,)
        self.trans_logits = nn.Parameter(init_scale * torch.randn(K, K + 1, generator=g))  # (K, K+1)
        self.state_emb = nn.Parameter(torch.randn(K, dim, generator=g) / dim ** 0.5)     # (K, d)
        self.out_emb = nn.Parameter(torch.randn(V, dim, generator=g) / dim ** 0.5)       # (V, d)
        self.out_bias = nn.Parameter(torch.zeros(V))
        self.use_lstm = lstm
        if lstm:
            self.in_emb = nn.Embedding(V, dim)
            self.lstm = nn.LSTM(dim, hidden_dim, batch_first=True)
            self.context = nn.Linear(hidden_dim, dim)
        self.dropout = Dropout(dropout)
        emit_mask = torch.zeros(V, dtype=torch.bool)
        emit_mask[list(NON_EMITTED)] = True
        self.register_buffer("non_emitted", emit_mask, persistent=False)

    # ---- p(z) ---------------------------------------------------------------------------

    def prior(self) -> MarkovChainPrior:
        return MarkovChainPrior(torch.log_softmax(self.init_logits, -1), torch.log_softmax(self.trans_logits, -1))

    # ---- p(x | z) -----------------------------------------------------------------------

    def _bias(self) -> torch.Tensor:
        return self.out_bias.masked_fill(self.non_emitted, -torch.inf)  # (V,)

    def log_likelihood(self, batch: Batch, z: torch.Tensor) -> torch.Tensor:
        """log p(x | z) = sum_t log p(w_t | z_t, h_t) for tag paths z (S, B, N) long (-1 on padding),
        or relaxed paths (S, B, N, K) on the simplex (the tag embedding is then sum_k z_k s_k;
        a one-hot z gives exactly the hard value) -> (S, B). ``</s>`` belongs to p(z) (STOP)."""
        words, n = words_of(batch)  # (B, N), (B,)
        B, N = words.shape
        relaxed = z.is_floating_point()
        if z.dim() != (4 if relaxed else 3) or z.shape[1:3] != words.shape or (relaxed and z.size(-1) != self.num_states):
            raise ValueError(f"z must be (S, B, N) = (S, {B}, {N}) tag ids or (S, {B}, {N}, {self.num_states}) "
                             f"relaxed tags, got {tuple(z.shape)} {z.dtype}")
        mask = torch.arange(N, device=words.device)[None, :] < n[:, None]  # (B, N)
        if not relaxed and not self.use_lstm:  # an HMM: one (K, V) table
            log_emit = torch.log_softmax(self.dropout(self.state_emb) @ self.out_emb.t() + self._bias(), -1)
            scores = log_emit[z.clamp_min(0), words.expand_as(z)]  # (S, B, N)
            return torch.where(mask, scores, 0.0).sum(-1)
        if not relaxed:  # every tag scored at once, then the sampled paths read off: no (S, B, N, V) logits
            table = self.emission_table(batch, N)  # (B, N, K)
            scores = table.expand(z.size(0), -1, -1, -1).gather(-1, z.clamp_min(0)[..., None]).squeeze(-1)
            return torch.where(mask, scores, 0.0).sum(-1)
        hidden = self.dropout(z @ self.state_emb)  # (S, B, N, d): a relaxed path mixes the tag embeddings
        if self.use_lstm:
            hidden = hidden + self._context(batch, N)[None]
        logits = hidden @ self.out_emb.t() + self._bias()  # (S, B, N, V)
        target = logits.gather(-1, words[None, :, :, None].expand(z.size(0), -1, -1, 1)).squeeze(-1)
        scores = target - torch.logsumexp(logits, -1)  # (S, B, N)
        return torch.where(mask, scores, 0.0).sum(-1)

    def _context(self, batch: Batch, N: int) -> torch.Tensor:
        """W h_t (B, N, d) after dropout, h_t the LSTM over <s> w_1 .. w_{N-1}."""
        h, _ = self.lstm(self.dropout(self.in_emb(batch.tokens[:, :N])))
        return self.dropout(self.context(self.dropout(h)))

    def emission_table(self, batch: Batch, N: int | None = None) -> torch.Tensor:
        """log p(w_t | z_t = k, h_t) for every position and tag, (B, N, K). The logits split into
        a word part (W h_t) . u + b and a tag part s_k . u, so the K normalizers of a position are
        one (V x K) product (:func:`latentlm.nn.factored_output.pairwise_target_log_probs`), not K
        output layers. (Dropout falls on the two parts separately.)"""
        words, _ = words_of(batch)
        N = words.size(1) if N is None else N
        tag_part = self.dropout(self.state_emb) @ self.out_emb.t()  # (K, V)
        if not self.use_lstm:
            word_part = self._bias().expand(words.size(0), N, -1)
        else:
            word_part = self._context(batch, N) @ self.out_emb.t() + self._bias()  # (B, N, V)
        return pairwise_target_log_probs(word_part, tag_part, words)

    # ---- the HMM special case (lstm: false) --------------------------------------------

    def hmm_tables(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log init (K+1,), log trans (K, K+1), log emit (K, V)) of the model without its LSTM."""
        if self.use_lstm:
            raise ValueError("the LSTM emissions make p(z | x) intractable; exact inference needs lstm: false")
        log_emit = torch.log_softmax(self.state_emb @ self.out_emb.t() + self._bias(), -1)
        prior = self.prior()
        return prior.log_init, prior.log_trans, log_emit

    def exact_log_marginal(self, batch: Batch) -> torch.Tensor:
        """log p(x) (B,) by the forward algorithm; only with ``lstm: false``."""
        log_init, log_trans, log_emit = self.hmm_tables()
        init, trans, unary, n = HMMBase.chain_scores(log_init, log_trans, log_emit, batch)
        return torch.where(n > 0, hmm_log_likelihood(init, trans, unary, n), log_init[-1])

    def exact_posterior(self, batch: Batch) -> LinearChainCRF:
        """p(z | x) as a chain; only with ``lstm: false``."""
        init, trans, unary, n = HMMBase.chain_scores(*self.hmm_tables(), batch)
        return LinearChainCRF(trans, unary, n, init=init)
