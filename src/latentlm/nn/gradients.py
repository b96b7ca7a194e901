"""Gradient clipping for every training loop (the gradient learner, the aggressive encoder
phase, generalized EM's M-steps)."""

from __future__ import annotations

import torch


def gradient_norm(parameters) -> torch.Tensor:
    """The total 2-norm of the parameters' gradients (those that have one), fp32.

    On the CPU each dense gradient's squared norm is a BLAS dot product with itself: in the
    sentence-VAE profiles (BENCHMARKS.md, ``vae_peer_profile_s5`` -> ``_s6``, 10 bf16 steps at
    two threads) the norm went from 16.1 ms (``linalg_vector_norm``) to 7.0 ms (``dot``).
    Elsewhere (and for sparse or strided gradients) torch's own ``get_total_norm`` (one
    multi-tensor kernel on a GPU)."""
    grads = [p.grad for p in parameters if p.grad is not None]
    if not grads or any(g.device.type != "cpu" or g.layout != torch.strided or not g.is_contiguous()
                        or g.dtype != torch.float32 for g in grads):
        return torch.nn.utils.get_total_norm(grads)
    flat = [g.view(-1) for g in grads]
    return torch.stack([torch.dot(f, f) for f in flat]).sum().sqrt()


def clip_factor(norm: torch.Tensor, clip: float) -> float:
    """min(1, clip / norm); 1 when ``clip`` is 0 (never clip). A non-finite norm gives what
    torch's clipping would scale by (0 or NaN)."""
    if not clip or float(norm) <= clip:
        return 1.0
    return clip / (float(norm) + 1e-6)


def clip_gradients(parameters, clip: float) -> torch.Tensor:
    """The gradients' total 2-norm, after scaling them down to ``clip`` when it is above (0: never).
    ``clip_grad_norm_`` multiplies every gradient by min(1, clip / norm) even when that is 1, a
    pass over all parameters (2 % of a sentence-VAE step); here only a norm above ``clip`` does."""
    params = [p for p in parameters if p.grad is not None]
    norm = gradient_norm(params)
    if clip_factor(norm, clip) != 1.0:  # a non-finite norm scales them as torch does (by 0 or NaN)
        torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
    return norm


def plain_sgd(optimizer: torch.optim.Optimizer) -> bool:
    """True when every step of ``optimizer`` is p -= lr * grad (SGD without momentum or weight
    decay): scaling its gradients by c is then the same update as scaling its lr by c."""
    return type(optimizer) is torch.optim.SGD and all(
        not g["momentum"] and not g["weight_decay"] and not g.get("maximize", False) for g in optimizer.param_groups)


def clipped_step(optimizer: torch.optim.Optimizer, parameters, norm: torch.Tensor, clip: float) -> None:
    """``optimizer.step()`` on the gradients clipped to total norm ``clip`` (``norm`` is their
    norm, from :func:`gradient_norm`). For plain SGD the factor goes into the learning rate of
    this one step instead of into the gradients, which saves a pass over every gradient (with
    the peer's SGD + clip 5 the sentence-VAE's gradient norm is above 5 on most steps; the
    scaling's ``mul_`` went from 22.7 to 5.9 ms per 10 bf16 steps in the profiles named above)."""
    factor = clip_factor(norm, clip)
    if factor == 1.0:
        optimizer.step()
        return
    if not plain_sgd(optimizer):
        torch.nn.utils.clip_grads_with_norm_([p for p in parameters if p.grad is not None], clip, norm)
        optimizer.step()
        return
    lrs = [g["lr"] for g in optimizer.param_groups]
    try:
        for g in optimizer.param_groups:
            g["lr"] = g["lr"] * factor
        optimizer.step()
    finally:
        for g, lr in zip(optimizer.param_groups, lrs):
            g["lr"] = lr
