"""The one schedule interface ("full or cached, at this step?") and the step-level schedules
shared by several methods.

Every caching method is a schedule plus a predictor (``rfc.cache.predictors.Predictor``). A
``Schedule`` decides once per step; what it reads to decide is its ``signal``, which fixes when
it can decide:

- ``Signal.STEP``: the step alone, before the model runs (FORA's every N, TaylorSeer's warm-up
  and interval, ToCa's recipes);
- ``Signal.INPUT``: block 0's modulated attention input, computed before any block runs (RFC's
  RCS, TeaCache);
- ``Signal.RESIDUAL``: block 0's residual, after block 0 ran (First-Block Cache).

The method computes the signal and passes it to ``decide(step, signal)``; the schedule keeps its
own state between steps and ``reset()`` forgets it before each batch.
"""

from __future__ import annotations

from collections.abc import Iterable
from enum import StrEnum

import torch

from rfc.samplers.sampling import StepInfo


def require(condition: bool, message: str) -> None:
    """Config validation: raise a ValueError that names the offending key."""
    if not condition:
        raise ValueError(message)


def require_int(value: object, key: str, low: int) -> None:
    """Config validation of an integer key (a bool is not one): raise a ValueError naming it."""
    require(isinstance(value, int) and not isinstance(value, bool) and value >= low,
            f"{key} must be an integer >= {low}, got {value}")


def timestep_window(window: object, key: str) -> tuple[float, float]:
    """A (low, high) timestep window of a config (PAB's and diffusers' attention hooks' skip ranges),
    checked with one line naming ``key``."""
    low_high = tuple(window)
    require(len(low_high) == 2 and all(isinstance(v, (int, float)) for v in low_high) and low_high[0] <= low_high[1],
            f"{key} must be [low, high] with low <= high, got {list(low_high)}")
    return float(low_high[0]), float(low_high[1])


SCOPES = ("batch", "sample")
"""schedule_scope: one decision per batch (what the official code does with the batch it is given),
or per sample (each sample decides alone; its guidance halves together)."""


def check_scope(scope: object) -> str:
    """``method.schedule_scope`` checked: one of SCOPES, or a ValueError naming the key."""
    require(scope in SCOPES, f"method.schedule_scope must be one of {list(SCOPES)}, got {scope!r}")
    return str(scope)


def scope_params(scope: str) -> dict[str, str]:
    """What a method's params say of its scope: nothing in batch scope (so its params, rows and
    calibration keys are what they were before sample scope existed), else the scope."""
    return {} if scope == "batch" else {"schedule_scope": scope}


class Signal(StrEnum):
    """What a schedule reads to decide, which fixes when it can decide."""

    STEP = "step"  # the StepInfo only: no tensor is computed for it
    INPUT = "input"  # block 0's modulated attention input, computed before any block runs
    RESIDUAL = "residual"  # block 0's output minus its input: needs block 0 computed first


class Schedule:
    """When to compute. Subclasses set ``signal`` and implement ``decide``.

    ``decide(step, signal)`` is asked once per step with the tensor named by ``signal`` (None for
    Signal.STEP) and returns True to compute the step in full. It must say "compute" at least once
    before the first cached step: nothing is cached before (every schedule here does so at the
    first step). Not an ABC with abstract methods on purpose: a subclass that only overrides
    ``signal`` is still constructible, so a method can reject it with a message naming the key."""

    signal: Signal = Signal.STEP

    def reset(self) -> None:
        """Forget every step seen (a new batch starts)."""

    def decide(self, step: StepInfo, signal: torch.Tensor | None = None) -> bool:
        raise NotImplementedError(f"{type(self).__name__} does not decide")

    def __call__(self, step: StepInfo, signal: torch.Tensor | None = None) -> bool:
        return self.decide(step, signal)

    def params(self) -> dict[str, object]:
        """The schedule's settings, recorded in the result row."""
        return {}

    def tensors(self) -> Iterable[torch.Tensor]:
        """Tensors the schedule keeps between steps (counted in the cache-memory column)."""
        return ()


class EveryN(Schedule):
    """FORA's rule: one full step every ``interval``. ``counting`` is how the model's official
    caching code counts steps (the model's ``step_counting``): "down" computes the first
    step and every step whose down-counting index is a multiple of N; "up" computes step 0
    and every N steps after it."""

    def __init__(self, interval: int, counting: str = "down") -> None:
        require(isinstance(interval, int) and interval >= 1,
                f"method.interval must be an integer >= 1, got {interval}")
        require(counting in ("down", "up"), f"step counting must be 'down' or 'up', got {counting!r}")
        self.interval, self.counting = interval, counting

    def decide(self, step: StepInfo, signal: torch.Tensor | None = None) -> bool:
        if self.counting == "up":
            return step.index % self.interval == 0
        return step.index == 0 or step.down_index % self.interval == 0

    def params(self) -> dict[str, object]:
        return {"interval": self.interval}


class WarmupInterval(Schedule):
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

    def decide(self, step: StepInfo, signal: torch.Tensor | None = None) -> bool:
        full = (step.index == 0 or step.index < self.warmup or self.last_full is None
                or step.index - self.last_full >= self.interval)
        if full:
            self.last_full = step.index
        return full

    def params(self) -> dict[str, object]:
        return {"interval": self.interval, "warmup": self.warmup}
