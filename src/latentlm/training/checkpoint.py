"""Crash-proof, pickle-free checkpoints: tensors in safetensors, everything else in JSON.

A resumable checkpoint is a folder ``checkpoints/step-N.K/`` (step N, the K-th checkpoint
this run wrote, so a second checkpoint at the same step gets its own folder) holding
``model.safetensors``, ``optimizer.safetensors`` (the tensors of every optimizer),
``rng.safetensors`` (the CPU and CUDA generator states of every rank) and ``state.json``
(the rest, plus the size and SHA-256 of each tensor file). Writing one:

1. the files go into a hidden ``.tmp-step-N.K`` folder, each fsynced;
2. the folder is renamed to ``step-N.K`` and the parent folder fsynced;
3. ``latest.json`` is atomically replaced to name it;
4. only then are old folders pruned (never the one ``latest.json`` names).

A kill at any moment thus leaves ``latest.json`` naming a complete folder, and no folder
is ever rewritten. On resume :func:`latest_checkpoint` verifies the folder ``latest.json``
names (files present, sizes and hashes as recorded); if it, or ``latest.json`` itself, is
damaged it warns and falls back to the newest folder that verifies.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import signal
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from safetensors.torch import load_file

from latentlm.errors import CheckpointError
from latentlm.io import _fsync_dir, _tensor_bytes, _write_synced, atomic_write_text

_FOLDER = re.compile(r"^step-(\d+)(?:\.(\d+))?$")  # step-N.K; legacy step-N sorts before all


# -- optimizers -------------------------------------------------------------------------
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


def _as_named(optimizers) -> dict[str, torch.optim.Optimizer]:
    return {"optimizer": optimizers} if isinstance(optimizers, torch.optim.Optimizer) else dict(optimizers)


# -- RNG of every rank ------------------------------------------------------------------
def _local_rng_state() -> torch.Tensor:
    """This process's generator states as one uint8 tensor: [n_cuda, cpu state, cuda states...].

    CUDA states are taken only once CUDA is initialized here: before that the CUDA
    generators are untouched, and ``torch.manual_seed(seed)`` at set-up restores them."""
    cpu = torch.get_rng_state()
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else []
    sizes = torch.tensor([cpu.numel()] + [c.numel() for c in cuda], dtype=torch.int64)
    header = torch.tensor([len(cuda)], dtype=torch.int64)
    return torch.cat([header.view(torch.uint8), sizes.view(torch.uint8), cpu, *cuda])


def _unpack_rng(packed: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    n = int(packed[:8].view(torch.int64))
    sizes = packed[8 : 8 + 8 * (n + 1)].view(torch.int64).tolist()
    parts, at = [], 8 + 8 * (n + 1)
    for size in sizes:
        parts.append(packed[at : at + size].clone())
        at += size
    return parts[0], parts[1:]


def gather_rng_states() -> dict[str, torch.Tensor]:
    """``{"rng.cpu.R": ..., "rng.cuda.R.D": ...}`` for every rank R (and CUDA device D).

    Under ``torch.distributed`` this is a collective (``all_gather`` of uint8 tensors, no
    pickles): every rank must call it, at the same point."""
    local = _local_rng_state()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
                  else torch.device("cpu"))
        length = torch.tensor([local.numel()], dtype=torch.int64, device=device)
        lengths = [torch.zeros_like(length) for _ in range(dist.get_world_size())]
        dist.all_gather(lengths, length)
        longest = int(max(int(x) for x in lengths))
        padded = torch.zeros(longest, dtype=torch.uint8, device=device)
        padded[: local.numel()] = local.to(device)
        gathered = [torch.zeros_like(padded) for _ in lengths]
        dist.all_gather(gathered, padded)
        packed = [g[: int(n)].cpu() for g, n in zip(gathered, lengths)]
    else:
        packed = [local]
    out = {}
    for rank, p in enumerate(packed):
        cpu, cuda = _unpack_rng(p)
        out[f"rng.cpu.{rank}"] = cpu
        out.update({f"rng.cuda.{rank}.{d}": s for d, s in enumerate(cuda)})
    return out


def restore_rng_state(tensors: dict[str, torch.Tensor], rank: int = 0) -> None:
    """Set this process's generators to those rank ``rank`` saved."""
    if f"rng.cpu.{rank}" in tensors:
        torch.set_rng_state(tensors[f"rng.cpu.{rank}"])
    elif "rng.torch" in tensors and rank == 0:  # checkpoints before per-rank RNG
        torch.set_rng_state(tensors["rng.torch"])
    else:
        warnings.warn(f"the checkpoint holds no RNG state for rank {rank} (saved with another world size?): "
                      f"the resumed run will not repeat the uninterrupted one exactly", stacklevel=2)
        return
    cuda = [tensors[k] for k in sorted((k for k in tensors if k.startswith(f"rng.cuda.{rank}.")),
                                       key=lambda k: int(k.rsplit(".", 1)[1]))]
    if cuda and torch.cuda.is_available():
        for device, state in enumerate(cuda[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, device)


# -- fault injection (tests) ------------------------------------------------------------
_fault_seen: dict[int, int] = {}


def _maybe_fault(step: int, phase: str) -> None:
    """``LATENTLM_FAULT=checkpoint:STEP:PHASE[:K]`` SIGKILLs this process at ``PHASE`` of the
    K-th (default first) checkpoint written at ``STEP``. Phases, in order: ``model``,
    ``optimizer``, ``state`` (all files in the hidden folder, before the rename),
    ``rename`` (renamed, ``latest.json`` not yet updated), ``pointer`` (before pruning)."""
    spec = os.environ.get("LATENTLM_FAULT", "")
    if not spec.startswith("checkpoint:"):
        return
    parts = spec.split(":")
    if int(parts[1]) == step and parts[2] == phase:
        if _fault_seen.get(step, 0) == (int(parts[3]) if len(parts) > 3 else 1):
            os.kill(os.getpid(), signal.SIGKILL)


def _count_fault_step(step: int) -> None:
    if os.environ.get("LATENTLM_FAULT"):
        _fault_seen[step] = _fault_seen.get(step, 0) + 1


# -- folders ----------------------------------------------------------------------------
def _folders(root: Path) -> list[tuple[tuple[int, int], Path]]:
    """Renamed-into-place checkpoint folders, oldest first by (write number K, step)."""
    found = []
    for p in root.iterdir() if root.is_dir() else ():
        m = _FOLDER.match(p.name)
        if m and p.is_dir():
            found.append(((int(m.group(2) or 0), int(m.group(1))), p))
    return sorted(found)


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def verify_checkpoint(folder: Path, deep: bool = True) -> str | None:
    """None if ``folder`` is a complete checkpoint, else what is wrong. ``deep`` also checks
    the SHA-256 of each tensor file (the shallow check: present, sizes as recorded)."""
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    except FileNotFoundError:
        return "state.json is missing"
    except (OSError, ValueError) as err:
        return f"state.json is unreadable ({err})"
    files = state.get("files") if isinstance(state, dict) else None
    if not isinstance(files, dict):  # a checkpoint from before the manifest: presence only
        missing = [n for n in ("model.safetensors", "optimizer.safetensors") if not (folder / n).is_file()]
        return f"{', '.join(missing)} missing" if missing else None
    for name, record in files.items():
        path = folder / name
        if not path.is_file():
            return f"{name} is missing"
        try:
            size, digest = int(record["bytes"]), str(record["sha256"])
        except (KeyError, TypeError, ValueError):
            return f"state.json's record of {name} is malformed"
        if path.stat().st_size != size:
            return f"{name} has {path.stat().st_size} bytes, {size} were written (truncated?)"
        if deep and _sha256(path) != digest:
            return f"{name} does not match its recorded SHA-256 (corrupt)"
    return None


def save_checkpoint(root: Path, step: int, module: torch.nn.Module, optimizers, state: dict[str, Any],
                    keep: int = 2, rng: dict[str, torch.Tensor] | None = None) -> Path:
    """Write a new checkpoint folder and point ``latest.json`` at it; returns the folder.

    ``optimizers``: one optimizer or ``{name: optimizer}`` (e.g. the aggressive phase's
    encoder optimizer beside the main one). ``rng``: from :func:`gather_rng_states`
    (default: this process's generators, as rank 0)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    _count_fault_step(step)
    number = 1 + max((key[0] for key, _ in _folders(root)), default=0)
    name = f"step-{step}.{number}"
    tmp = root / f".tmp-{name}"
    if tmp.exists():  # left by a write that was killed (only one process writes a run's checkpoints)
        shutil.rmtree(tmp)
    tmp.mkdir()
    # Each file fsynced; a kill mid-way leaves only the hidden folder.
    files = {}

    def write(name: str, data: bytes) -> None:
        _write_synced(tmp / name, data)
        files[name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}

    write("model.safetensors", _tensor_bytes(module.state_dict(), {"format": "pt"}))
    _maybe_fault(step, "model")
    tensors, metas = {}, {}
    for opt_name, optimizer in _as_named(optimizers).items():
        flat, metas[opt_name] = optimizer_to_flat(optimizer)
        tensors.update({f"{opt_name}.{k}": v for k, v in flat.items()})
    write("optimizer.safetensors", _tensor_bytes(tensors))
    _maybe_fault(step, "optimizer")
    write("rng.safetensors", _tensor_bytes(gather_rng_states() if rng is None else rng))
    body = json.dumps({**state, "step": step, "optimizers": metas, "files": files}, indent=1)
    _write_synced(tmp / "state.json", body.encode("utf-8"))
    _fsync_dir(tmp)
    _maybe_fault(step, "state")
    folder = root / name
    os.rename(tmp, folder)
    _fsync_dir(root)
    _maybe_fault(step, "rename")
    atomic_write_text(root / "latest.json", json.dumps({"step": step, "folder": name}))
    _maybe_fault(step, "pointer")
    _prune(root, folder, keep)
    return folder


def _prune(root: Path, newest: Path, keep: int) -> None:
    """Keep ``newest`` and the ``keep - 1`` newest other folders that pass the shallow check;
    delete the rest and any hidden folder a killed write left."""
    kept = 1
    for _, folder in reversed(_folders(root)):
        if folder == newest:
            continue
        if kept < keep and verify_checkpoint(folder, deep=False) is None:
            kept += 1
            continue
        shutil.rmtree(folder, ignore_errors=True)
    for leftover in root.glob(".tmp-step-*"):
        shutil.rmtree(leftover, ignore_errors=True)


def latest_checkpoint(root: Path) -> Path | None:
    """The folder ``latest.json`` names if it verifies; else (with a warning) the newest
    folder that does; None when there is no checkpoint at all."""
    root = Path(root)
    pointer = root / "latest.json"
    named: Path | None = None
    problem = None
    if pointer.is_file():
        try:
            named = root / json.loads(pointer.read_text(encoding="utf-8"))["folder"]
        except (OSError, ValueError, KeyError, TypeError) as err:
            problem = f"{pointer} is unreadable ({err})"
        else:
            problem = verify_checkpoint(named) if named.is_dir() else "it is missing"
            if problem is None:
                return named
            problem = f"{pointer} names {named.name}, but {problem}"
    for _, folder in reversed(_folders(root)):
        if folder == named:
            continue
        why = verify_checkpoint(folder)
        if why is None:
            if problem is not None:
                warnings.warn(f"{problem}: falling back to the previous good checkpoint {folder}", stacklevel=2)
            return folder
        problem = (problem + "; " if problem else "") + f"{folder.name}: {why}"
    if problem is not None:
        warnings.warn(f"no loadable checkpoint in {root}: {problem}", stacklevel=2)
    return None


def load_checkpoint(folder: Path, module: torch.nn.Module, optimizers, rank: int = 0) -> dict[str, Any]:
    """Restore ``module``, the optimizers and rank ``rank``'s generators; returns the rest of the state."""
    from latentlm.system import load_state

    load_state(module, folder / "model.safetensors")
    state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
    tensors = load_file(str(folder / "optimizer.safetensors"))
    named = _as_named(optimizers)
    if "optimizers" in state:
        metas = state.pop("optimizers")
        for opt_name, optimizer in named.items():
            if opt_name not in metas:
                if opt_name == "optimizer":
                    raise CheckpointError(f"{folder}: holds no optimizer state (it has {sorted(metas)})")
                warnings.warn(f"{folder}: holds no state for {opt_name!r}; it starts afresh", stacklevel=2)
                continue
            prefix = f"{opt_name}."
            optimizer_from_flat(optimizer, {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                                metas[opt_name])
    else:  # before named optimizers: one optimizer, unprefixed
        optimizer_from_flat(named["optimizer"], tensors, state.pop("optimizer"))
    rng = load_file(str(folder / "rng.safetensors")) if (folder / "rng.safetensors").is_file() else tensors
    restore_rng_state(rng, rank)
    state.pop("files", None)
    return state
