"""EM and generalized EM as learners of the one training loop (``train.learner: em | gem``).

An epoch is one EM iteration. :meth:`EMLearner.step` runs the exact E-step of a batch
(``model.expected_counts``, a declared capability: :class:`~latentlm.models.base.ExpectedCounts`)
and adds its expected counts to the epoch's; :meth:`EMLearner.end_epoch` runs the M-step:
closed form (:class:`~latentlm.models.base.ClosedFormEM`: M1, M5) or, for generalized EM,
``m_steps`` optimizer steps on the expected complete log-likelihood Q
(:class:`~latentlm.models.base.GeneralizedEM`: M5, M6). Parameters change only at epoch ends,
so the E-step of an epoch sees one parameter set whatever the batching.

Options (``train.em``): ``init`` (``random``: the model's random start, e.g. M1's Dirichlet(1)
random responsibilities, as one extra pass before the first epoch; ``model``: the parameters as
initialized), ``tol`` (stop once the objective gains < tol nats per token in the final phase),
``anneal`` (below), ``m_steps`` (gem), and the model's M-step prior, passed through:
``smoothing`` / ``mixture_smoothing`` (M1), ``smoothing`` / ``emit_smoothing`` (M5). With
pseudo-counts this is MAP-EM; what never decreases is then log p(X) + log p(theta), logged as
``loss`` (its negative, per example) of the ``e_step`` rows of metrics.csv, next to ``nll``.

Deterministic annealing (Ueda & Nakano 1998; Rose 1998), ``anneal: {beta_start, beta_growth,
iters_per_beta, perturbation, length_power}``: the E-step uses responsibilities ∝ p(x, z)^beta,
i.e. EM on the tempered free energy

    F_beta(theta) = (1/beta) sum_n logsumexp_k(beta J_nk) + log p(theta),

which each iteration at a fixed beta never decreases. beta rises geometrically from
``beta_start`` (documents of hundreds of tokens have log-likelihood gaps of hundreds of nats
between clusters; beta ~ 0.002 makes responsibilities soft) to 1, at most ``iters_per_beta``
epochs per value (fewer when F_beta gains < tol per token); ``perturbation`` jitters the
parameters at the start of each value. Clusters split as beta crosses critical values instead
of being decided by the random start. ``length_power = g < 1`` tempers document n at
beta_n = min(1, beta * L_n^(g - 1)), so long documents do not decide the early splits, and
beta rises until every beta_n = 1. The last phase is plain EM on the unchanged model.

The full-data kernels below (:class:`EMData`, :func:`em_iteration`) are what
``benchmarks/bench_nb_em.py`` times against a numpy EM; training does not use them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from latentlm.device import module_device

from latentlm.data.documents import BagOfWords, BowBatch
from latentlm.errors import ConfigError
from latentlm.inference.base import Learner, ObjectiveOutput
from latentlm.models.base import ClosedFormEM, GeneralizedEM
from latentlm.models.nb_mixture import NaiveBayesMixture, responsibilities
from latentlm.nn.gradients import clip_gradients


class EMData:
    """Counts prepared once for many EM iterations: X (N, V) and X^T (V, N), both CSR."""

    def __init__(self, data: BagOfWords | BowBatch, dtype: torch.dtype = torch.float32):
        batch = data.batch(dtype=dtype) if isinstance(data, BagOfWords) else data
        counts = batch.counts.to(dtype)
        self.counts = counts  # (N, V)
        self.sparse = batch.is_sparse
        if self.sparse:
            # X^T as its own CSR: the M-step is then a CSR @ dense product like the E-step,
            # which MKL runs far faster than a transposed (CSC) product.
            self.counts_t = counts.to_sparse_coo().t().coalesce().to_sparse_csr()  # (V, N)
        else:
            self.counts_t = counts.t().contiguous()
        self.num_docs, self.vocab_size = counts.shape
        self.dtype = dtype
        ones = torch.ones(self.vocab_size, 1, dtype=dtype, device=counts.device)
        self.lengths = (counts @ ones).squeeze(1).to(torch.float64)  # (N,) row sums (may be fractional)
        self.num_tokens = float(self.lengths.sum())


@dataclass
class MixtureParams:
    """M1's parameters as EM keeps them between iterations.

    Word log-probabilities are stored transposed, (V, K) and contiguous, because that is
    what both products want: the E-step's X @ log(pi)^T reads it as is and the M-step's
    X^T @ R produces it, so an iteration does no transposes and no re-normalization.
    """

    log_mix: torch.Tensor      # (K,)
    log_words_t: torch.Tensor  # (V, K), each column sums to 1 in probability

    @classmethod
    def from_model(cls, model: NaiveBayesMixture, dtype: torch.dtype) -> "MixtureParams":
        return cls(model.log_mixture().detach().to(dtype), model.log_word_probs().detach().t().to(dtype).contiguous())

    def write_to(self, model: NaiveBayesMixture) -> None:
        dtype = model.word_logits.dtype
        model.set_log_probs(self.log_mix.to(dtype), self.log_words_t.t().to(dtype))

    def log_prior(self, smoothing: float, mixture_smoothing: float) -> float:
        """log p(theta) up to a constant under the Dirichlet(1 + alpha) priors."""
        total = 0.0
        if smoothing > 0:
            total += smoothing * float(self.log_words_t.sum(dtype=torch.float64))
        if mixture_smoothing > 0:
            total += mixture_smoothing * float(self.log_mix.sum(dtype=torch.float64))
        return total


@torch.no_grad()
def log_prior(model: NaiveBayesMixture, smoothing: float, mixture_smoothing: float) -> float:
    """log p(theta) up to a constant under the Dirichlet(1 + alpha) priors."""
    return MixtureParams.from_model(model, torch.float64).log_prior(smoothing, mixture_smoothing)


def _e_step(params: MixtureParams, data: EMData, beta: float | torch.Tensor) -> tuple[torch.Tensor, float, float]:
    """Responsibilities (N, K), log p(X) and F_beta's data term sum_n (1/beta_n) logsumexp(beta_n J_n)."""
    log_words_t = params.log_words_t
    if not data.sparse:  # dense 0 * -inf would be nan; see counts_matmul
        log_words_t = log_words_t.clamp_min(torch.finfo(log_words_t.dtype).min)
    resp, log_lik, tempered = responsibilities(data.counts @ log_words_t + params.log_mix, beta)  # (N, K)
    return resp, float(log_lik.sum()), float(tempered.sum())


