"""Posterior collapse, seen while it happens: one rule, used by the trainer (a warning after
validation) and by ``latentlm report`` (collapsed runs are marked).

A validation "looks collapsed" when KL(q(z|x) || p(z)) is below ``KL_THRESHOLD`` nats per
example and no latent unit is active (AU = 0; for a q without active units, a categorical
one, I_q(x; z) below ``MI_THRESHOLD`` nats). ``PATIENCE`` such validations in a row make a
collapse: a single one early in training, under a KL warm-up, is common and often recovers.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

KL_THRESHOLD = 0.1
MI_THRESHOLD = 0.01
PATIENCE = 2
REMEDIES = ("objective.free_bits", "objective.kl_schedule", "model.word_dropout", "train.aggressive",
            "train.pretrain_encoder_epochs")


def _number(value: Any) -> float | None:
    if value is None or value == "":
        return None
    return float(value)


def looks_collapsed(metrics: Mapping[str, Any]) -> bool:
    """Whether one validation's ``kl``, ``au`` (or ``mi``) say the code carries nothing."""
    kl = _number(metrics.get("kl"))
    if kl is None or kl >= KL_THRESHOLD:
        return False
    au, mi = _number(metrics.get("au")), _number(metrics.get("mi"))
    if au is not None:
        return au == 0
    return mi is not None and mi < MI_THRESHOLD


class CollapseWatch:
    """Fed each validation's metrics; ``update`` returns the warning once, at the
    ``PATIENCE``-th collapsed validation in a row, and None otherwise."""

    def __init__(self, patience: int = PATIENCE):
        self.patience, self.streak = patience, 0
        self.warned_at: int | None = None

    def state_dict(self) -> dict[str, Any]:
        """The streak and whether (where) it warned: in the trainer's checkpoint (``state.json``),
        so a resumed run neither warns a second time nor loses a streak under way."""
        return {"streak": self.streak, "warned_at": self.warned_at}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.streak = int(state.get("streak", 0))
        warned = state.get("warned_at")
        self.warned_at = None if warned is None else int(warned)

    def update(self, step: int, metrics: Mapping[str, Any]) -> str | None:
        self.streak = self.streak + 1 if looks_collapsed(metrics) else 0
        if self.streak < self.patience or self.warned_at is not None:
            return None
        self.warned_at = step
        return (f"step {step}: posterior collapse — validation KL {float(metrics['kl']):.3f} nats < {KL_THRESHOLD} "
                f"and no active unit at {self.patience} validations in a row; remedies in the config: "
                + ", ".join(REMEDIES))


def collapse_step(valid_rows: Iterable[Mapping[str, Any]]) -> int | None:
    """The step at which the trainer's warning fires for these validation rows (metrics.csv
    rows of split ``valid``, in order), or None if it never does."""
    watch = CollapseWatch()
    for row in valid_rows:
        if watch.update(int(row["step"]), row):
            return watch.warned_at
    return None
