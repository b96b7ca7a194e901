"""M9: the neural hidden semi-Markov model — states emit segments of 1..D words.

Generative story for a sentence w_1..w_n followed by ``</s>``:

    k_1 ~ Cat(init)                 K + 1 outcomes; the last, STOP, is the empty sentence
    repeat:  d ~ Cat(length[k])     a segment length in 1..D, per state
             w_s..w_{s+d-1}         emitted by the segment LSTM in state k (below)
             k' ~ Cat(trans[k])     K + 1 outcomes; STOP ends the sentence and emits </s>

The segment LSTM restarts at every segment (from a learned state, or, with ``context: true``,
from an LSTM over the words before the segment, which keeps log p(x) exact because that
context is a function of x). Word j of a segment in state k is scored as

    p(w | k, g) ∝ exp(u_w · (g + e_k) + b_w)

with g the segment LSTM's hidden state after the segment's first j words and e_k the state's
embedding. The segment LSTM's recurrence does not depend on k, so it runs once per start
position; the K normalizers come from one (R, V) @ (V, K) product,
sum_w exp(u_w·g + b_w) exp(u_w·e_k), instead of K output layers.

log p(x) is exact: the segment scores (B, N, D, K) go into the semi-Markov forward
algorithm of :mod:`latentlm.structured` (hand-written backward), with STOP folded into the
segments that end the sentence. ``segment(batch)`` gives the Viterbi segmentation.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from latentlm.data.batching import Batch
from latentlm.models.base import LatentVariableModel
from latentlm.models.hmm import NON_EMITTED, words_of
from latentlm.nn.dropout import Dropout
from latentlm.structured import semimarkov_log_partition, semimarkov_viterbi


class NeuralHSMM(LatentVariableModel):
    latent: ClassVar[str] = "structured"
    default_posterior: ClassVar[str | None] = None  # the exact posterior is a semi-Markov CRF

    def __init__(self, vocab_size: int, num_states: int = 10, max_length: int = 4, embed_dim: int = 128,
                 hidden_dim: int = 128, context: bool = False, dropout: float = 0.0):
        super().__init__()
        if num_states < 1 or max_length < 1 or vocab_size <= len(NON_EMITTED):
            raise ValueError(f"need num_states >= 1, max_length >= 1, vocab_size > {len(NON_EMITTED)}; "
                             f"got {num_states}, {max_length}, {vocab_size}")
        K, D, V, H = num_states, max_length, vocab_size, hidden_dim
        self.num_states, self.max_length, self.vocab_size, self.context = K, D, V, context
        self.init_logits = nn.Parameter(torch.zeros(K + 1))           # (K+1,)
        self.trans_logits = nn.Parameter(torch.zeros(K, K + 1))       # (K, K+1)
        self.length_logits = nn.Parameter(torch.zeros(K, D))          # (K, D)
        self.state_embedding = nn.Parameter(0.5 * torch.randn(K, H))  # (K, H) breaks the symmetry
        self.embedding = nn.Embedding(V, embed_dim)
        self.start = nn.Parameter(torch.zeros(embed_dim))             # first input of every segment
        self.segment_lstm = nn.LSTM(embed_dim, H, batch_first=True)
        self.context_lstm = nn.LSTM(embed_dim, H, batch_first=True) if context else None
        self.out = nn.Linear(H, V)
        self.drop = Dropout(dropout)
        mask = torch.zeros(V, dtype=torch.bool)
        mask[list(NON_EMITTED)] = True
        self.register_buffer("non_emitted", mask, persistent=False)

    def log_probs(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """log init (K+1,), log trans (K, K+1), log length (K, D)."""
        return (self.init_logits.log_softmax(-1), self.trans_logits.log_softmax(-1),
                self.length_logits.log_softmax(-1))

    def segment_word_log_probs(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """log p(w_{s+j} | segment in state k starting at s, its words s..s+j-1): (B, N, D, K)
        (0 where s + j is past the sentence), and n (B,)."""
        words, n = words_of(batch)  # (B, N)
        B, N = words.shape
        D, K = self.max_length, self.num_states
        padded = nn.functional.pad(words, (0, D), value=0)
        targets = padded.unfold(1, D, 1)[:, :N]  # (B, N, D): word s + j
        valid = (torch.arange(N, device=words.device)[:, None] + torch.arange(D, device=words.device)) \
            [None] < n[:, None, None]  # (B, N, D)
        emb = self.drop(self.embedding(targets[..., :-1]))  # (B, N, D-1, E)
        start = self.start.expand(B, N, 1, -1)
        inputs = torch.cat([start, emb], 2).reshape(B * N, D, -1)
        hx = None
        if self.context_lstm is not None:  # the words before each start, read left to right
            ctx_in = torch.cat([self.start.expand(B, 1, -1), self.drop(self.embedding(words[:, :-1]))], 1)
            h0 = self.context_lstm(ctx_in)[0].reshape(1, B * N, -1)  # after w_1..w_{s-1}
            hx = (h0, torch.zeros_like(h0))
        g = self.drop(self.segment_lstm(inputs, hx)[0]).reshape(B, N, D, -1)  # (B, N, D, H)
        rows = g[valid]  # (R, H) only positions inside the sentence
        tgt = targets[valid]  # (R,)
        logits = self.out(rows).masked_fill(self.non_emitted, -torch.inf)  # (R, V)
        c = self.state_embedding @ self.out.weight.T  # (K, V): u_w · e_k
        m_r = logits.amax(1, keepdim=True)
        m_k = c.amax(1, keepdim=True)
        norm = (logits - m_r).exp() @ (c - m_k).exp().T  # (R, K)
        log_norm = norm.clamp_min(torch.finfo(norm.dtype).tiny).log() + m_r + m_k.T
        lp = logits.gather(1, tgt[:, None]) + c[:, tgt].T - log_norm  # (R, K)
        out = torch.zeros(B, N, D, K, dtype=lp.dtype, device=lp.device)
        out[valid] = lp
        return out, n

    def potentials(self, batch: Batch):
        """(init (K,), trans (K, K), seg (B, N, D, K), n (B,), log_init (K+1,)) of the semi-Markov chain."""
        log_init, log_trans, log_len = self.log_probs()
        K, D = self.num_states, self.max_length
        word_lp, n = self.segment_word_log_probs(batch)
        seg = word_lp.cumsum(2) + log_len.T  # (B, N, D, K): lengths 1..D
        N = seg.size(1)
        ends = torch.arange(N, device=seg.device)[:, None] + torch.arange(1, D + 1, device=seg.device)  # (N, D)
        final = (ends[None] == n[:, None, None])[..., None]  # (B, N, D, 1): the segment ends the sentence
        seg = seg + torch.where(final, log_trans[:, K], 0.0)
        return log_init[:K], log_trans[:, :K], seg, n, log_init

    def log_marginal(self, batch: Batch) -> torch.Tensor:
        """Exact log p(w_1..w_n, </s>) (B,) by the semi-Markov forward algorithm."""
        init, trans, seg, n, log_init = self.potentials(batch)
        ll = semimarkov_log_partition(init, trans, seg, n)
        return torch.where(n > 0, ll, log_init[-1])  # an empty sentence is STOP at once

    @torch.no_grad()
    def segment(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Viterbi segmentation: states (B, N) and durations (B, N) (a segment's length at its
        first word, 0 elsewhere); -1 / 0 past the sentence."""
        init, trans, seg, n, _ = self.potentials(batch)
        states, durations, _ = semimarkov_viterbi(init, trans, seg, n)
        return states, durations

    @torch.no_grad()
    def tag(self, batch: Batch) -> torch.Tensor:
        """The Viterbi segment state of every word (B, N), -1 after the sentence's end."""
        return self.segment(batch)[0]