def _m_step(
    params: MixtureParams, data: EMData, resp: torch.Tensor, smoothing: float, mixture_smoothing: float
) -> MixtureParams:
    resp = resp.to(data.dtype)
    expected = data.counts_t @ resp                      # (V, K) expected word counts
    totals = expected.sum(0) + smoothing * data.vocab_size  # (K,)
    if smoothing > 0:
        expected.add_(smoothing)
    log_words_t = expected.log_().sub_(totals.log())
    # A cluster that lost every token (possible without smoothing) has no MLE: keep its old
    # words; its weight mu_k = 0 makes it irrelevant to the likelihood.
    empty = totals <= 0
    if bool(empty.any()):
        log_words_t = torch.where(empty, params.log_words_t, log_words_t)
    num_clusters = resp.size(1)
    log_mix = torch.log(resp.sum(0) + mixture_smoothing) - math.log(data.num_docs + mixture_smoothing * num_clusters)
    return MixtureParams(log_mix, log_words_t)


@torch.no_grad()
def e_step(model: NaiveBayesMixture, data: EMData, beta: float = 1.0) -> tuple[torch.Tensor, float, float]:
    """Responsibilities (N, K) ∝ p(x, z)^beta, the log-likelihood and (1/beta) sum logsumexp(beta J)."""
    return _e_step(MixtureParams.from_model(model, data.dtype), data, beta)


@torch.no_grad()
def m_step(
    model: NaiveBayesMixture, data: EMData, resp: torch.Tensor, smoothing: float = 0.0,
    mixture_smoothing: float = 0.0,
) -> None:
    """Closed-form (MAP) parameters from responsibilities ``resp`` (N, K), written into ``model``."""
    params = MixtureParams.from_model(model, data.dtype)
    _m_step(params, data, resp, smoothing, mixture_smoothing).write_to(model)


@torch.no_grad()
def em_iteration(
    params: MixtureParams, data: EMData, beta: float = 1.0, smoothing: float = 0.0, mixture_smoothing: float = 0.0
) -> tuple[MixtureParams, float, float]:
    """One E and one M step: (new params, log p(X) at ``params``, F_beta at ``params``).

    The hot loop of :func:`fit_em` (and what ``benchmarks/bench_nb_em.py`` times): two
    sparse-dense products, one logsumexp over (N, K), one log over (V, K).
    """
    resp, log_lik, tempered = _e_step(params, data, beta)
    objective = tempered + params.log_prior(smoothing, mixture_smoothing)
    return _m_step(params, data, resp, smoothing, mixture_smoothing), log_lik, objective


