"""Gradient clipping for every training loop (the gradient learner, the aggressive encoder
phase, generalized EM's M-steps)."""

from __future__ import annotations

import torch


def clip_gradients(parameters, clip: float) -> torch.Tensor:
    """The gradients' total 2-norm, after scaling them down to ``clip`` when it is above (0: never).
    ``clip_grad_norm_`` multiplies every gradient by min(1, clip / norm) even when that is 1, a
    pass over all parameters (2 % of a sentence-VAE step); here only a norm above ``clip`` does."""
    params = [p for p in parameters if p.grad is not None]
    norm = torch.nn.utils.get_total_norm([p.grad for p in params])
    if clip and not float(norm) <= clip:  # a non-finite norm scales them as torch does (by 0 or NaN)
        torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
    return norm
