"""A trainable system: model + posterior + objective, built from a config and saved as
``model.safetensors`` + ``config.json`` + ``vocab.json`` (no pickles anywhere).
"""

from __future__ import annotations

import inspect
import json
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from latentlm.config import Config, config_from_dict
from latentlm.data.batching import Batch
from latentlm.data.vocab import Vocab
from latentlm.device import resolve_device
from latentlm.errors import CheckpointError, ConfigError
from latentlm.inference import OBJECTIVES, POSTERIORS
from latentlm.inference.base import Objective, ObjectiveOutput, Posterior
from latentlm.models import MODELS
from latentlm.models.base import LatentVariableModel


def _construct(registry: dict, spec: dict, where: str, **fixed):
    spec = dict(spec)
    kind = spec.pop("type")
    if kind not in registry:
        raise ConfigError(f"{where}.type {kind!r} unknown; choose one of {sorted(registry)}")
    accepted = inspect.signature(registry[kind]).parameters
    fixed = {k: v for k, v in fixed.items() if k in accepted}  # pass context only to classes that name it
    try:
        return registry[kind](**fixed, **spec)
    except TypeError as err:
        raise ConfigError(f"{where} ({kind}): {err}") from None


class System(nn.Module):
    """What the trainer optimizes and a checkpoint stores. ``forward`` evaluates the
    objective, so DDP can wrap the whole system."""

    def __init__(self, model: LatentVariableModel, posterior: Posterior | None, objective: Objective):
        super().__init__()
        self.model, self.posterior, self.objective = model, posterior, objective

    def forward(self, batch: Batch, step: int = 0) -> ObjectiveOutput:
        return self.objective(self.model, self.posterior, batch, step)


def build_posterior(spec: dict, model: LatentVariableModel, vocab_size: int,
                    words: list[str] | None = None, source_vocab_size: int | None = None) -> Posterior:
    """A posterior q(z | x) of family ``spec["type"]`` (a ``posterior`` config section) for
    ``model``: the family gets the vocabulary size, the model's ``latent_dim`` and the
    vocabulary's ``words`` (for a character CNN) if it names them."""
    return _construct(POSTERIORS, spec, "posterior", vocab_size=vocab_size, latent_dim=model.latent_dim,
                      words=words, source_vocab_size=source_vocab_size)


def build_system(config: Config, vocab_size: int, words: list[str] | None = None,
                 source_vocab_size: int | None = None) -> System:
    """``words``: the vocabulary's tokens, for models that read spellings (a character CNN);
    ``source_vocab_size``: the source side's vocabulary size, for models of parallel text."""
    model = _construct(MODELS, config.model, "model", vocab_size=vocab_size, words=words,
                       source_vocab_size=source_vocab_size)
    objective = _construct(OBJECTIVES, config.objective, "objective", vocab_size=vocab_size)
    posterior = None
    if objective.needs_posterior:
        spec = config.posterior or ({"type": model.default_posterior} if model.default_posterior else None)
        if spec is None:
            raise ConfigError(
                f"objective {config.objective['type']!r} needs a posterior, and model "
                f"{config.model['type']!r} has no latent variable")
        posterior = build_posterior(spec, model, vocab_size, words, source_vocab_size)
    objective.check(model, posterior)  # a pairing the objective cannot learn correctly fails here
    return System(model, posterior, objective)


def load_pretrained(directory: str | Path, weights: str = "model.safetensors",
                    device: str | torch.device | None = "cpu") -> tuple[System, Config, Vocab]:
    """Load a trained run directory onto ``device`` (``auto | cpu | cuda | cuda:N``, or None for
    the run's own ``train.device``), wherever it was trained: the weights are read to the CPU,
    then moved. Only safetensors and JSON are read, never pickles."""
    directory = Path(directory)
    for name in ("config.json", "vocab.json", weights):
        if not (directory / name).is_file():
            raise CheckpointError(f"{directory}: missing {name}; is this a latentlm run directory?")
    config = config_from_dict(json.loads((directory / "config.json").read_text(encoding="utf-8")))
    vocab = Vocab.load(directory / "vocab.json")
    target = resolve_device(config.train.device if device is None else device)
    system = build_system(config, len(vocab), words=vocab.itos, source_vocab_size=source_size(vocab))
    load_state(system, directory / weights)
    system.to(target)
    system.eval()
    return system, config, vocab


def source_size(vocab: Vocab) -> int | None:
    """The source side's vocabulary size of a parallel corpus, else None."""
    return len(vocab.source) if vocab.source is not None else None


def load_state(module: nn.Module, path: Path) -> None:
    try:
        state = load_file(str(path), device="cpu")  # the weights' device is the caller's choice, not the file's
    except Exception as err:  # safetensors raises several types for a corrupt file
        raise CheckpointError(f"{path}: unreadable safetensors file ({err})") from None
    missing, unexpected = module.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: weights do not match the config (missing {missing[:5]}, "
                              f"unexpected {unexpected[:5]})")
