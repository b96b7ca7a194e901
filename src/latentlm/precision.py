"""The one switch between fp32 and bf16-mixed, shared by training and evaluation."""

from __future__ import annotations

import contextlib

import torch

from latentlm.errors import ConfigError

PRECISIONS = ("fp32", "bf16-mixed")


def autocast(precision: str):
    """``bf16-mixed``: autocast to bfloat16 with fp32 weights (GPU if there is one, else CPU);
    ``fp32``: nothing."""
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16-mixed":
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return torch.autocast(device, dtype=torch.bfloat16)
    raise ConfigError(f"precision (train.precision, --precision) must be one of {PRECISIONS}, got {precision!r}")
