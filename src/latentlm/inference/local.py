"""The ELBO for per-position discrete latents (a :class:`~latentlm.models.base.LocalLatentModel`:
attention as a latent alignment), with q(z | x, y) = prod_t q(z_t):

    log p(y | x) >= sum_t E_q(z_t)[log p(y_t | x, y_<t, z_t)] - KL(q(z_t) || p(z_t | x, y_<t)).

The KL is exact (two categoricals per position). The expectation is estimated per position —
each z_t's learning signal is its own token's log-likelihood, since the decoder state does not
depend on any z — by one of (``estimator``):

- ``enumerate``: the exact sum over s (S output distributions per token, one fused product);
- ``score_function``: ``samples`` draws per position, REINFORCE with a baseline
  (``baseline: soft`` — the log-likelihood of the q-weighted soft alignment, as Deng et al.
  (2018); ``moving_average``; ``none``), plus the pathwise gradient of the sampled terms;
- ``gumbel`` / ``straight_through``: a Gumbel-softmax relaxed alignment at temperature tau
  (annealed like :class:`~latentlm.inference.estimators.GumbelSoftmax`); the reported value
  is at the hard (Gumbel-max, exact) sample.

``q: posterior`` takes q from the inference network (variational attention); ``q: prior``
sets q = p (hard attention: the bound is E_p log p(y | z), KL 0, REINFORCE through the
prior's own parameters). As everywhere, ``bound`` is the true bound and the surrogate's value
equals it, so the loss is exactly -bound.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.distributions import Categorical, RelaxedOneHotCategorical, kl_divergence

from latentlm.data.parallel import PairBatch
from latentlm.errors import ConfigError
from latentlm.inference.base import Objective, ObjectiveOutput, Posterior
from latentlm.inference.estimators import zero_valued
from latentlm.models.alignment import MASKED, bilstm_encode
from latentlm.models.base import LocalLatentModel, LocalTerms
from latentlm.nn.dropout import Dropout

LOCAL_ESTIMATORS = ("enumerate", "score_function", "gumbel", "straight_through")
LOCAL_BASELINES = ("soft", "moving_average", "none")


class LocalELBO(Objective):
    def __init__(self, q: str = "posterior", estimator: str = "enumerate", samples: int = 1, baseline: str = "soft",
                 decay: float = 0.99, temperature: float = 1.0, min_temperature: float = 0.1,
                 anneal_rate: float = 0.0):
        super().__init__()
        if q not in ("posterior", "prior"):
            raise ConfigError(f"objective.q must be 'posterior' (an inference network) or 'prior' (hard attention), "
                              f"got {q!r}")
        if estimator not in LOCAL_ESTIMATORS:
            raise ConfigError(f"local_elbo estimator {estimator!r} unknown; choose one of {LOCAL_ESTIMATORS}")
        if baseline not in LOCAL_BASELINES:
            raise ConfigError(f"local_elbo baseline {baseline!r} unknown; choose one of {LOCAL_BASELINES}")
        if samples < 1:
            raise ConfigError(f"objective.samples must be >= 1, got {samples}")
        self.q, self.estimator, self.samples, self.baseline, self.decay = q, estimator, samples, baseline, decay
        self.temperature, self.min_temperature, self.anneal_rate = temperature, min_temperature, anneal_rate
        self.needs_posterior = q == "posterior"
        self.register_buffer("average", torch.zeros(()))
        self.register_buffer("initialized", torch.zeros((), dtype=torch.bool))

    def check(self, model, posterior) -> None:
        if not isinstance(model, LocalLatentModel) or model.latent != "local":
            raise ConfigError(f"local_elbo needs a model with a latent per target position (attention_translator "
                              f"with attention: latent); {type(model).__name__} "
                              + ("has attention: soft (train it with objective: exact)"
                                 if isinstance(model, LocalLatentModel) else "is not one"))

    def tau(self, step: int) -> float:
        return max(self.min_temperature, self.temperature * math.exp(-self.anneal_rate * step))

    def distributions(self, model, posterior, batch) -> tuple[LocalTerms, Categorical, Categorical]:
        """(the model's terms, the prior p(z_t | x, y_<t), q(z_t)), batch shape (B, T) each."""
        terms = model.local_terms(batch)
        prior = Categorical(logits=terms.prior_logits)
        q = prior if posterior is None else posterior(batch)
        return terms, prior, q

    def forward(self, model, posterior, batch, step: int = 0) -> ObjectiveOutput:
        terms, prior, q = self.distributions(model, posterior, batch)
        mask = terms.mask.to(terms.prior_logits.dtype)
        kl_t = kl_divergence(q, prior) if posterior is not None else torch.zeros_like(mask)
        if self.estimator == "enumerate":
            value_t = (q.probs * terms.log_likelihood_table()).sum(-1)
            surrogate_t = value_t
        elif self.estimator == "score_function":
            value_t, surrogate_t = self._score_function(terms, q)
        else:
            value_t, surrogate_t = self._relaxed(terms, q, step)
        rec, kl = (value_t * mask).sum(-1), (kl_t * mask).sum(-1)
        surrogate = (surrogate_t * mask).sum(-1) - kl
        return ObjectiveOutput(loss=-surrogate.mean(), bound=rec - kl, reconstruction=rec, kl=kl,
                               tokens=batch.lengths)

    def _score_function(self, terms: LocalTerms, q: Categorical) -> tuple[torch.Tensor, torch.Tensor]:
        S = terms.prior_logits.size(-1)
        z = q.sample((self.samples,))  # (K, B, T)
        log_q = q.log_prob(z)
        f = torch.stack([terms.log_likelihood_at(F.one_hot(z_k, S).to(terms.prior_logits.dtype)) for z_k in z])
        signal = f.detach()
        if self.baseline == "soft":
            with torch.no_grad():
                b = terms.log_likelihood_at(q.probs)[None]
        elif self.baseline == "moving_average":
            b = self.average.clone()
            if self.training:
                with torch.no_grad():
                    mean = (signal * terms.mask).sum() / terms.mask.sum().clamp_min(1) / signal.size(0)
                    self.average.copy_(torch.where(self.initialized, self.decay * self.average
                                                   + (1 - self.decay) * mean, mean))
                    self.initialized.fill_(True)
        else:
            b = torch.zeros((), device=signal.device)
        return f.mean(0), (f + zero_valued((signal - b) * log_q)).mean(0)

    def _relaxed(self, terms: LocalTerms, q: Categorical, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        S = terms.prior_logits.size(-1)
        tau = torch.tensor(self.tau(step), device=q.logits.device)
        soft = RelaxedOneHotCategorical(tau, logits=q.logits).rsample((self.samples,))  # (K, B, T, S)
        hard = F.one_hot(soft.argmax(-1), S).to(soft.dtype)  # Gumbel-max: an exact draw from q
        value = torch.stack([terms.log_likelihood_at(w) for w in hard]).mean(0).detach()
        if not torch.is_grad_enabled():
            return value, value
        relaxed = hard + zero_valued(soft) if self.estimator == "straight_through" else soft
        relaxed_value = torch.stack([terms.log_likelihood_at(w) for w in relaxed]).mean(0)
        return value, value + zero_valued(relaxed_value)

    @torch.no_grad()
    def enumerated(self, model, posterior, batch) -> dict[str, torch.Tensor]:
        """Exact per-example (B,) ``log_marginal``, ``elbo`` and ``kl`` of this q: every sum over
        z_t enumerated, no sampling noise (evaluation)."""
        terms, prior, q = self.distributions(model, posterior, batch)
        table = terms.log_likelihood_table()
        mask = terms.mask.to(table.dtype)
        log_px = terms.log_marginal(table)
        kl = (kl_divergence(q, prior) * mask).sum(-1) if posterior is not None else torch.zeros_like(log_px)
        rec = ((q.probs.float() * table).sum(-1) * mask).sum(-1)
        return {"log_marginal": log_px, "elbo": rec - kl, "kl": kl}


class AlignmentPosterior(Posterior):
    """q(z_t | x, y) for every target position: a BiLSTM over the whole target y (so q sees
    y_t and what follows, unlike the prior) and one over the source x, scored bilinearly,
    softmax over the real source positions. Returns a ``Categorical`` of batch shape (B, T)."""

    def __init__(self, vocab_size: int, source_vocab_size: int | None = None, embed_dim: int = 256,
                 hidden_dim: int = 256, dropout: float = 0.3):
        super().__init__()
        if source_vocab_size is None:
            raise ConfigError("the alignment posterior reads parallel text: set data.format: parallel")
        self.src_embed = nn.Embedding(source_vocab_size, embed_dim, padding_idx=0)
        self.src_lstm = nn.LSTM(embed_dim, hidden_dim // 2, batch_first=True, bidirectional=True)
        self.tgt_embed = nn.Embedding(vocab_size, embed_dim, padding_idx=0)
        self.tgt_lstm = nn.LSTM(embed_dim, hidden_dim // 2, batch_first=True, bidirectional=True)
        self.score = nn.Linear(hidden_dim, hidden_dim, bias=False)
        self.drop = Dropout(dropout)

    def forward(self, batch: PairBatch) -> Categorical:
        src = bilstm_encode(self.src_embed, self.src_lstm, self.drop, batch.source, batch.source_lengths)
        tgt = bilstm_encode(self.tgt_embed, self.tgt_lstm, self.drop, batch.targets,
                            batch.lengths.clamp_min(1))  # reads y_1 .. y_T </s>
        scores = torch.bmm(self.drop(tgt), self.score(self.drop(src)).transpose(1, 2)).float()  # (B, T, S)
        return Categorical(logits=scores.masked_fill(~batch.source_mask[:, None, :], MASKED))
