"""L3: structured mean field for the factorial HMM (M8), by coordinate ascent or amortized.

q(z | x) = prod_l q_l(z^l), each q_l a chain over its own K states (Ghahramani & Jordan 1997).

**The emission term.** With log p(x_t | z_t) = b_x + sum_l theta_l[z^l_t, x] - log Z(z_t) and
Z(z_t) = sum_v exp(b_v + sum_l theta_l[z^l_t, v]), the linear part has an exact expectation
under q, but E_q log Z(z_t) has no closed form (the normalizer couples the chains). We bound it,
per chain l, by Jensen over the *other* chains only:

    E_q log Z(z_t) <= E_{q_l} log E_{q_-l} Z(z^l_t, z^-l_t) =: sum_k q_l(z^l_t = k) A_lt(k),
    A_lt(k) = log sum_v exp(b_v + theta_l[k, v]) prod_{l' != l} m_l't(v),
    m_lt(v) = sum_k q_l(z^l_t = k) exp(theta_l[k, v]),

(the inner expectation factorizes because q is a product over chains), and average the L
bounds. The result ``emission_bound`` is <= E_q log p(x | z) for every product q, so the
objective F(q) = sum_l -KL(q_l || p_l) + sum_t emission_bound_t is a lower bound on log p(x)
(it is <= the mean-field ELBO, which is <= log p(x)), and it is exact for L = 1 (no other
chain to average over): L = 1 mean field is exact inference. Why this choice: it keeps the
softmax-of-sum emission of the model (the natural LM parameterization) and costs
O(B T L K V) with no sampling; the plain Jensen bound E log Z <= log E Z is looser (never
exact) and sampling E log Z would make the bound noisy and coordinate ascent non-monotone.

**Coordinate ascent.** As a function of chain j's marginals mu_j (B, T, K), emission_bound is
linear (its own bound, and the exact linear part) plus convex (the other chains' bounds are
-mu_l . log(affine in mu_j)). A convex function lies above its tangent, so replacing it by its
tangent at the current q gives a lower bound tight at the current q (a minorize-maximize step);
that bound is linear in mu_j, and the best chain q_j for a linear unary score g_j is exactly
the HMM posterior with emissions g_j — one forward-backward. Hence each chain update
q_j ∝ p_j(z^j) exp(sum_t g_jt(z^j_t)), g_j = d emission_bound / d mu_j, never decreases F
(tests check it), and where the expected log-likelihood is exactly linear in mu_j (L = 1, or
any chain whose partners are deterministic) it is the classical update q_j ∝ exp E_{q_-j} log p(x, z).

**The bound's value** for a q_l with the prior's transitions and unary u_l (coordinate
ascent's family): -KL(q_l || p_l) = log Z_l - <mu_l, u_l>, so F is exact arithmetic, no Monte
Carlo. For an amortized CRF q_l with its own potentials, -KL(q_l || p_l) = H(q_l) +
<mu_l1, log init_l> + sum_t <xi_lt, log trans_l> (edge marginals xi), all by the chain dynamic
programs of :mod:`latentlm.structured` and differentiable in both the model and the network.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.distributions import Distribution

from latentlm.data.batching import Batch
from latentlm.errors import ConfigError
from latentlm.inference.base import Objective, ObjectiveOutput, StructuredPosterior
from latentlm.models.factorial_hmm import FactorialHMM, tokens_of
from latentlm.structured import LinearChainCRF, hmm_log_likelihood, hmm_marginals


# ---- the bound ------------------------------------------------------------------------------


def emission_bound(theta: torch.Tensor, bias: torch.Tensor, x: torch.Tensor, mu: torch.Tensor,
                   lengths: torch.Tensor) -> torch.Tensor:
    """Lower bound on E_q sum_t log p(x_t | z_t) for a product q with marginals ``mu`` (B, T, L, K); (B,).

    ``theta`` (L, K, V), ``bias`` (V,) (-inf on never-emitted ids), ``x`` (B, T) token ids.
    Differentiable in all of them. Memory O(B T L V): the sums over v and k are matrix products
    with per-row maxima taken out, never a (B, T, L, K, V) tensor.
    """
    B, T, L, K = mu.shape
    mask = torch.arange(T, device=x.device)[None, :] < lengths[:, None]  # (B, T)
    mu = torch.where(mask[:, :, None, None], mu, 1.0 / K)  # padding: any distribution, masked below
    theta_x = theta.permute(2, 0, 1)[x]  # (B, T, L, K) theta_l[k, x_t]
    linear = bias[x] + (mu * theta_x).sum((-1, -2))  # (B, T) exact E_q of the un-normalized log score
    # log m_lt(v) = log sum_k mu_ltk exp(theta_lkv)
    c = theta.amax(1)  # (L, V)
    log_m = torch.log(torch.einsum("btlk,lkv->btlv", mu, torch.exp(theta - c[:, None]))) + c  # (B, T, L, V)
    others = log_m.sum(2, keepdim=True) - log_m  # (B, T, L, V) sum over the other chains
    # A_lt(k) = log sum_v exp(b_v + others_ltv) exp(theta_lkv)
    w = bias + others
    d = w.amax(-1, keepdim=True)  # (B, T, L, 1)
    ck = theta.amax(-1, keepdim=True)  # (L, K, 1)
    A = torch.log(torch.einsum("btlv,lkv->btlk", torch.exp(w - d), torch.exp(theta - ck))) + d + ck[..., 0]
    per_t = linear - (mu * A).sum((-1, -2)) / L  # (B, T)
    return torch.where(mask, per_t, 0.0).sum(-1)


def _chain_rows(t: torch.Tensor) -> torch.Tensor:
    """(B, T, L, K) -> (B, L, T, K)."""
    return t.permute(0, 2, 1, 3)


def coordinate_ascent_bound(model: FactorialHMM, batch: Batch, unary: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """F (B,) for the product q whose chain l has the prior's init / transitions and unary
    ``unary[:, :, l]``, with marginals ``mu`` (B, T, L, K), both held fixed: F's value is exact
    and its gradient in the model's parameters is that of the bound at this q."""
    x, n = tokens_of(batch)
    log_init, log_trans = model.chain_log_probs()
    theta, bias = model.emission_parts()
    u, m = unary.detach(), mu.detach()
    neg_kl = 0.0
    for l in range(model.num_chains):  # -KL(q_l || p_l) = log Z_l - <mu_l, u_l>
        log_z = hmm_log_likelihood(log_init[l], log_trans[l], u[:, :, l], n)
        neg_kl = neg_kl + log_z - (m[:, :, l] * u[:, :, l]).sum((-1, -2))
    return neg_kl + emission_bound(theta, bias, x, m, n)


