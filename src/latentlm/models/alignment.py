"""M11: an encoder-decoder whose attention is a latent alignment (Deng et al. 2018).

Encoder: a BiLSTM over the source x (``w_1 .. w_S </s>``), e_s. Decoder: an LSTM over the
target prefix y_<t, h_t (initial state from the mean encoding; no input feeding, so h_t does
not depend on any alignment). Alignment z_t in {1..S}:

    p(z_t = s | x, y_<t) = softmax_s(h_t . W_a e_s)                     (the attention scores)
    p(y_t | x, y_<t, z_t = s) = softmax(W_h h_t + W_e e_s + b)          (linear in [h_t; e_s])

``attention: latent`` is that latent-variable model: log p(y | x) = sum_t log sum_s
p(z_t = s) p(y_t | z_t = s) exactly, S output distributions per target token computed as one
(T x V) @ (V x S) product (:mod:`latentlm.nn.factored_output`), never a (B, T, S, V) tensor.
``attention: soft`` is the deterministic baseline on the same networks: the output reads the
expected encoding, softmax(W_h h_t + W_e sum_s p(z_t = s) e_s + b), and has no latent.

Learning is the objective's choice: ``exact`` (soft attention's likelihood, or the exact
marginal), ``local_elbo`` with q = the prior (hard attention, REINFORCE) or an inference
network (variational attention: enumeration, score function, Gumbel-softmax).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from latentlm.data.parallel import PairBatch
from latentlm.errors import ConfigError
from latentlm.models.base import ConditionalGenerator, LocalLatentModel, LocalTerms
from latentlm.nn.dropout import Dropout
from latentlm.nn.factored_output import exp_shifted, mixture_log_probs, pairwise_target_log_probs

MASKED = -1e9  # the log-weight of a padded source position (exp() is exactly 0, no inf arithmetic)


def bilstm_encode(embed: nn.Embedding, lstm: nn.LSTM, drop: nn.Module, tokens: torch.Tensor,
                  lengths: torch.Tensor) -> torch.Tensor:
    """(B, L, 2H) states of a one-layer bidirectional LSTM over padded ``tokens``, zeros at the padding.

    The two directions run as two padded, unpacked LSTM calls (ATen's oneDNN kernel), the
    backward one over each sentence reversed within its length — the states at real positions
    are those of the packed bidirectional LSTM. A PackedSequence takes ATen's step-by-step
    path instead (small products per time step, several hundred ops per batch); the M11 rows'
    tokens/s before and after are in BENCHMARKS.md (``benchmarks/bench_alignment.py``)."""
    x = drop(embed(tokens))
    if lstm.num_layers != 1 or not lstm.bidirectional or not lstm.batch_first:
        packed = pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)
        return pad_packed_sequence(lstm(packed)[0], batch_first=True, total_length=tokens.size(1))[0]
    B, L = tokens.shape
    steps = torch.arange(L, device=tokens.device)
    mask = steps[None] < lengths[:, None]  # (B, L)
    reverse = torch.where(mask, lengths[:, None] - 1 - steps[None], steps[None])  # t <-> len - 1 - t
    H = lstm.hidden_size
    zeros = x.new_zeros(1, B, H)

    def run(inputs, suffix):
        params = [getattr(lstm, f"{n}_l0{suffix}") for n in ("weight_ih", "weight_hh", "bias_ih", "bias_hh")]
        return torch.lstm(inputs, (zeros, zeros), params, True, 1, 0.0, lstm.training, False, True)[0]

    def flip(t):
        return t.gather(1, reverse[..., None].expand(-1, -1, t.size(-1)))

    out = torch.cat([run(x, ""), flip(run(flip(x), "_reverse"))], -1)
    return out * mask[..., None].to(out.dtype)


class AlignmentTerms(LocalTerms):
    """The batch's prior and output: the decoder states h (B, T, H), the encodings e (B, S, H)
    and the two halves of the output layer. a = W_h h + b (B, T, V) is computed once and
    shared by every alignment scored; c = W_e e (B, S, V) only where every source position is
    scored at once (the table). An alignment given as weights w mixes the encodings first,
    W_e (w e): the same logits as a + w c (the layer is linear), at the cost of one output layer."""

    def __init__(self, model: "AttentionTranslator", prior_logits, h, enc, targets, mask, source_mask):
        self.model, self.prior_logits, self.h, self.enc, self.targets = model, prior_logits, h, enc, targets
        self.mask, self.source_mask = mask, source_mask
        self._a: torch.Tensor | None = None

    @property
    def a(self) -> torch.Tensor:
        if self._a is None:
            self._a = self.model.out_state(self.h)
        return self._a

    def log_likelihood_table(self) -> torch.Tensor:
        return pairwise_target_log_probs(self.a, self.model.out_source(self.enc), self.targets)

    def log_likelihood_at(self, weights: torch.Tensor) -> torch.Tensor:
        context = torch.bmm(weights.to(self.enc.dtype), self.enc)  # (B, T, H)
        logits = self.model.output_logits(self.h, context)  # (B, T, V)
        B, T, V = logits.shape
        return -F.cross_entropy(logits.reshape(B * T, V).float(), self.targets.reshape(-1),
                                reduction="none").view(B, T)


@dataclass
class DecodingState:
    """Per source sentence (B of them): keys, output parts and mask, never copied while
    decoding; per hypothesis row (N = B x group, sentence-major): the LSTM state."""

    keys: torch.Tensor         # (B, S, H) W_a e_s
    c: torch.Tensor            # (B, S, V) W_e e_s (soft attention) or exp(W_e e_s - max) (latent)
    source_mask: torch.Tensor  # (B, S)
    hidden: tuple[torch.Tensor, torch.Tensor]  # LSTM (h, c), (1, N, H) each


class AttentionTranslator(LocalLatentModel, ConditionalGenerator):
    """Config: ``{type: attention_translator, attention: soft | latent, embed_dim, hidden_dim,
    dropout}``; ``hidden_dim`` is the decoder's and the encoder's output size (each direction
    of the BiLSTM has half)."""

    default_posterior = "alignment_bilstm"

    def __init__(self, vocab_size: int, source_vocab_size: int | None = None, attention: str = "latent",
                 embed_dim: int = 256, hidden_dim: int = 256, dropout: float = 0.3):
        super().__init__()
        if source_vocab_size is None:
            raise ConfigError("attention_translator reads parallel text: set data.format: parallel")
        if attention not in ("soft", "latent"):
            raise ConfigError(f"model.attention must be 'soft' or 'latent', got {attention!r}")
        if hidden_dim % 2:
            raise ConfigError(f"model.hidden_dim must be even (two encoder directions), got {hidden_dim}")
        self.attention = attention
        self.latent = "local" if attention == "latent" else "none"
        self.vocab_size = vocab_size
        self.src_embed = nn.Embedding(source_vocab_size, embed_dim, padding_idx=0)
        self.encoder = nn.LSTM(embed_dim, hidden_dim // 2, batch_first=True, bidirectional=True)
        self.tgt_embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.bridge = nn.Linear(hidden_dim, 2 * hidden_dim)
        self.decoder = nn.LSTM(embed_dim, hidden_dim, batch_first=True)
        self.key = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.out_state = nn.Linear(hidden_dim, vocab_size)
        self.out_source = nn.Linear(hidden_dim, vocab_size, bias=False)
        self.drop = Dropout(dropout)

    # ---- shared pieces --------------------------------------------------------------------

    def _encode(self, batch: PairBatch):
        """(encodings e after dropout (B, S, H), keys W_a e, source mask, the decoder's initial state)."""
        enc = bilstm_encode(self.src_embed, self.encoder, self.drop, batch.source, batch.source_lengths)
        mask = batch.source_mask
        mean = (enc * mask[..., None]).sum(1) / batch.source_lengths[:, None].to(enc.dtype)
        h0, c0 = torch.tanh(self.bridge(mean)).chunk(2, -1)
        enc = self.drop(enc)
        return enc, self.key(enc), mask, (h0[None].contiguous(), c0[None].contiguous())

    def output_logits(self, h: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """W_h h + W_e context + b as one product over [h; context] (one (2H x V) pass is faster
        than two (H x V) ones and an add)."""
        weight = torch.cat([self.out_state.weight, self.out_source.weight], 1)
        return F.linear(torch.cat([h, context], -1), weight, self.out_state.bias)

    @staticmethod
    def _prior_logits(h: torch.Tensor, keys: torch.Tensor, source_mask: torch.Tensor) -> torch.Tensor:
        scores = torch.bmm(h, keys.transpose(1, 2)).float()  # (B, T, S)
        return scores.masked_fill(~source_mask[:, None, :], MASKED).log_softmax(-1)

    def local_terms(self, batch: PairBatch) -> AlignmentTerms:
        enc, keys, source_mask, hidden = self._encode(batch)
        h, _ = self.decoder(self.drop(self.tgt_embed(batch.inputs)), hidden)
        h = self.drop(h)
        return AlignmentTerms(self, self._prior_logits(h, keys, source_mask), h, enc, batch.targets, batch.mask,
                              source_mask)

    def log_marginal(self, batch: PairBatch) -> torch.Tensor:
        """log p(y | x): exact by enumeration over every z_t (latent), or soft attention's likelihood."""
        if self.attention == "latent":
            return super().log_marginal(batch)
        terms = self.local_terms(batch)
        return (terms.log_likelihood_at(terms.prior_logits.exp()) * terms.mask).sum(-1)

    # ---- decoding -------------------------------------------------------------------------

    def start(self, batch: PairBatch) -> DecodingState:
        enc, keys, source_mask, hidden = self._encode(batch)
        c = self.out_source(enc)
        if self.attention == "latent":
            c = exp_shifted(c)[0]
        return DecodingState(keys, c, source_mask, hidden)

    def step(self, state: DecodingState, previous: torch.Tensor) -> tuple[torch.Tensor, DecodingState]:
        B, N = state.keys.size(0), previous.size(0)
        h, hidden = self.decoder(self.tgt_embed(previous)[:, None, :], state.hidden)  # h (N, 1, H)
        h = h.view(B, N // B, -1)  # the hypotheses of each sentence
        prior = self._prior_logits(h, state.keys, state.source_mask).exp()  # (B, group, S)
        a = self.out_state(h)  # (B, group, V)
        if self.attention == "soft":
            log_probs = (a + torch.bmm(prior.to(state.c.dtype), state.c)).float().log_softmax(-1)
        else:
            log_probs = mixture_log_probs(a, state.c, prior)
        return log_probs.view(N, -1), DecodingState(state.keys, state.c, state.source_mask, hidden)

    def select(self, state: DecodingState, rows: torch.Tensor) -> DecodingState:
        h, c = state.hidden
        return DecodingState(state.keys, state.c, state.source_mask, (h[:, rows], c[:, rows]))

    @torch.no_grad()
    def alignments(self, batch: PairBatch) -> dict[str, torch.Tensor]:
        """Per sentence: the prior p(z_t | x, y_<t) (soft attention's weights) and, for the latent
        model, the exact posterior p(z_t | x, y_<=t) ∝ prior x p(y_t | z_t); (B, T, S) each."""
        terms = self.local_terms(batch)
        out = {"prior": terms.prior_logits.exp()}
        if self.attention == "latent":
            out["posterior"] = (terms.prior_logits.float() + terms.log_likelihood_table()).softmax(-1)
        return out
