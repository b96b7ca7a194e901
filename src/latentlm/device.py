"""Where the tensors live: ``train.device`` / ``--device`` = ``auto | cpu | cuda | cuda:N``.

One place turns the user's string into a :class:`torch.device`; everything else follows
the device of its inputs or module (a model's tensors are created on ``x.device`` or a
parameter's device, never on an implicit default), so moving the system and the batches is
all a caller does.
"""

from __future__ import annotations

import torch
from torch import nn

from latentlm.errors import ConfigError

DEVICES = "auto | cpu | cuda | cuda:N"


def resolve_device(spec: str | torch.device | None = "auto", local_rank: int | None = None) -> torch.device:
    """``auto`` -> ``cuda`` when a GPU is visible, else ``cpu``; ``cuda`` -> the current CUDA
    device; ``cuda:N`` as given. Under ``torchrun`` (``local_rank`` given) a CUDA device is
    ``cuda:<local_rank>``: one GPU per rank. A CUDA device that is not there is a :class:`ConfigError`
    naming the setting, not a crash deep inside the first forward pass."""
    if isinstance(spec, torch.device):
        spec = str(spec)
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    kind, _, index = spec.partition(":")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ConfigError(f"device (train.device, --device) must be one of {DEVICES}, got {spec!r}")
    if not torch.cuda.is_available():
        raise ConfigError(f"device {spec!r} asked for, but torch {torch.__version__} sees no CUDA GPU "
                          f"(torch.version.cuda = {torch.version.cuda}); use train.device=cpu or auto")
    if local_rank is not None:  # one GPU per data-parallel rank, whatever index the config names
        n = local_rank
    elif index:
        n = int(index)
    else:
        n = torch.cuda.current_device()
    if n >= torch.cuda.device_count():
        raise ConfigError(f"device cuda:{n} asked for, but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return torch.device("cuda", n)


def module_device(module: nn.Module | None) -> torch.device:
    """The device of a module's first parameter (or buffer); CPU for a module without tensors."""
    if module is not None:
        for tensor in module.parameters():
            return tensor.device
        for tensor in module.buffers():
            return tensor.device
    return torch.device("cpu")


def device_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A seeded generator on ``device``: CUDA sampling (``torch.multinomial``, ``torch.rand``)
    needs a CUDA generator; a CPU one cannot drive it."""
    return torch.Generator(device=torch.device(device)).manual_seed(seed)


def describe(device: torch.device) -> str:
    """``cuda:0 (NVIDIA H100 80GB HBM3)`` or ``cpu (8 threads)``: what a run prints and records."""
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return f"{device} ({torch.get_num_threads()} threads)"