@torch.no_grad()
def structured_mean_field(model: FactorialHMM, batch: Batch, iterations: int = 5,
                          unary: torch.Tensor | None = None, trace: list | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """Coordinate ascent on F: ``iterations`` sweeps over the chains, each chain by one
    forward-backward with the tangent unary of :func:`emission_bound`. Starts from ``unary``
    (B, T, L, K) (default 0: every q_l is its prior chain). Returns (unary, marginals), (B, T, L, K)
    each. ``trace`` (a list) receives F (B,) before the first and after every chain update."""
    x, n = tokens_of(batch)
    B, T = x.shape
    L, K = model.num_chains, model.num_states
    log_init, log_trans = model.chain_log_probs()
    theta, bias = model.emission_parts()
    u = theta.new_zeros(B, T, L, K) if unary is None else unary.detach().clone()
    mu = torch.stack([hmm_marginals(log_init[l], log_trans[l], u[:, :, l], n) for l in range(L)], 2)

    def record():
        if trace is not None:
            trace.append(coordinate_ascent_bound(model, batch, u, mu))

    record()
    mask = (torch.arange(T, device=x.device)[None, :] < n[:, None])[:, :, None]  # (B, T, 1)
    for _ in range(iterations):
        for j in range(L):
            with torch.enable_grad():
                m = mu.detach().requires_grad_(True)
                (g,) = torch.autograd.grad(emission_bound(theta, bias, x, m, n).sum(), m)
            u[:, :, j] = torch.where(mask, g[:, :, j], 0.0)
            mu[:, :, j] = hmm_marginals(log_init[j], log_trans[j], u[:, :, j], n)
            record()
    return u, mu


# ---- q as a distribution -----------------------------------------------------------------


class FactorialChains(Distribution):
    """q(z | x) = prod_l q_l(z^l), each q_l a linear-chain CRF; batch shape (B,), samples (…, B, T, L).

    Held as one :class:`~latentlm.structured.LinearChainCRF` over B * L rows (chain l of example
    b is row b * L + l), so every question (marginals, entropy, samples) is one chain program."""

    arg_constraints: dict = {}
    has_rsample = False

    def __init__(self, init: torch.Tensor, trans: torch.Tensor, unary: torch.Tensor, lengths: torch.Tensor):
        """``init`` (L, K) or (B, L, K); ``trans`` (L, K, K) or (B, L, K, K); ``unary`` (B, T, L, K)."""
        B, T, L, K = unary.shape
        self.num_chains = L
        init = init.expand(B, L, K).reshape(B * L, K)
        trans = trans.expand(B, L, K, K)[:, :, None].expand(B, L, max(T - 1, 0), K, K).reshape(B * L, -1, K, K)
        rows = _chain_rows(unary).reshape(B * L, T, K)
        self.crf = LinearChainCRF(trans, rows, lengths.repeat_interleave(L), init=init)
        super().__init__(batch_shape=torch.Size([B]), event_shape=torch.Size([T, L]), validate_args=False)

    def _per_example(self, t: torch.Tensor) -> torch.Tensor:  # (…, B * L) -> (…, B)
        return t.reshape(*t.shape[:-1], -1, self.num_chains).sum(-1)

    @property
    def marginals(self) -> torch.Tensor:
        """q_l(z^l_t = k) (B, T, L, K)."""
        m = self.crf.marginals
        return _chain_rows(m.reshape(-1, self.num_chains, *m.shape[1:]))

    def edge_marginals(self) -> torch.Tensor:
        """q_l(z^l_{t-1} = i, z^l_t = j) (B, L, T-1, K, K)."""
        e = self.crf.edge_marginals()
        return e.reshape(-1, self.num_chains, *e.shape[1:])

    def entropy(self) -> torch.Tensor:
        return self._per_example(self.crf.entropy())

    def sample(self, sample_shape: torch.Size | tuple = torch.Size()) -> torch.Tensor:
        z = self.crf.sample((max(1, int(torch.Size(sample_shape).numel())),))  # (S, B * L, T)
        z = z.reshape(z.size(0), -1, self.num_chains, z.size(-1)).transpose(-1, -2)  # (S, B, T, L)
        return z.reshape(*sample_shape, *z.shape[1:]) if len(sample_shape) else z[0]

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """log q(z) for paths (…, B, T, L) -> (…, B)."""
        rows = value.transpose(-1, -2).reshape(*value.shape[:-3], -1, value.size(-2))  # (…, B * L, T)
        return self._per_example(self.crf.log_prob(rows))


def chain_bound(model: FactorialHMM, batch: Batch, q: FactorialChains) -> torch.Tensor:
    """F (B,) for any product of chain CRFs q: sum_l [H(q_l) + E_q log p_l(z^l)] + emission_bound;
    differentiable in the model and in q's potentials."""
    x, n = tokens_of(batch)
    log_init, log_trans = model.chain_log_probs()
    theta, bias = model.emission_parts()
    mu = q.marginals  # (B, T, L, K), in the weights' dtype (fp32 under bf16 autocast)
    xi = q.edge_marginals()  # (B, L, T-1, K, K)
    cross = (mu[:, 0] * log_init).sum((-1, -2)) + (xi * log_trans[None, :, None]).sum((1, 2, 3, 4))
    return q.entropy() + cross + emission_bound(theta, bias, x, mu, n)


# ---- the amortized inference network --------------------------------------------------------


class FactorialChainPosterior(StructuredPosterior):
    """Amortized q(z | x) for the factorial HMM: a BiLSTM over the sentence gives each chain's
    per-position CRF unary scores (B, T, L, K); each chain has its own learned init and
    transition scores. ``latent_dim`` = L * K comes from the model; ``num_states`` = K."""

    def __init__(self, vocab_size: int, latent_dim: int, num_states: int, embed_dim: int = 64,
                 hidden_dim: int = 64):
        super().__init__()
        if latent_dim % num_states:
            raise ConfigError(f"posterior: latent_dim {latent_dim} is not a multiple of num_states {num_states}")
        self.num_chains, self.num_states = latent_dim // num_states, num_states
        L, K = self.num_chains, num_states
        self.embed = nn.Embedding(vocab_size, embed_dim)
        self.rnn = nn.LSTM(embed_dim, hidden_dim, batch_first=True, bidirectional=True)
        self.to_unary = nn.Linear(2 * hidden_dim, L * K)
        self.init = nn.Parameter(torch.zeros(L, K))
        self.trans = nn.Parameter(torch.zeros(L, K, K))

    def forward(self, batch: Batch) -> FactorialChains:
        x, n = tokens_of(batch)
        h, _ = self.rnn(self.embed(x))  # (B, T, 2H); the backward direction reads padding (</s>), masked by n
        unary = self.to_unary(h).to(self.init.dtype).unflatten(-1, (self.num_chains, self.num_states))  # (B, T, L, K), in the weights' dtype (fp32 under bf16 autocast)
        return FactorialChains(self.init, self.trans, unary, n)


# ---- the objectives -------------------------------------------------------------------------


def _check_model(model) -> None:
    if not isinstance(model, FactorialHMM):
        raise ConfigError(f"the mean-field objectives are written for the factorial HMM (model.type: factorial_hmm); "
                          f"got {type(model).__name__}")


class MeanField(Objective):
    """Structured mean field, coordinate ascent: each batch runs ``iterations`` sweeps of chain
    updates with the model fixed (no gradient), then the loss is -F at that q and the gradient
    reaches the model's parameters only (variational EM with a partial E-step). ``bound`` is F,
    a true lower bound on log p(x); ``log_marginal`` is the exact log p(x) when the product
    chain is small enough (``exact_check``), so the gap can be logged."""

    needs_posterior = False

    def __init__(self, iterations: int = 5, exact_check: bool = False):
        super().__init__()
        if iterations < 1:
            raise ConfigError(f"objective.iterations must be >= 1, got {iterations}")
        self.iterations, self.exact_check = iterations, exact_check

    def check(self, model, posterior) -> None:
        _check_model(model)

    def fit_q(self, model: FactorialHMM, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        return structured_mean_field(model, batch, self.iterations)

    def evaluation_posterior(self, model, posterior, batch) -> FactorialChains:
        u, _ = self.fit_q(model, batch)
        log_init, log_trans = model.chain_log_probs()
        return FactorialChains(log_init.detach(), log_trans.detach(), u, batch.lengths)

    def forward(self, model, posterior, batch, step: int = 0) -> ObjectiveOutput:
        u, mu = self.fit_q(model, batch)
        bound = coordinate_ascent_bound(model, batch, u, mu)
        log_px = None
        if self.exact_check and model.has_exact_marginal:
            with torch.no_grad():
                log_px = model.log_marginal(batch)
        extras = None if log_px is None else {"gap": (log_px - bound.detach()).mean()}
        return ObjectiveOutput(loss=-bound.mean(), bound=bound, log_marginal=log_px, tokens=batch.lengths,
                               extras=extras)


class AmortizedMeanField(Objective):
    """Structured mean field with an inference network (``posterior.type: factorial_chains``):
    q_l are CRFs whose potentials the network gives; the model and the network both ascend the
    same exact bound F (:func:`chain_bound`), gradients through the chains' marginals and entropy."""

    def check(self, model, posterior) -> None:
        _check_model(model)
        if not isinstance(posterior, FactorialChainPosterior):
            raise ConfigError(f"amortized_mean_field needs posterior.type: factorial_chains, got {type(posterior).__name__}")
        if (posterior.num_chains, posterior.num_states) != (model.num_chains, model.num_states):
            raise ConfigError(f"posterior has {posterior.num_chains} chains of {posterior.num_states} states, the model "
                              f"{model.num_chains} of {model.num_states}; set posterior.num_states: {model.num_states}")

    def forward(self, model, posterior, batch, step: int = 0) -> ObjectiveOutput:
        q = posterior(batch)
        bound = chain_bound(model, batch, q)
        return ObjectiveOutput(loss=-bound.mean(), bound=bound, tokens=batch.lengths, q=q)
