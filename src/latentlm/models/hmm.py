"""M5: the hidden Markov model, learned by Baum-Welch EM or by direct gradient.

Generative story for a sentence w_1..w_n followed by ``</s>``:

    z_1 ~ Cat(init)          init has K + 1 outcomes; the last one, STOP, is the empty sentence
    w_t ~ Cat(emit[z_t])     emit is (K, V); it never emits <pad>, <s> or </s>
    z_{t+1} ~ Cat(trans[z_t])  trans is (K, K + 1); its last column is STOP, which emits </s>

so p(x) is a proper distribution over sentences of every length and ``</s>`` is a predicted
token, as perplexity counts it. The STOP probability is folded into the unary score of the
last word, so the forward algorithm runs over the n words with K states:

    log p(x) = hmm_log_likelihood(log init[:K], log trans[:, :K], log emit[:, w_t] (+ log stop at t = n)).

EM needs no code of its own for the E-step: the expected counts of every event are the
gradient of log p(x) with respect to the log-probabilities of those events, which the chain
dynamic program's hand-written backward pass computes in one forward-backward sweep.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn

from latentlm.data.batching import Batch
from latentlm.data.vocab import Vocab
from latentlm.models.base import ClosedFormEM, EStep, GeneralizedEM, LatentVariableModel
from latentlm.structured import LinearChainCRF, emission_scores, hmm_log_likelihood, hmm_viterbi

# Token ids an HMM state never emits (the vocabulary's fixed specials).
NON_EMITTED = (Vocab.pad_id, Vocab.bos_id, Vocab.eos_id)


def words_of(batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """The words (B, N) (padding arbitrary) and their counts n (B,) of a ``<s> w.. </s>`` batch."""
    n = batch.lengths - 1  # (B,) the target count includes </s>
    N = max(int(n.max()), 1) if n.numel() else 1
    words = batch.tokens[:, 1 : 1 + N]  # (B, N)
    if words.size(1) < N:  # defensive: a batch without trailing </s> column
        words = torch.nn.functional.pad(words, (0, N - words.size(1)), value=Vocab.pad_id)
    return words, n


class HMMBase(LatentVariableModel, GeneralizedEM):
    """Everything an HMM does given its three log-probability tables.

    Subclasses implement :meth:`log_probs`, returning ``log_init`` (K+1,), ``log_trans``
    (K, K+1) and ``log_emit`` (K, V), each normalized over its last axis.
    """

    latent: ClassVar[str] = "structured"
    default_posterior: ClassVar[str | None] = None  # the exact posterior is a chain CRF

    def __init__(self, vocab_size: int, num_states: int):
        super().__init__()
        if num_states < 1 or vocab_size <= len(NON_EMITTED):
            raise ValueError(f"need num_states >= 1 and vocab_size > {len(NON_EMITTED)}, got {num_states}, {vocab_size}")
        self.vocab_size, self.num_states = vocab_size, num_states
        emit_mask = torch.zeros(vocab_size, dtype=torch.bool)
        emit_mask[list(NON_EMITTED)] = True
        self.register_buffer("non_emitted", emit_mask, persistent=False)

    def log_probs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:  # pragma: no cover - interface
        raise NotImplementedError

    # ---- the chain of a batch ----------------------------------------------------------

    @staticmethod
    def chain_scores(
        log_init: torch.Tensor, log_trans: torch.Tensor, log_emit: torch.Tensor, batch: Batch
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(init (K,), trans (K, K), unary (B, N, K), n (B,)) with STOP folded into the last word."""
        K = log_trans.size(0)
        words, n = words_of(batch)
        unary = emission_scores(log_emit, words)  # (B, N, K)
        last = (n - 1).clamp_min(0)  # (B,)
        stop = log_trans[:, K].expand(words.size(0), K)  # (B, K)
        stop = torch.where((n > 0)[:, None], stop, 0.0)
        unary = unary.scatter_add(1, last[:, None, None].expand(-1, 1, K), stop.unsqueeze(1))
        return log_init[:K], log_trans[:, :K], unary, n

    def _log_marginal_from(self, log_init, log_trans, log_emit, batch: Batch) -> torch.Tensor:
        init, trans, unary, n = self.chain_scores(log_init, log_trans, log_emit, batch)
        ll = hmm_log_likelihood(init, trans, unary, n)
        return torch.where(n > 0, ll, log_init[-1])  # an empty sentence is STOP at once

    # ---- the LatentVariableModel interface ---------------------------------------------

    def log_marginal(self, batch: Batch) -> torch.Tensor:
        """Exact log p(w_1..w_n, </s>) (B,) in nats by the forward algorithm."""
        return self._log_marginal_from(*self.log_probs(), batch)

    def log_likelihood(self, batch: Batch, z: torch.Tensor) -> torch.Tensor:
        """log p(x | z) = sum_t log emit[z_t, w_t] for state paths z (S, B, N) -> (S, B).

        (STOP belongs to the state chain, so it is part of p(z), not of p(x | z).)
        """
        _, _, log_emit = self.log_probs()
        words, n = words_of(batch)
        if z.dim() != 3 or z.shape[1:] != words.shape:
            raise ValueError(f"z must be (S, B, N) = (S, {words.size(0)}, {words.size(1)}) state ids, got {tuple(z.shape)}")
        mask = torch.arange(words.size(1), device=words.device)[None, :] < n[:, None]  # (B, N)
        scores = log_emit[z.clamp_min(0), words.expand_as(z)]  # (S, B, N)
        return torch.where(mask, scores, 0.0).sum(-1)

    def posterior(self, batch: Batch) -> LinearChainCRF:
        """The exact posterior p(z | x) over the n words' states, as a chain distribution."""
        init, trans, unary, n = self.chain_scores(*self.log_probs(), batch)
        return LinearChainCRF(trans, unary, n, init=init)

    def expected_counts(self, batch: Batch, temperature: float | torch.Tensor = 1.0) -> EStep:
        """E-step of a batch: expected counts of (init, trans, emit) events and log p(x) (B,).

        The counts are the gradient of log p(x) with respect to the log-probability tables,
        computed by the chain program's hand-written forward-backward pass.
        """
        if not (isinstance(temperature, float | int) and temperature == 1):
            raise ValueError(f"{type(self).__name__} has no annealed E-step; remove train.em.anneal")
        with torch.enable_grad():
            tables = [x.detach().requires_grad_(True) for x in self.log_probs()]
            ll = self._log_marginal_from(*tables, batch)  # (B,)
            grads = torch.autograd.grad(ll.sum(), tables)
        ll = ll.detach().to(torch.float64)
        return EStep(dict(zip(("init", "trans", "emit"), grads)), ll, ll)

    def expected_complete_log_likelihood(self, counts: dict[str, torch.Tensor]) -> torch.Tensor:
        """Q(theta) = sum of expected event counts x log-probabilities of the current tables."""
        total = torch.zeros((), dtype=counts["emit"].dtype, device=counts["emit"].device)
        for c, logp in zip((counts["init"], counts["trans"], counts["emit"]), self.log_probs()):
            total = total + torch.where(c > 0, c * logp, 0.0).sum()  # 0 * (-inf) of never-emitted words -> 0
        return total

    @torch.no_grad()
    def tag(self, batch: Batch) -> torch.Tensor:
        """Viterbi state of every word (B, N), -1 after the sentence's end."""
        init, trans, unary, n = self.chain_scores(*self.log_probs(), batch)
        return hmm_viterbi(init, trans, unary, n)[0]

    @torch.no_grad()
    def generate(self, z: torch.Tensor | None, num: int, max_len: int = 50, greedy: bool = False) -> torch.Tensor:
        """``num`` sentences ``<s> w.. </s>`` (num, <= max_len + 2) by ancestral sampling (z ignored)."""
        log_init, log_trans, log_emit = self.log_probs()
        K = self.num_states
        state = torch.distributions.Categorical(logits=log_init).sample((num,))  # (num,) may be STOP = K
        out = torch.full((num, max_len + 2), Vocab.pad_id, dtype=torch.long, device=log_emit.device)
        out[:, 0] = Vocab.bos_id
        done = state == K
        for t in range(max_len):
            s = state.clamp_max(K - 1)
            w = log_emit[s].argmax(-1) if greedy else torch.distributions.Categorical(logits=log_emit[s]).sample()
            out[:, t + 1] = torch.where(done, out[:, t + 1], w)  # keeps an earlier </s>
            nxt = torch.distributions.Categorical(logits=log_trans[s]).sample()
            state = torch.where(done, state, nxt)
            newly = ~done & (state == K)
            out[:, t + 2] = torch.where(newly, Vocab.eos_id, out[:, t + 2])
            done = done | newly
        out[:, -1] = torch.where(done, out[:, -1], Vocab.eos_id)
        return out


