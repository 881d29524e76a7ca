"""TeaCache (Liu et al., 2025, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion
Model"), on the block-level protocol.

Followed: ali-vilab/TeaCache, TeaCache4FLUX/teacache_flux.py (``teacache_forward``):

- the signal is block 0's timestep-modulated input, modulate(norm(x), shift, scale) of its
  attention branch (FLUX: ``transformer_blocks[0].norm1(hidden_states, emb=temb)``), computed
  at every step before any block runs;
- rel_l1 = mean |inp - prev_inp| / mean |prev_inp| over the whole batch tensor, rescaled by the
  polynomial ``np.poly1d(coefficients)`` and accumulated; while the accumulated value is below
  ``threshold`` (the official ``rel_l1_thresh``) the step reuses the residual, otherwise it
  computes and the accumulator returns to 0;
- the first and the last step always compute (and reset the accumulator);
- ``prev_inp`` is replaced at **every** step, cached or not;
- on FLUX the input is measured on the image tokens only (the official code's
  ``transformer_blocks[0].norm1`` reads the image stream), and the reused residual covers the
  whole stream;
- the residual covers all blocks: at a full step (stream after the last block) - (stream entering
  block 0), added at a cached step to the stream entering block 0.

What differs on DiT: the official repository fits ``coefficients`` per model (FLUX:
[498.65, -283.78, 55.86, -3.82, 0.264], mapping the input's relative change to the output's) and
ships none for DiT-XL/2 or this harness's models. The default here is [1.0, 0.0], the identity:
the raw relative L1 change of the modulated input is accumulated, which is TeaCache's criterion
before its model-specific calibration (a fitted polynomial only rescales it; with the identity
``threshold`` is directly a budget of accumulated input change). Fitted coefficients are a
config key (``method.coefficients=[...]``, highest power first, as np.poly1d takes them). The
default threshold 0.045 (not FLUX's 0.25 - 0.8, which are in its rescaled units) gives NFC 15 of
50 on the tiny digits model (DDIM-50, guidance 1.5), as First-Block Cache's default 0.08 does
there; 0.03 gives 19, 0.048 gives 14. The change is measured over the guided batch
(both halves of classifier-free guidance), so one decision covers the batch, as the official code
decides for the batch it is given. Checking the input costs one more modulation of block 0 and
one more layer norm of its input at every step; the accounting counts both. ``threshold`` 0
computes every step whatever the coefficients (officially a polynomial that goes negative could
still skip steps): it is the method's full-compute setting.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np
import torch

from rfc.cache.blocks import BlockCacheMethod, BlockSchedule, ResidualReuse, Signal, relative_l1
from rfc.cache.registry import method_config
from rfc.cache.schedules import require
from rfc.samplers.sampling import StepInfo

IDENTITY = (1.0, 0.0)


@method_config("teacache")
@dataclass
class TeaCacheConfig:
    _target_: str = "baselines.teacache.TeaCache"
    threshold: float = 0.045
    coefficients: list[float] = field(default_factory=lambda: list(IDENTITY))
    schedule_scope: str = "batch"
    degenerate: ClassVar[tuple[str, ...]] = ("method.threshold=0",)  # threshold <= 0 never skips


class AccumulatedInputChange(BlockSchedule):
    """Accumulate the rescaled relative change of block 0's modulated input; compute when the sum
    reaches ``threshold`` (then restart it), and at the first and last steps."""

    signal = Signal.INPUT

    def __init__(self, threshold: float, coefficients: Iterable[float]) -> None:
        self.threshold = float(threshold)
        self.coefficients = [float(a) for a in coefficients]
        self.rescale = np.poly1d(self.coefficients)
        self.previous: torch.Tensor | None = None
        self.accumulated = 0.0

    def reset(self) -> None:
        self.previous = None
        self.accumulated = 0.0

    def decide(self, step: StepInfo, signal: torch.Tensor | None) -> bool:
        assert signal is not None
        # threshold <= 0 computes every step whatever the coefficients (a fitted polynomial can go
        # negative; the official rule would then skip): the method's full-compute setting
        forced = step.index == 0 or step.index == step.num_steps - 1 or self.previous is None
        if forced or self.threshold <= 0.0:
            full = True
            self.accumulated = 0.0
        else:
            self.accumulated += float(self.rescale(relative_l1(signal, self.previous)))
            full = not self.accumulated < self.threshold
            if full:
                self.accumulated = 0.0
        self.previous = signal
        return full

    def params(self) -> dict[str, object]:
        return {"threshold": self.threshold, "coefficients": self.coefficients}

    def tensors(self) -> Iterable[torch.Tensor]:
        return () if self.previous is None else (self.previous,)


class TeaCache(BlockCacheMethod):
    name = "teacache"

    def __init__(self, threshold: float = 0.045, coefficients: list[float] | None = None,
                 schedule_scope: str = "batch") -> None:
        coefficients = list(IDENTITY) if coefficients is None else list(coefficients)
        require(float(threshold) >= 0.0, f"method.threshold must be >= 0, got {threshold}")
        require(
            len(coefficients) > 0
            and all(isinstance(a, (int, float)) and not isinstance(a, bool) and math.isfinite(a) for a in coefficients),
            f"method.coefficients must be a non-empty list of finite numbers, got {coefficients}",
        )
        super().__init__(AccumulatedInputChange(threshold, coefficients), ResidualReuse(start=0), scope=schedule_scope)
