"""FORA (Selvaraju et al., 2024): reuse each block's attention and MLP outputs between full steps.

Official rule: a step is full when it is the first step or its down-counting index is a multiple
of N (``interval``; the official code calls it a "threshold"). Cached steps return the stored
branch outputs unchanged; the current step's gates are applied to them as usual.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from rfc.cache.base import BranchInput, CacheMethod, Site
from rfc.cache.schedules import require
from rfc.samplers.sampling import StepInfo


class FORA(CacheMethod):
    name = "fora"

    def __init__(self, interval: int = 3) -> None:
        require(isinstance(interval, int) and interval >= 1, f"method.interval must be an integer >= 1, got {interval}")
        super().__init__()
        self.interval = interval
        self.cache: dict[Site, torch.Tensor] = {}

    def reset(self) -> None:
        super().reset()
        self.cache = {}

    def decide(self, step: StepInfo) -> bool:
        return step.index == 0 or step.down_index % self.interval == 0

    def store(self, site: Site, inp: BranchInput, out: torch.Tensor) -> None:
        self.cache[site] = out

    def predict(self, site: Site, inp: BranchInput) -> torch.Tensor:
        return self.cache[site]

    def cache_tensors(self) -> Iterable[torch.Tensor]:
        return self.cache.values()

    def params(self) -> dict[str, object]:
        return {"interval": self.interval}
