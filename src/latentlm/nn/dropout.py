"""Dropout with a cheaper mask on the CPU.

``torch.nn.Dropout`` draws its CPU mask with ``bernoulli_``, whose kernel is serial and about
4x slower than drawing uniforms (``torch.rand``) and comparing: 3.8 ms against 1.0 ms for one
(32, 25, 256) mask on this machine, and a sentence VAE step draws two such masks (3.8 % of a
bf16 training step on one thread, 6.7 % on two: BENCHMARKS.md, "where the time goes"). Same
distribution — each unit kept with probability 1 - p and scaled by 1 / (1 - p) — and the same
module interface (a subclass: ``eval()``, ``p``, state dicts and ``isinstance`` checks all
behave as before); other devices keep PyTorch's fused kernel.
"""

from __future__ import annotations

import torch
from torch import nn


def dropout(x: torch.Tensor, p: float, training: bool = True) -> torch.Tensor:
    """x with each entry zeroed with probability ``p`` and the rest scaled by 1 / (1 - p)."""
    if not training or p == 0.0:
        return x
    if x.device.type != "cpu":
        return nn.functional.dropout(x, p, True)
    if p >= 1.0:
        return x * 0.0
    keep = torch.rand(x.shape, device=x.device) >= p  # P(keep) = 1 - p exactly for uniforms on [0, 1)
    return x * keep.to(x.dtype).mul_(1.0 / (1.0 - p))


class Dropout(nn.Dropout):
    """``torch.nn.Dropout`` with :func:`dropout`'s cheaper CPU mask (``inplace`` is not supported)."""

    def __init__(self, p: float = 0.5):
        super().__init__(p)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return dropout(x, self.p, self.training)
