"""The learners the training loop calls: ``train.learner`` picks one (``LEARNERS``).

- ``gradient``: one optimizer step on the objective's loss per batch (with the aggressive
  encoder phase when configured) — every model and objective;
- ``em``: closed-form EM (:class:`latentlm.inference.em.EMLearner`; M1, M5);
- ``gem``: generalized EM (:class:`latentlm.inference.em.GEMLearner`; M5, M6).
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from latentlm.device import module_device
from latentlm.errors import ConfigError, TrainingDivergedError
from latentlm.inference.base import Learner, ObjectiveOutput
from latentlm.inference.em import EMLearner, GEMLearner
from latentlm.nn.gradients import clipped_step, gradient_norm
from latentlm.precision import autocast


class GradientLearner(Learner):
    """Today's training step: forward, backward, clip, optimizer step; a non-finite loss or
    gradient norm stops the run (the last good checkpoint is kept)."""

    def __init__(self, system, optimizer: torch.optim.Optimizer, forward=None, aggressive=None, clip: float = 0.0,
                 precision: str = "fp32", seed: int = 0, checkpoint_dir: Path | None = None):
        self.system, self.optimizer = system, optimizer
        self.forward = forward or system  # DDP wraps the system
        self.aggressive, self.clip, self.precision, self.seed = aggressive, clip, precision, seed
        self.checkpoint_dir = checkpoint_dir
        self.device = module_device(system)  # the trainer moved the system before building the learner

    def step(self, batch, step: int, sample_batch=None) -> ObjectiveOutput:
        if self.aggressive is not None and self.aggressive.active:
            rng = random.Random(self.seed * 7919 + step)  # encoder batches: a function of the step
            with autocast(self.precision, self.device):
                self.aggressive.train_encoder(self.forward, batch, lambda: sample_batch(rng), step)
        with autocast(self.precision, self.device):
            out = self.forward(batch, step)
        loss = out.loss
        self.optimizer.zero_grad(set_to_none=True)
        if torch.isfinite(loss):
            loss.backward()
            if self.aggressive is not None:
                self.aggressive.before_optimizer_step()
            params = [p for p in self.system.parameters() if p.grad is not None]
            grad_norm = gradient_norm(params)
        if not (torch.isfinite(loss) and torch.isfinite(grad_norm)):
            what = "loss" if not torch.isfinite(loss) else "gradient norm"
            raise TrainingDivergedError(
                f"{what} is not finite at step {step + 1}; the last good checkpoint in {self.checkpoint_dir} "
                f"is kept: resume with --resume and a lower train.lr or train.clip")
        clipped_step(self.optimizer, params, grad_norm, self.clip)
        return out


LEARNERS = {"gradient": GradientLearner, "em": EMLearner, "gem": GEMLearner}


def make_learner(config, system, optimizer, forward=None, aggressive=None, checkpoint_dir: Path | None = None
                 ) -> Learner:
    t = config.train
    if t.learner not in LEARNERS:
        raise ConfigError(f"train.learner must be one of {sorted(LEARNERS)}, got {t.learner!r}")
    if t.learner == "gradient":
        if t.em:
            raise ConfigError("train.em options need train.learner: em or gem")
        return GradientLearner(system, optimizer, forward, aggressive, t.clip, t.precision, config.seed,
                               checkpoint_dir)
    if aggressive is not None:
        raise ConfigError(f"train.aggressive needs train.learner: gradient, not {t.learner!r}")
    return LEARNERS[t.learner](system, optimizer, t.em, seed=config.seed, clip=t.clip)
