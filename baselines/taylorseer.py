"""TaylorSeer (Liu et al., 2025): predict skipped branch outputs with a Taylor expansion whose
derivatives are finite differences over the full steps.

Schedule: the first ``warmup`` steps are full (official: 2 on DiT, 3 on FLUX; ``warmup=null``, the
default, takes the attached model's), then one full step every N
(``interval``) steps. Each site keeps factors {0: F, i: (factor_{i-1} - previous factor_{i-1}) / d}
up to order m (``order``; 0 = plain reuse), stored in ``storage_dtype`` (fp32 by default) in one
buffer for all sites. With ``fused`` (default) a cached step is one weighted sum of that buffer
(rfc/cache/fused.py); ``fused=false`` predicts site by site inside the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from rfc.cache.fused import TaylorBankMethod
from rfc.cache.predictors import TaylorPredictor, parse_storage_dtype
from rfc.cache.registry import method_config
from rfc.cache.schedules import WarmupInterval, require

OFFICIAL_WARMUP = {"down": 2, "up": 3}  # first_enhance of the official DiT code (counts down) and FLUX code (up)


@method_config("taylorseer")
@dataclass
class TaylorSeerConfig:
    _target_: str = "baselines.taylorseer.TaylorSeer"
    interval: int = 4
    order: int = 4
    warmup: int | None = None
    storage_dtype: str = "fp32"
    fused: bool = True
    degenerate: ClassVar[tuple[str, ...]] = ("method.interval=1",)  # a full step every step after the warm-up too


class TaylorSeer(TaylorBankMethod):
    """TaylorSeer: a ``WarmupInterval`` schedule and a ``TaylorPredictor`` of order m."""

    name = "taylorseer"

    def __init__(self, interval: int = 4, order: int = 4, warmup: int | None = None, storage_dtype: str = "fp32",
                 fused: bool = True) -> None:
        require(isinstance(order, int) and order >= 0, f"method.order must be an integer >= 0, got {order}")
        require(warmup is None or (isinstance(warmup, int) and warmup >= 0),
                f"method.warmup must be an integer >= 0 or null (the model's official warm-up), got {warmup}")
        super().__init__()
        self.warmup = warmup
        self.schedule = WarmupInterval(interval, OFFICIAL_WARMUP["down"] if warmup is None else warmup)
        self.order = order
        self.storage = storage_dtype
        self.dtype = parse_storage_dtype(storage_dtype)
        self.predictor = TaylorPredictor(order, self.dtype)
        self.fused = bool(fused)

    def attach(self, model: torch.nn.Module) -> None:
        if self.warmup is None:  # the official code's first_enhance for this model's family
            self.schedule.warmup = OFFICIAL_WARMUP[getattr(model, "step_counting", "down")]
        super().attach(model)

    def reset(self) -> None:
        super().reset()
        self.schedule.reset()
        self.make_bank(self.order, self.dtype)
        # The official code computes derivatives only from step first_enhance - 1 on (DiT: down-counting
        # step < T - first_enhance + 1; FLUX: step > first_enhance - 2), i.e. from forward index warmup - 1:
        # earlier warm-up steps keep the output alone. With the DiT recipe's warmup 2 that is every step.
        self.bank.restart_below = self.schedule.warmup - 1

    def params(self) -> dict[str, object]:
        return {"interval": self.schedule.interval, "order": self.order, "warmup": self.schedule.warmup,
                "storage_dtype": self.storage}
