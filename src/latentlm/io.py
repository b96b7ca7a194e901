"""Files written atomically: a new file is written beside its target, fsynced and renamed over
it, so a reader (or a resume after a kill) sees the old content or the new, never a torn file.

The lowest layer of the package (it knows only the standard library, torch and safetensors):
vocabularies, run configs, checkpoints and reports all write through it.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

import torch
from safetensors.torch import save as save_tensors


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # e.g. a platform without directory file descriptors
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _write_synced(path: Path, data: bytes) -> None:
    """A new file with mode 0666 & ~umask (as ``open`` gives; ``mkstemp`` and safetensors'
    ``save_file`` give 0600, unreadable to colleagues on a shared machine), fsynced."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _tensor_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    return save_tensors({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)


def _atomic_replace(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp"
    try:
        _write_synced(tmp, data)
        os.replace(tmp, path)
    except BaseException:
        if tmp.exists():
            tmp.unlink()
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_replace(Path(path), text.encode("utf-8"))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    _atomic_replace(Path(path), data)


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    _atomic_replace(Path(path), _tensor_bytes(tensors, metadata))


def save_weights(module: torch.nn.Module, path: Path) -> None:
    atomic_save_tensors(path, module.state_dict(), metadata={"format": "pt"})
