"""L9: aggressive inference-network training (He et al. 2019, "Lagging inference networks").

Early in training the encoder lags behind the true posterior and the decoder learns to
ignore z. The remedy: before each decoder update, update the *encoder only* on fresh
minibatches until its objective stops improving (an inner loop), and then make one
decoder-only update. Once the validation mutual information I_q(x; z) stops rising (or
after ``max_epochs``), training continues normally.

Self-contained: the trainer owns one :class:`AggressiveEncoderTraining` and calls

* :meth:`train_encoder` before its forward pass on each batch (inside autocast),
* :meth:`before_optimizer_step` between ``backward`` and ``optimizer.step()`` (drops the
  encoder's gradients so the shared optimizer updates the decoder only),
* :meth:`end_epoch` after each epoch (decides whether the aggressive phase goes on),
* :meth:`state_dict` / :meth:`load_state_dict` for checkpoints (and checkpoints
  ``encoder_optimizer`` with its own optimizer).

The stopping rule of the inner loop is the paper's: the per-token training loss summed
over windows of ``check_every`` encoder steps; stop when a window's loss is no lower than
the previous window's, or after ``max_inner_steps`` steps.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from latentlm.data.batching import Batch, TextDataset
from latentlm.errors import ConfigError
from latentlm.evaluation.latent import latent_statistics
from latentlm.nn.gradients import clip_gradients


@dataclass
class InnerLoopResult:
    steps: int                 # encoder updates made
    stopped_by: str            # "no improvement" | "max steps"
    window_losses: list[float]  # per-token loss of each completed window


class AggressiveEncoderTraining:
    """Aggressive phase of He et al. (2019) for a :class:`latentlm.system.System` with a posterior."""

    def __init__(self, system, lr: float = 1e-3, max_inner_steps: int = 100, check_every: int = 15,
                 max_epochs: int | None = None, stop_on_mi: bool = True, clip: float | None = 5.0,
                 optimizer: str = "adam", max_steps: int | None = None):
        if system.posterior is None:
            raise ConfigError("aggressive encoder training needs a model with a posterior q(z | x)")
        if max_inner_steps < 1 or check_every < 1:
            raise ConfigError(f"aggressive: max_inner_steps and check_every must be >= 1, "
                              f"got {max_inner_steps} and {check_every}")
        self.system = system
        self.encoder_params = [p for p in system.posterior.parameters() if p.requires_grad]
        optimizers = {"adam": torch.optim.Adam, "sgd": torch.optim.SGD}
        if optimizer not in optimizers:
            raise ConfigError(f"aggressive.optimizer must be one of {sorted(optimizers)}, got {optimizer!r}")
        self.encoder_optimizer = optimizers[optimizer](self.encoder_params, lr=lr)
        self.max_inner_steps, self.check_every = max_inner_steps, check_every
        self.max_epochs, self.stop_on_mi, self.clip = max_epochs, stop_on_mi, clip
        self.max_steps = max_steps
        self.active = True
        self.epochs_done = 0
        self.best_mi = -math.inf
        self.last_inner: InnerLoopResult | None = None

    @classmethod
    def from_config(cls, spec: dict[str, Any] | None, system, lr: float, clip: float | None):
        """``train.aggressive: {max_inner_steps: 100, check_every: 15, max_epochs: 5}`` -> instance, or None."""
        if not spec:
            return None
        spec = {"lr": lr, "clip": clip, **spec}
        try:
            return cls(system, **spec)
        except TypeError as err:
            raise ConfigError(f"train.aggressive: {err}") from None

    # -- the inner loop -----------------------------------------------------------------
    def train_encoder(self, forward: Callable[[Batch, int], Any], first_batch: Batch,
                      sample_batch: Callable[[], Batch], step: int) -> InnerLoopResult:
        """Encoder-only updates: on ``first_batch``, then on ``sample_batch()`` draws, until the
        windowed per-token loss stops improving. ``forward(batch, step)`` is the system's forward."""
        previous, window, window_tokens = math.inf, 0.0, 0
        windows: list[float] = []
        batch = first_batch
        for k in range(1, self.max_inner_steps + 1):
            out = forward(batch, step)
            self.encoder_optimizer.zero_grad(set_to_none=True)
            self.system.zero_grad(set_to_none=True)
            out.loss.backward()
            if self.clip:
                clip_gradients(self.encoder_params, self.clip)
            self.encoder_optimizer.step()
            window += float(out.loss.detach()) * batch.size
            window_tokens += batch.num_tokens
            if k % self.check_every == 0:
                current = window / max(1, window_tokens)
                windows.append(current)
                if current >= previous:
                    self.last_inner = InnerLoopResult(k, "no improvement", windows)
                    break
                previous, window, window_tokens = current, 0.0, 0
            batch = sample_batch()
        else:
            self.last_inner = InnerLoopResult(self.max_inner_steps, "max steps", windows)
        self.system.zero_grad(set_to_none=True)  # leave no encoder gradient behind for the main step
        return self.last_inner

    def before_optimizer_step(self) -> None:
        """While aggressive, the shared optimizer must update the decoder only: drop encoder grads
        (Adam and SGD skip parameters whose grad is None)."""
        if self.active:
            for p in self.encoder_params:
                p.grad = None

    # -- the phase ------------------------------------------------------------------------
    def continue_at(self, step: int) -> bool:
        """Call after each decoder step: ends the phase once ``max_steps`` decoder steps are done
        (a budget for short runs whose epochs are too long a unit); returns ``active``."""
        if self.active and self.max_steps is not None and step >= self.max_steps:
            self.active = False
        return self.active

    def end_epoch(self, valid_set: TextDataset | None = None, batch_size: int = 50, mi: float | None = None) -> bool:
        """Call after each epoch; returns whether the aggressive phase continues.

        Stops after ``max_epochs`` epochs, or (``stop_on_mi``) as soon as the validation
        mutual information is no higher than its best so far.
        """
        if not self.active:
            return False
        self.epochs_done += 1
        if self.stop_on_mi and (mi is not None or valid_set is not None):
            if mi is None:  # else: the trainer's validation of this step already measured it
                mi = validation_mutual_information(self.system, valid_set, batch_size)
            if mi <= self.best_mi:
                self.active = False
            self.best_mi = max(self.best_mi, mi)
        if self.max_epochs is not None and self.epochs_done >= self.max_epochs:
            self.active = False
        return self.active

    def state_dict(self) -> dict[str, Any]:
        """JSON-able phase state. The encoder optimizer's tensors are not here: the trainer
        checkpoints ``encoder_optimizer`` beside its own optimizer, so a resume is exact."""
        return {"active": self.active, "epochs_done": self.epochs_done, "best_mi": self.best_mi}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.active = bool(state["active"])
        self.epochs_done = int(state["epochs_done"])
        self.best_mi = float(state["best_mi"])


@torch.no_grad()
def validation_mutual_information(system, dataset: TextDataset, batch_size: int = 50, seed: int = 0) -> float:
    """I_q(x; z) over a split by :func:`latentlm.evaluation.latent.latent_statistics` (the one
    definition validation and evaluation use); 0 where the q has no MI estimate."""
    mi = latent_statistics(system, dataset, batch_size, seed)[0]["mi"]
    return 0.0 if mi is None else mi
