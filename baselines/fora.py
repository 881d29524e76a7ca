"""FORA (Selvaraju et al., 2024): reuse each block's attention and MLP outputs between full steps.

Official rule (DiT): a step is full when it is the first step or its down-counting index is a
multiple of N (``interval``; the official code calls it a "threshold"). The official FLUX code
counts steps up instead: full at step 0 and every N steps after it (the model's
``step_counting``). Cached steps return the stored branch outputs unchanged; the current step's
gates are applied to them as usual. With ``fused`` (default) a cached step is one gated sum of
the stored outputs (rfc/cache/fused.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from rfc.cache.fused import TaylorBankMethod
from rfc.cache.predictors import TaylorPredictor
from rfc.cache.registry import method_config
from rfc.cache.schedules import EveryN


@method_config("fora")
@dataclass
class FORAConfig:
    _target_: str = "baselines.fora.FORA"
    interval: int = 3
    fused: bool = True
    degenerate: ClassVar[tuple[str, ...]] = ("method.interval=1",)  # every step full


class FORA(TaylorBankMethod):
    """FORA: an ``EveryN`` schedule and a ``TaylorPredictor`` of order 0 (the outputs reused)."""

    name = "fora"

    def __init__(self, interval: int = 3, fused: bool = True) -> None:
        super().__init__()
        self.schedule = EveryN(interval)  # validates the interval
        self.predictor = TaylorPredictor(0, None)  # order 0: the outputs, in their own dtype
        self.interval = interval
        self.fused = bool(fused)

    def attach(self, model: nn.Module) -> None:
        super().attach(model)
        self.schedule.counting = self.counting  # the official code of this model's family counts so

    def reset(self) -> None:
        super().reset()
        self.make_bank(0, None)  # order 0: the outputs, in their own dtype

    def params(self) -> dict[str, object]:
        return {"interval": self.interval}
