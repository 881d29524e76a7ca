"""Step-level schedules ("full or cached") shared by several methods."""

from __future__ import annotations

from rfc.samplers.sampling import StepInfo


def require(condition: bool, message: str) -> None:
    """Config validation: raise a ValueError that names the offending key."""
    if not condition:
        raise ValueError(message)


class WarmupInterval:
    """TaylorSeer's rule: the first ``warmup`` steps are full, then one full step every
    ``interval`` steps, counted from the last full step (no forced final steps). The first step
    is always full: nothing is cached before it."""

    def __init__(self, interval: int, warmup: int) -> None:
        require(interval >= 1, f"method.interval must be >= 1, got {interval}")
        require(warmup >= 0, f"method.warmup must be >= 0, got {warmup}")
        self.interval, self.warmup = interval, warmup
        self.last_full: int | None = None

    def reset(self) -> None:
        self.last_full = None

    def __call__(self, step: StepInfo) -> bool:
        full = (step.index == 0 or step.index < self.warmup or self.last_full is None
                or step.index - self.last_full >= self.interval)
        if full:
            self.last_full = step.index
        return full
