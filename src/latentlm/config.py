"""Experiment configuration: one YAML file per experiment, plus ``--set key=value`` overrides.

``data``, ``train`` and ``eval`` are dataclasses with defaults (nanoGPT style). ``model``,
``posterior`` and ``objective`` are open dicts whose ``type`` picks a class from a
registry and whose other keys are that class's constructor arguments.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from latentlm.errors import ConfigError


class _Loader(yaml.SafeLoader):
    """YAML 1.1 reads ``1e-4`` (no dot) as a string; configs mean a number. Floats as YAML 1.2
    writes them: ``1e-4``, ``1E5``, ``.5``, ``-2.0e+3`` (plus YAML 1.1's ``.inf`` / ``.nan``)."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                 |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                 |[-+]?\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                 |[-+]?\.(?:inf|Inf|INF)
                 |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."),
)


def _yaml(text: str) -> Any:
    return yaml.load(text, Loader=_Loader)


@dataclass
class DataConfig:
    name: str = "ptb"
    data_dir: str | None = None
    max_vocab: int | None = None       # cap incl. the 4 specials; None keeps every word
    min_count: int = 1
    max_tokens: int = 400              # longer lines are an error naming file and line
    train_limit: int | None = None     # first N training lines only (demo / quick runs)
    valid_limit: int | None = None
    test_limit: int | None = None
    format: str = "text"               # text | documents (jsonl -> bag of words) | tagged (tsv / CoNLL-U) | parallel
    source_lang: str = "de"            # parallel: {split}.{source_lang} translates to {split}.{target_lang}
    target_lang: str = "en"
    files: dict[str, str] | None = None  # split -> file (relative to the corpus folder, or absolute)
    valid_fraction: float = 0.0        # >0: carve the valid split from train (rows chosen by the seed)
    lowercase: bool = False            # text / tagged: lower-case every token
    tagset: str = "upos"               # tagged CoNLL-U: upos | xpos
    min_df: int = 3                    # documents: a word must occur in this many training documents
    skip_empty: bool = False           # documents: drop documents with no in-vocabulary word
    rescale_power: float | None = None  # documents: counts rescaled to length^g (a model change)


@dataclass
class TrainConfig:
    epochs: int = 10
    batch_size: int = 32
    optimizer: str = "adam"            # adam | sgd
    lr: float = 1e-3
    momentum: float = 0.0
    weight_decay: float = 0.0
    clip: float = 5.0                  # max gradient norm; 0 disables
    lr_decay: float = 0.5              # factor on a validation plateau
    lr_patience: int = 1               # epochs without improvement before decaying
    min_lr: float = 1e-6               # stop once the learning rate falls below
    early_stop_patience: int = 5       # epochs without improvement before stopping
    max_steps: int | None = None
    max_minutes: float | None = None   # wall-clock budget; stops cleanly and keeps the best model
    checkpoint_every: int = 500        # steps between resumable checkpoints
    eval_every: int | None = None      # steps between validations (default: each epoch)
    log_every: int = 20
    precision: str = "fp32"            # fp32 | bf16-mixed
    device: str = "auto"               # auto (cuda if available, else cpu) | cpu | cuda | cuda:N
    num_threads: int | None = None
    keep_checkpoints: int = 2
    aggressive: dict[str, Any] | None = None  # {max_inner_steps, check_every, max_epochs}: He et al. 2019
    pretrain_encoder_epochs: int = 0          # >0: autoencoder pretraining, then reset the decoder (Li et al. 2019)
    learner: str = "gradient"          # gradient | em (closed-form M-step) | gem (optimizer M-steps)
    em: dict[str, Any] | None = None   # em / gem options: init, anneal {...}, tol, m_steps, and the
                                       # model's M-step prior (smoothing, mixture_smoothing, emit_smoothing)


@dataclass
class EvalConfig:
    samples: int = 500                 # importance samples per example for log p(x)
    batch_size: int = 50
    seed: int = 1234
    beam: int = 5                      # translation models: beam size for BLEU (length-normalized scores)
    max_decode_len: int = 80           # translation models: longest output (tokens)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    model: dict[str, Any] = field(default_factory=lambda: {"type": "lstm_lm"})
    posterior: dict[str, Any] | None = None
    objective: dict[str, Any] = field(default_factory=lambda: {"type": "exact"})
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


_SECTIONS = {"data": DataConfig, "train": TrainConfig, "eval": EvalConfig}


def _build_dataclass(cls, values: dict[str, Any], where: str):
    if not isinstance(values, dict):
        raise ConfigError(f"{where}: expected a mapping, got {values!r}")
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    types = {f.name: str(f.type) for f in dataclasses.fields(cls)}
    out = {}
    for key, value in values.items():
        out[key] = _coerce(value, types[key], f"{where}.{key}")
    return cls(**out)


def _coerce(value: Any, type_name: str, where: str) -> Any:
    """YAML reads ``1e-3`` as a string (YAML 1.1); accept numbers written that way."""
    if value is None:
        if "None" not in type_name:
            raise ConfigError(f"{where} may not be null")
        return None
    base = type_name.split("|")[0].strip()
    try:
        if base == "float" and not isinstance(value, bool):
            return float(value)
        if base == "int" and not isinstance(value, bool):
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(float(value)) if isinstance(value, str) else int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: expected {base}, got {value!r}") from None
    return value


def config_from_dict(raw: dict[str, Any]) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"a config must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - {f.name for f in dataclasses.fields(Config)})
    if unknown:
        raise ConfigError(f"unknown config section(s) {unknown}")
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in _SECTIONS:
            kwargs[key] = _build_dataclass(_SECTIONS[key], value or {}, key)
        elif key in ("model", "objective", "posterior"):
            if value is not None and (not isinstance(value, dict) or "type" not in value):
                raise ConfigError(f"{key}: expected a mapping with a 'type' key, got {value!r}")
            kwargs[key] = dict(value) if value is not None else None
        else:
            kwargs[key] = value
    return Config(**kwargs)


def parse_override(text: str) -> tuple[list[str], Any]:
    if "=" not in text:
        raise ConfigError(f"--set expects key=value, got {text!r}")
    key, value = text.split("=", 1)
    return key.strip().split("."), _yaml(value)


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """``train.lr=0.5`` / ``objective.kl_schedule.steps=2000`` -> nested update (YAML-typed)."""
    for text in overrides:
        path, value = parse_override(text)
        node = raw
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"--set {text}: {part!r} is not a section")
        node[path[-1]] = value
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> Config:
    raw: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {path} not found")
        try:
            raw = _yaml(path.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as err:
            raise ConfigError(f"{path}: not valid YAML ({err})") from None
    return config_from_dict(apply_overrides(raw, overrides or []))
