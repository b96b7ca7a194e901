"""L2: closed-form EM for the naive-Bayes mixture (M1), with deterministic annealing.

One iteration, with counts X (N, V), responsibilities R (N, K):

    E:  J = X @ log(pi)^T + log(mu)            (N, K)  one sparse-dense matmul
        R = softmax(beta * J)                  beta = 1 is textbook EM
    M:  W = X^T @ R                            (V, K)  one sparse-dense matmul (X^T kept as CSR)
        pi_k = (W_k + alpha) / (sum_v W_vk + V alpha)
        mu   = (sum_n R_n + alpha_mu) / (N + K alpha_mu)

With ``alpha > 0`` this is MAP-EM under a symmetric Dirichlet(1 + alpha) prior; what never
decreases is then the *penalized* objective log p(X) + log p(theta), reported as
``objective`` next to the plain ``log_likelihood``.

Deterministic annealing (Ueda & Nakano 1998; Rose 1998) runs the same iteration with
beta < 1, i.e. it maximizes the tempered free energy

    F_beta(theta) = (1/beta) sum_n logsumexp_k(beta J_nk) + log p(theta),

which each iteration at a fixed beta never decreases. beta rises geometrically from
``beta_start`` (documents of hundreds of tokens have log-likelihood gaps of hundreds of
nats between clusters; beta ~ 0.002 makes responsibilities soft) to 1, where the
objective is the true (penalized) log-likelihood. Clusters split as beta crosses critical
values, instead of being decided by the random start, which is why it beats plain EM.

Length-aware annealing (``length_power = g < 1``): one global beta makes a 2,000-token
post's posterior hard long before a 20-token one's, so the long documents decide the early
splits. Document n is instead tempered at beta_n = min(1, beta * L_n^(g - 1)) — at
beta <= 1 exactly the fixed-temperature DA of a model whose documents are rescaled to
L_n^g tokens — and beta keeps rising until every beta_n = 1. The last phase is plain EM
on the unchanged M1, so this changes only the path, not the model or its likelihood.

Restarts are chosen by the final training objective only, never by labels.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass

import torch

from latentlm.data.documents import BagOfWords, BowBatch
from latentlm.models.nb_mixture import NaiveBayesMixture


@dataclass
class EMConfig:
    """Settings of :func:`fit_em`; the defaults are textbook EM from random responsibilities."""

    max_iters: int = 500          # iterations of the final beta = 1 phase
    tol: float = 1e-6             # stop when the objective improves by < tol nats per token
    smoothing: float = 0.0        # alpha: pseudo-count added to every word of every cluster
    mixture_smoothing: float = 0.0  # pseudo-count added to every cluster's size
    anneal: bool = False
    beta_start: float = 0.002
    beta_growth: float = 1.1      # beta <- beta * growth between annealing steps
    iters_per_beta: int = 10      # at most this many iterations at each beta < 1
    perturbation: float = 0.0     # std of log-normal noise on pi at each annealing step
    length_power: float = 1.0     # g: document n is annealed at min(1, beta * L_n^(g-1)); 1 = plain DA
    restarts: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.smoothing < 0 or self.mixture_smoothing < 0:
            raise ValueError(f"smoothing must be >= 0, got {self.smoothing}, {self.mixture_smoothing}")
        if not 0 < self.beta_start <= 1:
            raise ValueError(f"beta_start must be in (0, 1], got {self.beta_start}")
        if self.anneal and self.beta_growth <= 1:
            raise ValueError(f"beta_growth must be > 1 to reach beta = 1, got {self.beta_growth}")
        if not 0 <= self.length_power <= 1:
            raise ValueError(f"length_power must be in [0, 1], got {self.length_power}")
        if self.restarts < 1 or self.max_iters < 0 or self.iters_per_beta < 1:
            raise ValueError("restarts and iters_per_beta must be >= 1 and max_iters >= 0")


@dataclass
class EMStep:
    phase: int             # annealing step (0, 1, ...); the last phase is plain EM (all beta_n = 1)
    beta: float            # the global beta of the phase (1.0 in the last phase)
    log_likelihood: float  # log p(X | theta) in nats, at the parameters *before* this M-step
    objective: float       # tempered, penalized objective F_beta at those parameters


@dataclass
class EMResult:
    log_likelihood: float            # final training log p(X), nats
    objective: float                 # final penalized objective (= log_likelihood when alpha = 0)
    history: list[EMStep]            # of the chosen restart
    restart_objectives: list[float]  # final objective of every restart
    best_restart: int
    iterations: int                  # of the chosen restart
    seconds: float = 0.0             # all restarts


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
    """Responsibilities (N, K), log p(X) and F_beta's data term sum_n (1/beta_n) logsumexp(beta_n J_n).

    ``beta`` is one float or per-document temperatures (N,).
    """
    per_doc = isinstance(beta, torch.Tensor)
    if per_doc and bool((beta == 1).all()):
        beta, per_doc = 1.0, False
    log_words_t = params.log_words_t
    if not data.sparse:  # dense 0 * -inf would be nan; see counts_matmul
        log_words_t = log_words_t.clamp_min(torch.finfo(log_words_t.dtype).min)
    joint = data.counts @ log_words_t + params.log_mix  # (N, K)
    log_likelihood = None
    if per_doc or beta != 1.0:
        log_likelihood = float(torch.logsumexp(joint, dim=-1).sum(dtype=torch.float64))
        joint.mul_(beta.to(joint.dtype).unsqueeze(-1) if per_doc else beta)
    # softmax and logsumexp from one exp pass: resp = exp(J - m) / s, log-normalizer m + log s
    top = joint.amax(dim=-1, keepdim=True)              # (N, 1)
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))  # all -inf rows: no nan
    joint.sub_(top)
    # Responsibilities below ~K * tiny become exact zeros: subnormal floats would make the
    # exp and the M-step's sparse product several times slower, for a change < 1e-36.
    floor = math.log(torch.finfo(joint.dtype).tiny) + math.log(joint.size(-1)) + 1.0
    resp = joint.masked_fill_(joint < floor, -math.inf).exp_()  # (N, K) unnormalized
    total = resp.sum(dim=-1, keepdim=True)              # (N, 1)
    log_norm = (top + total.log()).squeeze(-1).to(torch.float64)  # (N,)
    resp.div_(total)
    tempered = float((log_norm / beta).sum()) if per_doc else float(log_norm.sum()) / beta
    if log_likelihood is None:
        log_likelihood = tempered
    return resp, log_likelihood, tempered


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


def _random_start(num_clusters: int, data: EMData, config: EMConfig, generator: torch.Generator) -> MixtureParams:
    """M-step from Dirichlet(1) random responsibilities: the textbook EM initialization."""
    gamma = torch.empty(data.num_docs, num_clusters, dtype=torch.float64).exponential_(generator=generator)
    device = data.counts.device  # gamma comes from the (CPU) generator, the rest lives with the data
    resp = (gamma / gamma.sum(-1, keepdim=True)).to(data.dtype).to(device)  # (N, K)
    placeholder = MixtureParams(torch.zeros(num_clusters, dtype=data.dtype, device=device),
                                torch.zeros(data.vocab_size, num_clusters, dtype=data.dtype, device=device))
    return _m_step(placeholder, data, resp, config.smoothing, config.mixture_smoothing)


def _perturb(params: MixtureParams, scale: float, generator: torch.Generator) -> MixtureParams:
    """Jitter every cluster's word distribution (log pi += scale * noise, renormalized).

    At small beta the symmetric solution (all clusters equal) is a stable fixed point, so
    clusters that drifted together stay together; the jitter lets them split as soon as
    beta passes the critical value where splitting raises F_beta (Rose 1998).
    """
    log_words_t = params.log_words_t
    noise = torch.randn(log_words_t.shape, generator=generator, dtype=torch.float64).to(log_words_t)
    return MixtureParams(params.log_mix, torch.log_softmax(log_words_t + scale * noise, dim=0))  # (V, K)


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


def document_betas(data: EMData, beta: float, length_power: float) -> float | torch.Tensor:
    """beta_n = min(1, beta * L_n^(g-1)) per document (N,), or ``beta`` itself when g = 1."""
    if length_power == 1.0:
        return beta
    scale = data.lengths.clamp_min(1.0) ** (length_power - 1.0)  # (N,)
    return (beta * scale).clamp_max(1.0)


def _run_phase(
    params: MixtureParams, data: EMData, config: EMConfig, phase: int, beta: float, max_iters: int,
    history: list[EMStep], final: bool = False,
) -> MixtureParams:
    """EM at a fixed beta until the objective gains < tol nats/token, or max_iters.

    The ``final`` phase is plain EM (every beta_n = 1) whatever ``beta`` says.
    """
    previous = -math.inf
    betas = 1.0 if final else document_betas(data, beta, config.length_power)
    for _ in range(max_iters):
        resp, log_lik, tempered = _e_step(params, data, betas)
        objective = tempered + params.log_prior(config.smoothing, config.mixture_smoothing)
        history.append(EMStep(phase, beta, log_lik, objective))
        if objective - previous < config.tol * max(data.num_tokens, 1.0):
            break
        previous = objective
        params = _m_step(params, data, resp, config.smoothing, config.mixture_smoothing)
    return params


def beta_schedule(config: EMConfig, max_length: float = 1.0) -> list[float]:
    """The annealing steps: beta_start, beta_start * growth, ..., while some document's beta_n < 1.

    With ``length_power = 1`` that is while beta < 1; otherwise while beta < max_length^(1-g),
    ``max_length`` being the longest document's token count.
    """
    end = max(max_length, 1.0) ** (1.0 - config.length_power)
    betas, beta = [], config.beta_start
    while beta < end:
        betas.append(beta)
        beta *= config.beta_growth
    return betas


def fit_em(model: NaiveBayesMixture, data: BagOfWords | BowBatch | EMData, config: EMConfig | None = None) -> EMResult:
    """Fit ``model`` by (annealed) EM with restarts; the best restart's parameters are kept.

    Every restart starts from random responsibilities drawn from ``config.seed + 1000 * restart``.
    The chosen restart is the one with the highest final training objective. EM runs in
    the model's dtype (use ``model.double()`` for exact monotonicity checks).
    """
    config = config or EMConfig()
    if not isinstance(data, EMData):
        data = EMData(data, dtype=model.word_logits.dtype)
    if data.vocab_size != model.vocab_size:
        raise ValueError(f"data has {data.vocab_size} words but the model {model.vocab_size}")
    start = time.perf_counter()
    best: tuple[float, int, MixtureParams, list[EMStep]] | None = None
    finals: list[float] = []
    with torch.no_grad():
        for restart in range(config.restarts):
            generator = torch.Generator().manual_seed(config.seed + 1000 * restart)
            params = _random_start(model.num_clusters, data, config, generator)
            history: list[EMStep] = []
            schedule = beta_schedule(config, float(data.lengths.max())) if config.anneal else []
            for phase, beta in enumerate(schedule):
                if config.perturbation > 0:
                    params = _perturb(params, config.perturbation, generator)
                params = _run_phase(params, data, config, phase, beta, config.iters_per_beta, history)
            params = _run_phase(params, data, config, len(schedule), 1.0, config.max_iters, history, final=True)
            _, log_lik, _ = _e_step(params, data, 1.0)
            final = log_lik + params.log_prior(config.smoothing, config.mixture_smoothing)
            finals.append(final)
            if best is None or final > best[0]:
                best = (final, restart, params, history)
        assert best is not None
        best[2].write_to(model)
        _, log_lik, _ = _e_step(best[2], data, 1.0)
    objective = log_lik + best[2].log_prior(config.smoothing, config.mixture_smoothing)
    return EMResult(
        log_likelihood=log_lik, objective=objective, history=best[3], restart_objectives=finals,
        best_restart=best[1], iterations=len(best[3]), seconds=time.perf_counter() - start,
    )
