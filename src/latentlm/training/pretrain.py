"""L9: pretrain the encoder as an autoencoder, then reset the decoder (Li et al. 2019,
"A surprisingly effective fix for deep latent variable modeling of text").

Stage 1 trains the same system with the KL term switched off (beta = 0, no free bits):
an autoencoder with a Gaussian bottleneck, so the encoder learns an informative code.
Stage 2 trains the row's own config (typically free bits + KL annealing) from scratch
except that the encoder starts from stage 1's weights; the decoder is freshly
initialized (the "reset"), so it cannot have learned to ignore z.

    python -m latentlm.training.pretrain configs/ptb/collapse/pretrain_freebits.yaml \\
        --out runs/ptb/pretrain_freebits --pretrain-epochs 5

writes stage 1 to ``OUT/pretrain`` and the row's run to ``OUT``. Both stages resume.
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from latentlm.config import Config, load_config
from latentlm.errors import CheckpointError, ConfigError
from latentlm.io import atomic_write_text
from latentlm.training.trainer import Trainer

ENCODER_PREFIX = "posterior."


def autoencoder_config(config: Config, epochs: int) -> Config:
    """Stage 1: same data, model, posterior and optimizer; ELBO with beta = 0 and no floor."""
    if epochs < 1:
        raise ConfigError(f"pretraining needs at least one epoch, got {epochs}")
    ae = copy.deepcopy(config)
    samples = ae.objective.get("samples", 1)
    ae.objective = {"type": "elbo", "samples": samples, "kl_schedule": 0.0}
    ae.train.epochs = epochs
    ae.train.max_steps = None
    ae.train.pretrain_encoder_epochs, ae.train.aggressive = 0, None  # stage 1 is a plain run
    return ae


class EncoderInitializedTrainer(Trainer):
    """A :class:`Trainer` whose fresh (not resumed) run starts with the posterior's weights
    taken from ``encoder_weights`` (a safetensors file of a whole system)."""

    def __init__(self, config: Config, out_dir, encoder_weights: str | Path, resume: bool = False,
                 progress: bool | None = None):
        super().__init__(config, out_dir, resume=resume, progress=progress)
        self.encoder_weights = Path(encoder_weights)

    def _setup(self) -> None:
        super()._setup()
        if self.ckpt is None:  # a resumed run already holds its own (trained) encoder
            load_encoder(self.system, self.encoder_weights)


def load_encoder(system, path: Path) -> int:
    """Copy the ``posterior.*`` tensors of a saved system into ``system``; returns how many."""
    state = {k[len(ENCODER_PREFIX):]: v for k, v in load_file(str(path)).items() if k.startswith(ENCODER_PREFIX)}
    if not state:
        raise CheckpointError(f"{path}: holds no {ENCODER_PREFIX}* weights to initialize the encoder from")
    missing, unexpected = system.posterior.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{path}: encoder weights do not match the config's posterior "
                              f"(missing {missing[:5]}, unexpected {unexpected[:5]})")
    return len(state)


def pretrain_then_train(config: Config, out_dir: str | Path, pretrain_epochs: int, resume: bool = False,
                        progress: bool | None = None) -> dict[str, Any]:
    """Stage 1 into ``out_dir/pretrain``, stage 2 (the row) into ``out_dir``; returns stage 2's summary."""
    out = Path(out_dir)
    stage1 = out / "pretrain"
    done = stage1 / "pretrain_done"
    if not done.exists():
        resume1 = (stage1 / "checkpoints" / "latest.json").exists()
        Trainer(autoencoder_config(config, pretrain_epochs), stage1, resume=resume1, progress=progress).fit()
        atomic_write_text(done, "stage 1 finished\n")
    resume2 = resume or (out / "checkpoints" / "latest.json").exists()
    return EncoderInitializedTrainer(config, out, stage1 / "model.safetensors", resume=resume2,
                                     progress=progress).fit()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("config")
    parser.add_argument("--out", required=True)
    parser.add_argument("--pretrain-epochs", type=int, default=5)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--quiet", action="store_true")
    args = parser.parse_args(argv)
    summary = pretrain_then_train(load_config(args.config, args.set), args.out, args.pretrain_epochs,
                                  progress=not args.quiet)
    print(summary)


if __name__ == "__main__":  # pragma: no cover
    main()