def document_betas(lengths: torch.Tensor, beta: float, length_power: float) -> float | torch.Tensor:
    """beta_n = min(1, beta * L_n^(g-1)) per document (N,) of ``lengths`` (N,), or ``beta`` when g = 1."""
    if length_power == 1.0:
        return beta
    scale = lengths.to(torch.float64).clamp_min(1.0) ** (length_power - 1.0)  # (N,)
    return (beta * scale).clamp_max(1.0)


@dataclass
class Annealing:
    """Deterministic annealing's schedule (see the module docstring)."""

    beta_start: float = 0.002
    beta_growth: float = 1.1      # beta <- beta * growth between phases
    iters_per_beta: int = 10      # at most this many epochs at each beta < 1
    perturbation: float = 0.0     # std of the noise on log pi at the start of each phase
    length_power: float = 1.0     # g: document n is annealed at min(1, beta * L_n^(g-1)); 1 = plain DA

    def __post_init__(self) -> None:
        if not 0 < self.beta_start <= 1:
            raise ConfigError(f"train.em.anneal.beta_start must be in (0, 1], got {self.beta_start}")
        if self.beta_growth <= 1:
            raise ConfigError(f"train.em.anneal.beta_growth must be > 1 to reach beta = 1, got {self.beta_growth}")
        if not 0 <= self.length_power <= 1:
            raise ConfigError(f"train.em.anneal.length_power must be in [0, 1], got {self.length_power}")
        if self.iters_per_beta < 1 or self.perturbation < 0:
            raise ConfigError("train.em.anneal: iters_per_beta must be >= 1 and perturbation >= 0")

    def schedule(self, max_length: float = 1.0) -> list[float]:
        """beta_start, beta_start * growth, ... while some document's beta_n < 1 (with
        ``length_power = 1``: while beta < 1; else while beta < max_length^(1-g))."""
        end = max(max_length, 1.0) ** (1.0 - self.length_power)
        betas, beta = [], self.beta_start
        while beta < end:
            betas.append(beta)
            beta *= self.beta_growth
        return betas


def beta_schedule(anneal: Annealing, max_length: float = 1.0) -> list[float]:
    return anneal.schedule(max_length)


_OPTIONS = {"init", "tol", "anneal", "m_steps"}


