"""The contract between the runner, the sampler and a caching method.

A method is a step listener (the sampler announces every step before the model call) that may
attach to a built model and must detach cleanly. The runner calls ``reset()`` before each
batch and reads ``stats()`` after it; it never branches on which method it holds.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from rfc.samplers.sampling import StepInfo


@dataclass
class MethodStats:
    """Accounting for one batch: how many steps ran the full network."""

    full_steps: int = 0
    cached_steps: int = 0

    @property
    def total_steps(self) -> int:
        return self.full_steps + self.cached_steps


class CacheMethod:
    """Base class: full compute at every step. Subclasses override what they change."""

    name = "base"

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self._stats = MethodStats()

    def attach(self, model: nn.Module) -> None:
        if self.model is not None:
            raise RuntimeError(f"method {self.name!r} is already attached to a model")
        self.model = model

    def detach(self) -> None:
        self.model = None

    def reset(self) -> None:
        """Forget everything cached; called before each batch."""
        self._stats = MethodStats()

    def begin_step(self, step: StepInfo) -> None:
        self._stats.full_steps += 1

    def end_step(self, step: StepInfo) -> None:
        pass

    def stats(self) -> MethodStats:
        return self._stats

    def params(self) -> dict[str, object]:
        """Hyperparameters recorded in the result row."""
        return {}


class NoCache(CacheMethod):
    """``method=none``: the full-compute reference every cached run is compared with."""

    name = "none"
