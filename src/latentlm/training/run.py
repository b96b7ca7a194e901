"""The entry point of training: :func:`train` runs the one loop on a config, first with an
encoder-pretraining stage when the config asks for one (``train.pretrain_encoder_epochs``)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from latentlm.config import Config
from latentlm.training.pretrain import pretrain_then_train
from latentlm.training.trainer import Trainer


def train(config: Config, out_dir: str | Path, resume: bool = False, progress: bool | None = None) -> dict[str, Any]:
    """Fit ``config`` into ``out_dir``. With ``train.pretrain_encoder_epochs``, first an
    autoencoder stage (beta = 0) whose encoder initializes the real run (decoder reset)."""
    if config.train.pretrain_encoder_epochs:
        return pretrain_then_train(config, out_dir, config.train.pretrain_encoder_epochs, resume=resume,
                                   progress=progress)
    return Trainer(config, out_dir, resume=resume, progress=progress).fit()
