"""KL weight schedules beta(step) for the ELBO (KL annealing, Bowman et al. 2016; cyclical, Fu et al. 2019)."""

from __future__ import annotations

from dataclasses import dataclass

from latentlm.errors import ConfigError


@dataclass(frozen=True)
class ConstantSchedule:
    value: float = 1.0

    def __call__(self, step: int) -> float:
        return self.value


@dataclass(frozen=True)
class LinearSchedule:
    """From ``start`` to ``end`` linearly over ``steps`` updates, then constant."""

    start: float = 0.1
    end: float = 1.0
    steps: int = 10_000

    def __call__(self, step: int) -> float:
        if self.steps <= 0:
            return self.end
        frac = min(1.0, step / self.steps)
        return self.start + frac * (self.end - self.start)


@dataclass(frozen=True)
class CyclicalSchedule:
    """``cycles`` repetitions of a ramp 0 -> ``end`` over the first ``ratio`` of each period
    of ``period`` steps, then hold at ``end``; after the last cycle, stay at ``end``.
    """

    period: int = 5_000
    cycles: int = 4
    ratio: float = 0.5
    end: float = 1.0

    def __call__(self, step: int) -> float:
        if step >= self.period * self.cycles:
            return self.end
        pos = (step % self.period) / self.period
        return self.end * min(1.0, pos / self.ratio)


SCHEDULES = {"constant": ConstantSchedule, "linear": LinearSchedule, "cyclical": CyclicalSchedule}


def make_schedule(spec: float | dict | None):
    """``1.0`` / ``{"type": "linear", "steps": 2000}`` / None (constant 1) -> schedule."""
    if spec is None:
        return ConstantSchedule(1.0)
    if isinstance(spec, (int, float)):
        return ConstantSchedule(float(spec))
    spec = dict(spec)
    kind = spec.pop("type", "constant")
    if kind not in SCHEDULES:
        raise ConfigError(f"unknown KL schedule {kind!r}; choose one of {sorted(SCHEDULES)}")
    try:
        return SCHEDULES[kind](**spec)
    except TypeError as err:
        raise ConfigError(f"KL schedule {kind!r}: {err}") from None