class HMM(HMMBase, ClosedFormEM):
    """Classical HMM: one free logit per event, trained by Baum-Welch (``train.learner: em``),
    generalized EM or gradient."""

    def __init__(self, vocab_size: int, num_states: int, init_scale: float = 1.0, seed: int | None = None):
        super().__init__(vocab_size, num_states)
        K, V = num_states, vocab_size
        g = torch.Generator().manual_seed(seed) if seed is not None else None
        # Random logits break the symmetry between states; init_scale = 0 is the uniform HMM
        # (a fixed point of EM, useless for learning).
        self.init_logits = nn.Parameter(init_scale * torch.randn(K + 1, generator=g))   # (K+1,)
        self.trans_logits = nn.Parameter(init_scale * torch.randn(K, K + 1, generator=g))  # (K, K+1)
        self.emit_logits = nn.Parameter(init_scale * torch.randn(K, V, generator=g))    # (K, V)

    def log_probs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        emit = self.emit_logits.masked_fill(self.non_emitted, -torch.inf)
        return (
            torch.log_softmax(self.init_logits, -1),
            torch.log_softmax(self.trans_logits, -1),
            torch.log_softmax(emit, -1),
        )

    @torch.no_grad()
    def set_log_probs(self, log_init: torch.Tensor, log_trans: torch.Tensor, log_emit: torch.Tensor) -> None:
        """Write normalized log-probabilities into the logits (e.g. after an M-step)."""
        for p, v in ((self.init_logits, log_init), (self.trans_logits, log_trans), (self.emit_logits, log_emit)):
            if p.shape != v.shape:
                raise ValueError(f"expected log-probs of shape {tuple(p.shape)}, got {tuple(v.shape)}")
            # -inf logits would make log_softmax's gradient NaN; a huge negative is exact in softmax.
            p.copy_(v.clamp_min(torch.finfo(p.dtype).min / 4))

    # ---- Baum-Welch (the ClosedFormEM capability) ---------------------------------------

    @torch.no_grad()
    def m_step(self, counts: dict[str, torch.Tensor], smoothing: float = 0.0,
               emit_smoothing: float | None = None) -> None:
        """Closed-form (MAP with symmetric Dirichlet(1 + smoothing)) parameters from expected counts;
        ``emit_smoothing`` (default ``smoothing``) is the emissions' pseudo-count."""
        es = smoothing if emit_smoothing is None else emit_smoothing
        emit = (counts["emit"] + es).masked_fill(self.non_emitted, 0.0)

        def normalize(c: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
            tot = c.sum(-1, keepdim=True)
            # A state never visited has no MLE; keep its old distribution (it does not matter).
            return torch.where(tot > 0, torch.log(c) - torch.log(tot.clamp_min(1e-300)), old)

        old_i, old_t, old_e = self.log_probs()
        self.set_log_probs(
            normalize(counts["init"] + smoothing, old_i),
            normalize(counts["trans"] + smoothing, old_t),
            normalize(emit, old_e),
        )

    @torch.no_grad()
    def log_prior(self, smoothing: float = 0.0, emit_smoothing: float | None = None) -> float:
        es = smoothing if emit_smoothing is None else emit_smoothing
        log_init, log_trans, log_emit = self.log_probs()
        total = 0.0
        if smoothing > 0:
            total += smoothing * float(log_init.sum(dtype=torch.float64) + log_trans.sum(dtype=torch.float64))
        if es > 0:
            total += es * float(log_emit.masked_fill(self.non_emitted, 0.0).sum(dtype=torch.float64))
        return total

    def em_step(self, batches: Iterable[Batch], smoothing: float = 0.0, emit_smoothing: float | None = None) -> float:
        """One Baum-Welch iteration over ``batches`` (what ``benchmarks/bench_baum_welch.py`` times);
        returns log p(data) *before* the update. Training runs through ``latentlm train``."""
        total, counts = 0.0, None
        for batch in batches:
            e = self.expected_counts(batch)
            counts = e.counts if counts is None else {k: counts[k] + v for k, v in e.counts.items()}
            total += float(e.log_likelihood.sum())
        self.m_step(counts, smoothing, emit_smoothing)
        return total
