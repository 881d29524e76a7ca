"""TaylorSeer (Liu et al., 2025): predict skipped branch outputs with a Taylor expansion whose
derivatives are finite differences over the full steps.

Schedule: the first ``warmup`` steps are full (official: 2), then one full step every N
(``interval``) steps. Each site keeps factors {0: F, i: (factor_{i-1} - previous factor_{i-1}) / d}
up to order m (``order``; 0 = plain reuse), stored in ``storage_dtype`` (fp32 by default).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch

from rfc.cache.base import BranchInput, CacheMethod, Site
from rfc.cache.predictors import TaylorFactors, parse_storage_dtype
from rfc.cache.schedules import WarmupInterval, require
from rfc.samplers.sampling import StepInfo


class TaylorSeer(CacheMethod):
    name = "taylorseer"

    def __init__(self, interval: int = 4, order: int = 4, warmup: int = 2, storage_dtype: str = "fp32") -> None:
        require(isinstance(order, int) and order >= 0, f"method.order must be an integer >= 0, got {order}")
        super().__init__()
        self.schedule = WarmupInterval(interval, warmup)
        self.order = order
        self.storage = storage_dtype
        self.dtype = parse_storage_dtype(storage_dtype)
        self.factors: dict[Site, TaylorFactors] = {}

    def reset(self) -> None:
        super().reset()
        self.schedule.reset()
        self.factors = {}

    def decide(self, step: StepInfo) -> bool:
        return self.schedule(step)

    def store(self, site: Site, inp: BranchInput, out: torch.Tensor) -> None:
        self.factors.setdefault(site, TaylorFactors(self.order, self.dtype)).update(out, self.step.index)

    def predict(self, site: Site, inp: BranchInput) -> torch.Tensor:
        return self.factors[site].predict(self.step.index, inp.x.dtype)

    def cache_tensors(self) -> Iterable[torch.Tensor]:
        return (t for f in self.factors.values() for t in f.tensors())

    def params(self) -> dict[str, object]:
        return {"interval": self.schedule.interval, "order": self.order, "warmup": self.schedule.warmup,
                "storage_dtype": self.storage}