class EMLearner(Learner):
    """Closed-form EM: E-step counts summed over the epoch, the model's M-step at its end."""

    updates_every_step = False
    uses_optimizer = False
    capability: type = ClosedFormEM

    def __init__(self, system, optimizer=None, options: dict[str, Any] | None = None, seed: int = 0,
                 clip: float = 0.0):
        options = dict(options or {})
        if torch.distributed.is_available() and torch.distributed.is_initialized() \
                and torch.distributed.get_world_size() > 1:
            raise ConfigError(f"train.learner {self.name!r} runs in one process (its expected counts are not "
                              f"all-reduced across ranks); launch it without torchrun")
        self.system, self.model, self.optimizer, self.clip = system, system.model, optimizer, clip
        if not isinstance(self.model, self.capability):
            raise ConfigError(
                f"train.learner {self.name!r} needs a model with the {self.capability.__name__} capability; "
                f"{type(self.model).__name__} has not (use train.learner: gradient)")
        self.init = options.pop("init", "random")
        if self.init not in ("random", "model"):
            raise ConfigError(f"train.em.init must be 'random' or 'model', got {self.init!r}")
        tol = options.pop("tol", None)
        self.tol = None if tol is None else float(tol)
        anneal = options.pop("anneal", None)
        self.anneal = Annealing(**anneal) if anneal else None
        if self.anneal is not None and not self.model.supports_annealing:
            raise ConfigError(f"{type(self.model).__name__} has no annealed E-step; remove train.em.anneal")
        self.m_steps = int(options.pop("m_steps", 10))
        self.prior = options  # the rest: the model's M-step pseudo-counts
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        # position on the annealing path (JSON state, checkpointed)
        self.phase, self.iters_in_phase, self.previous, self.max_length = 0, 0, -math.inf, 1.0
        self._reset()

    name = "em"

    def _reset(self) -> None:
        self.counts: dict[str, torch.Tensor] | None = None
        self.log_likelihood = self.objective = 0.0
        self.examples = self.tokens = 0

    def _add(self, counts: dict[str, torch.Tensor]) -> None:
        if self.counts is None:
            self.counts = {k: v.detach().clone() for k, v in counts.items()}
        else:
            for k, v in counts.items():
                self.counts[k] += v.detach()

    @property
    def betas(self) -> list[float]:
        return self.anneal.schedule(self.max_length) if self.anneal is not None else []

    @property
    def beta(self) -> float:
        betas = self.betas
        return betas[self.phase] if self.phase < len(betas) else 1.0

    def _temperature(self, batch) -> float | torch.Tensor:
        if self.anneal is None or self.phase >= len(self.betas):
            return 1.0
        return document_betas(batch.lengths, self.beta, self.anneal.length_power)

    # -- the Learner interface ------------------------------------------------------
    def start(self, dataset, batch_size: int) -> None:
        device = module_device(self.model)
        if self.anneal is not None:
            self.max_length = float(max(int(dataset.make_batch(idx).lengths.max())
                                        for idx in dataset.batch_indices(batch_size)))
        if self.init == "random" and isinstance(self.model, ClosedFormEM):
            for idx in dataset.batch_indices(batch_size):
                counts = self.model.initial_counts(dataset.make_batch(idx).to(device), self.generator)
                if counts is None:  # the model starts from its initialized parameters
                    break
                self._add(counts)
            if self.counts is not None:
                self.model.m_step(self.counts, **self.prior)
            self._reset()
        if self.anneal is not None and self.anneal.perturbation > 0 and self.betas:
            self.model.perturb(self.anneal.perturbation, self.generator)

    def step(self, batch, step: int, sample_batch=None) -> ObjectiveOutput:
        was_training = self.model.training
        self.model.eval()  # the E-step sees the deterministic tables (dropout off)
        e = self.model.expected_counts(batch, self._temperature(batch))
        self.model.train(was_training)
        self._add(e.counts)
        ll = e.log_likelihood.detach()
        self.log_likelihood += float(ll.sum(dtype=torch.float64))
        self.objective += float(e.objective.sum(dtype=torch.float64))
        self.examples += batch.size
        self.tokens += batch.num_tokens
        return ObjectiveOutput(loss=-ll.sum() / max(1, batch.num_tokens), bound=ll, log_marginal=ll,
                               tokens=batch.lengths)

    def m_step(self) -> None:
        self.model.m_step(self.counts, **self.prior)

    def end_epoch(self, epoch: int) -> dict[str, Any]:
        if self.counts is None:
            return {}
        beta = self.beta
        objective = self.objective + self.model.log_prior(**self.prior)
        n = max(1, self.examples)
        row: dict[str, Any] = {"split": "e_step", "nll": -self.log_likelihood / n, "loss": -objective / n,
                               "beta": beta}
        self.m_step()
        tokens = max(1, self.tokens)
        gained_little = self.tol is not None and objective - self.previous < self.tol * tokens
        self.previous = objective
        self.iters_in_phase += 1
        if self.phase < len(self.betas):
            if gained_little or self.iters_in_phase >= self.anneal.iters_per_beta:
                self.phase, self.iters_in_phase, self.previous = self.phase + 1, 0, -math.inf
                if self.anneal.perturbation > 0 and self.phase < len(self.betas):
                    self.model.perturb(self.anneal.perturbation, self.generator)
        elif gained_little:
            row["stop"] = f"converged (objective gained < train.em.tol = {self.tol} nats/token)"
        self._reset()
        return row

    def state_dict(self) -> dict[str, Any]:
        return {"phase": self.phase, "iters_in_phase": self.iters_in_phase, "previous": self.previous,
                "max_length": self.max_length, "generator": self.generator.get_state().tolist()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            return
        self.phase, self.iters_in_phase = int(state["phase"]), int(state["iters_in_phase"])
        self.previous, self.max_length = float(state["previous"]), float(state["max_length"])
        self.generator.set_state(torch.tensor(state["generator"], dtype=torch.uint8))
        self._reset()


class GEMLearner(EMLearner):
    """Generalized EM: the same E-step; the M-step is ``m_steps`` steps of the run's optimizer
    (``train.optimizer``, ``train.lr``, ``train.clip``) on -Q(theta) / tokens."""

    capability = GeneralizedEM
    uses_optimizer = True
    name = "gem"

    def m_step(self) -> None:
        if self.optimizer is None:
            raise ConfigError("train.learner gem needs an optimizer")
        params = [p for p in self.model.parameters() if p.requires_grad]
        tokens = max(1, self.tokens)
        for _ in range(self.m_steps):
            loss = -self.model.expected_complete_log_likelihood(self.counts) / tokens
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.clip:
                clip_gradients(params, self.clip)
            self.optimizer.step()
