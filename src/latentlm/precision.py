"""The one switch between fp32 and bf16-mixed, shared by training and evaluation."""

from __future__ import annotations

import contextlib

import torch

from latentlm.errors import ConfigError

PRECISIONS = ("fp32", "bf16-mixed")


def autocast(precision: str, device: torch.device | str | torch.Tensor = "cpu"):
    """``bf16-mixed``: autocast to bfloat16 with fp32 weights on the device type of ``device``
    (a device, a device string or a tensor: pass where the tensors are, e.g. the system's
    ``module_device``); ``fp32``: nothing.

    The device type matters: CUDA autocast does nothing to CPU tensors and CPU autocast
    nothing to CUDA ones, so picking the type from "is there a GPU" rather than from where
    the tensors are silently runs fp32.
    """
    if precision == "fp32":
        return contextlib.nullcontext()
    if precision == "bf16-mixed":
        if isinstance(device, torch.Tensor):
            device = device.device
        device_type = torch.device(device).type
        return torch.autocast(device_type, dtype=torch.bfloat16)
    raise ConfigError(f"precision (train.precision, --precision) must be one of {PRECISIONS}, got {precision!r}")
