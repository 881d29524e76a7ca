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

from rfc.cache.fused import TaylorBankMethod
from rfc.cache.registry import method_config
from rfc.cache.schedules import require
from rfc.samplers.sampling import StepInfo


@method_config("fora")
@dataclass
class FORAConfig:
    _target_: str = "baselines.fora.FORA"
    interval: int = 3
    fused: bool = True
    degenerate: ClassVar[tuple[str, ...]] = ("method.interval=1",)  # every step full


class FORA(TaylorBankMethod):
    name = "fora"

    def __init__(self, interval: int = 3, fused: bool = True) -> None:
        require(isinstance(interval, int) and interval >= 1, f"method.interval must be an integer >= 1, got {interval}")
        super().__init__()
        self.interval = interval
        self.fused = bool(fused)

    def reset(self) -> None:
        super().reset()
        self.make_bank(0, None)  # order 0: the outputs, in their own dtype

    def decide(self, step: StepInfo) -> bool:
        if self.counting == "up":  # official FLUX code: full at step 0, then every N steps after it
            return step.index % self.interval == 0
        return step.index == 0 or step.down_index % self.interval == 0

    def params(self) -> dict[str, object]:
        return {"interval": self.interval}
