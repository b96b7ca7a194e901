"""Relaxed samples of a chain, for pathwise (Gumbel) gradients through a chain CRF.

Two relaxations, both differentiable in the chain's scores by ordinary autograd:

* :func:`relaxed_ffbs` — the Gumbel-CRF of Fu et al. (2020): forward filtering, then backward
  sampling where each step's draw z_t | z_{t+1} is a Gumbel-max (the hard, exact sample) and
  its Gumbel-softmax at temperature tau with the same noise (the relaxed one). The hard path
  is an exact draw from the chain; the relaxed path tends to it as tau -> 0.
* :func:`perturb_and_map` — Papandreou & Yuille (2011): Gumbel noise on the unary scores, then
  the MAP (hard, Viterbi) and its smoothed version, the marginals of the perturbed chain at
  temperature tau (soft max instead of max). With unary-only noise the hard path is *not* an
  exact draw from the chain; an estimator reporting a bound must use an exact sample for it.
"""

from __future__ import annotations

import torch

from latentlm.structured._engine import check_chain, step_trans
from latentlm.structured.chain import chain_marginals, chain_viterbi


def _gumbel(shape, like: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    u = torch.rand(shape, dtype=like.dtype, device=like.device, generator=generator)
    return -torch.log(-torch.log(u.clamp(1e-20, 1.0 - 1e-7)))


def relaxed_ffbs(
    init: torch.Tensor | None, trans: torch.Tensor, unary: torch.Tensor, lengths: torch.Tensor | None,
    num_samples: int, temperature: float, generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hard (S, B, T) long, -1 on padding: exact samples; soft (S, B, T, K): their relaxations,
    zero on padding). ``soft`` is differentiable in ``init``, ``trans`` and ``unary``."""
    lengths = check_chain(init, trans, unary, lengths)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B, T, K = unary.shape
    S = num_samples
    big = torch.finfo(unary.dtype).max / 16  # -inf scores -> huge negative: probability 0, no NaN
    unary, trans = unary.clamp_min(-big), trans.clamp_min(-big)
    la = unary[:, 0] if init is None else unary[:, 0] + init.clamp_min(-big)  # (B, K) log alpha_1
    filters = [la]
    for t in range(1, T):  # forward filtering in log space, plain autograd
        la = torch.logsumexp(filters[-1].unsqueeze(-1) + step_trans(trans, t), dim=1) + unary[:, t]
        filters.append(la)
    hard = torch.full((S, B, T), -1, dtype=torch.long, device=unary.device)
    soft = [None] * T
    z = torch.zeros(S, B, dtype=torch.long, device=unary.device)  # the hard z_{t+1}
    b_idx = torch.arange(B, device=unary.device)
    for t in range(T - 1, -1, -1):
        logits = filters[t].expand(S, B, K)
        if t < T - 1:
            tr = step_trans(trans, t + 1)
            col = tr.t()[z] if tr.dim() == 2 else tr[b_idx[None, :], :, z]  # (S, B, K): trans[:, z_{t+1}]
            logits = torch.where((t < lengths - 1)[None, :, None], logits + col, logits)
        logits = logits + _gumbel((S, B, K), unary, generator)
        valid = (t < lengths)[None, :]  # (1, B)
        z_t = logits.argmax(-1)
        z = torch.where(valid, z_t, z)
        hard[:, :, t] = torch.where(valid, z_t, -1)
        soft[t] = torch.where(valid[..., None], torch.softmax(logits / temperature, -1), 0.0)
    return hard, torch.stack(soft, 2) if T else unary.new_zeros(S, B, 0, K)


def perturb_and_map(
    init: torch.Tensor | None, trans: torch.Tensor, unary: torch.Tensor, lengths: torch.Tensor | None,
    num_samples: int, temperature: float, generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(hard (S, B, T): the MAP paths of Gumbel-perturbed unary scores, -1 on padding; soft
    (S, B, T, K): the marginals of the perturbed chain with every score divided by tau,
    differentiable in the scores)."""
    lengths = check_chain(init, trans, unary, lengths)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    B, T, K = unary.shape
    S = num_samples
    noisy = (unary[None] + _gumbel((S, B, T, K), unary, generator)).reshape(S * B, T, K)
    rows = lengths.repeat(S)
    tr = trans if trans.dim() == 2 else trans.repeat(S, 1, 1, 1)
    ini = init if init is None or init.dim() == 1 else init.repeat(S, 1)
    with torch.no_grad():
        hard = chain_viterbi(ini, tr, noisy, rows)[0].reshape(S, B, T)
    tau = temperature
    soft = chain_marginals(None if ini is None else ini / tau, tr / tau, noisy / tau, rows)  # (S*B, T, K)
    return hard, soft.reshape(S, B, T, K)
