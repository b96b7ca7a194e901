"""Atomic, pickle-free checkpoints: tensors in safetensors, everything else in JSON.

A resumable checkpoint is a folder ``checkpoints/step-N/`` holding ``model.safetensors``,
``optimizer.safetensors`` (optimizer tensors and RNG state) and ``state.json``; the file
``checkpoints/latest.json`` names the newest complete one and is replaced atomically
after the folder is fully written, so a kill at any moment leaves a loadable checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from latentlm.errors import CheckpointError


def _atomic_replace(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    _atomic_replace(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def atomic_save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    tensors = {k: v.detach().contiguous().cpu().clone() for k, v in tensors.items()}
    _atomic_replace(Path(path), lambda tmp: save_file(tensors, tmp, metadata=metadata))


def save_weights(module: torch.nn.Module, path: Path) -> None:
    atomic_save_tensors(path, module.state_dict(), metadata={"format": "pt"})


def optimizer_to_flat(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able rest."""
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for key, value in state.items():
            if isinstance(value, torch.Tensor):
                tensors[f"state.{idx}.{key}"] = value
            else:
                scalars[f"{idx}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_flat(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        if name.startswith("state."):
            _, idx, key = name.split(".", 2)
            state.setdefault(int(idx), {})[key] = value
    for name, value in meta["scalars"].items():
        idx, key = name.split(".", 1)
        state.setdefault(int(idx), {})[key] = value
    groups = meta["param_groups"]
    for group in groups:  # JSON turned tuples into lists
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def save_checkpoint(root: Path, step: int, module: torch.nn.Module, optimizer: torch.optim.Optimizer,
                    state: dict[str, Any], keep: int = 2) -> Path:
    root = Path(root)
    folder = root / f"step-{step}"
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    save_weights(module, folder / "model.safetensors")
    tensors, meta = optimizer_to_flat(optimizer)
    tensors["rng.torch"] = torch.get_rng_state()
    atomic_save_tensors(folder / "optimizer.safetensors", tensors)
    atomic_write_text(folder / "state.json", json.dumps({**state, "optimizer": meta}, indent=1))
    atomic_write_text(root / "latest.json", json.dumps({"step": step, "folder": folder.name}))
    old = sorted((p for p in root.glob("step-*") if p != folder), key=lambda p: int(p.name.split("-")[1]))
    for stale in old[: max(0, len(old) - (keep - 1))]:
        shutil.rmtree(stale, ignore_errors=True)
    return folder


def latest_checkpoint(root: Path) -> Path | None:
    pointer = Path(root) / "latest.json"
    if not pointer.is_file():
        return None
    try:
        folder = Path(root) / json.loads(pointer.read_text())["folder"]
    except (ValueError, KeyError) as err:
        raise CheckpointError(f"{pointer}: unreadable ({err})") from None
    if not (folder / "state.json").is_file():
        raise CheckpointError(f"{pointer} names {folder}, which is incomplete")
    return folder


def load_checkpoint(folder: Path, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    from latentlm.system import load_state

    load_state(module, folder / "model.safetensors")
    state = json.loads((folder / "state.json").read_text())
    tensors = load_file(str(folder / "optimizer.safetensors"))
    optimizer_from_flat(optimizer, tensors, state.pop("optimizer"))
    torch.set_rng_state(tensors["rng.torch"])
    return state
