"""MagCache (Ma et al., 2025, "MagCache: Fast Video Generation with Magnitude-Aware Cache"), on the
block-level protocol.

Followed: Zehong-Ma/MagCache at 1a66b6d, MagCache4FLUX/magcache_flux.py (``magcache_forward``, its
settings below the function):

- the schedule reads the step alone: per step a magnitude ratio ``mag_ratios[i]`` (calibrated
  offline: the mean ratio of the norms of consecutive steps' residuals; FLUX.1-dev's 28 are the
  default), interpolated to the run's step count by nearest neighbour;
- from step ``int(retention_ratio * num_steps + 0.5)`` on, each step multiplies the accumulated
  ratio by its own, counts one more accumulated step and adds |1 - accumulated ratio| to the
  accumulated error; the step is skipped while that error is <= ``threshold``, at most
  ``max_skip_steps`` (the official ``K``) accumulated steps, and the step is not one of
  ``keep_steps`` (the official FLUX code never skips step 11 of its 28: the step index mapped to the
  ratios' scale, round(i * (len(mag_ratios) - 1) / (num_steps - 1))); otherwise it computes and the
  three accumulators restart (ratio 1, steps 0, error 0);
- a skipped step adds the residual of every block (stream after the last block minus the stream
  entering the first) of the last computed step.

Defaults are the official FLUX settings: threshold 0.24, K 5, retention ratio 0.1. Two guards of the
harness's: a step before any computed one is computed (the official code would add a residual it
does not have yet, with a retention of 0), and ``max_skip_steps`` 0 is full compute (the method's
full-compute setting; a threshold of 0 is not one, since ratios of exactly 1 add no error). On
flux-tiny, with ``keep_steps=[]``, it makes diffusers' MagCache hook's decisions and latents bit for
bit (tests/test_peers.py); diffusers keeps no protected step and accumulates in float32, the official
code and this one in float64.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from rfc.cache.blocks import BlockCacheMethod, BlockSchedule, ResidualReuse, Signal
from rfc.cache.registry import method_config
from rfc.cache.schedules import require, require_int
from rfc.samplers.sampling import StepInfo

# The official FLUX.1-dev ratios (MagCache4FLUX/magcache_flux.py), 28 steps, step 0's set to 1.
FLUX_RATIOS = (1.0, 1.21094, 1.11719, 1.07812, 1.0625, 1.03906, 1.03125, 1.03906, 1.02344, 1.03125, 1.02344, 0.98047,
               1.01562, 1.00781, 1.0, 1.00781, 1.0, 1.00781, 1.0, 1.0, 0.99609, 0.99609, 0.98047, 0.98828, 0.96484,
               0.95703, 0.93359, 0.89062)


@method_config("magcache")
@dataclass
class MagCacheConfig:
    _target_: str = "baselines.magcache.MagCache"
    threshold: float = 0.24
    max_skip_steps: int = 5
    retention_ratio: float = 0.1
    mag_ratios: list[float] = field(default_factory=lambda: list(FLUX_RATIOS))
    keep_steps: list[int] = field(default_factory=lambda: [11])
    degenerate: ClassVar[tuple[str, ...]] = ("method.max_skip_steps=0",)


def nearest(ratios: tuple[float, ...], n: int) -> list[float]:
    """``ratios`` resampled to ``n`` steps by nearest neighbour (round half to even, as numpy)."""
    if n == 1:
        return [ratios[-1]]
    scale = (len(ratios) - 1) / (n - 1)
    return [ratios[round(i * scale)] for i in range(n)]


class MagnitudeSchedule(BlockSchedule):
    """The official skip rule (see the module docstring)."""

    signal = Signal.STEP

    def __init__(self, threshold: float, max_skip_steps: int, retention_ratio: float, mag_ratios: list[float],
                 keep_steps: list[int]) -> None:
        self.threshold, self.max_skip, self.retention = float(threshold), max_skip_steps, float(retention_ratio)
        self.ratios = tuple(float(r) for r in mag_ratios)
        self.keep = tuple(int(k) for k in keep_steps)
        self.reset()

    def reset(self) -> None:
        self.ratio, self.steps, self.error = 1.0, 0, 0.0
        self.computed = False

    def decide(self, step: StepInfo, signal: object = None) -> bool:
        n, i = step.num_steps, step.index
        skip = False
        if i >= int(self.retention * n + 0.5):
            scale = nearest(self.ratios, n)[i]
            self.ratio *= scale
            self.steps += 1
            self.error += abs(1 - self.ratio)
            mapped = round(i * ((len(self.ratios) - 1) / (n - 1))) if n > 1 else 0
            if self.error <= self.threshold and self.steps <= self.max_skip and mapped not in self.keep:
                skip = self.computed  # the harness's guard: nothing to reuse before a computed step
            else:
                self.ratio, self.steps, self.error = 1.0, 0, 0.0
        self.computed = self.computed or not skip
        return not skip

    def params(self) -> dict[str, object]:
        return {"threshold": self.threshold, "max_skip_steps": self.max_skip, "retention_ratio": self.retention,
                "mag_ratios": list(self.ratios), "keep_steps": list(self.keep)}


class MagCache(BlockCacheMethod):
    name = "magcache"

    def __init__(self, threshold: float = 0.24, max_skip_steps: int = 5, retention_ratio: float = 0.1,
                 mag_ratios: list[float] | None = None, keep_steps: list[int] | None = None) -> None:
        ratios = list(FLUX_RATIOS) if mag_ratios is None else list(mag_ratios)
        keep = [11] if keep_steps is None else list(keep_steps)
        require(float(threshold) >= 0.0, f"method.threshold must be >= 0, got {threshold}")
        require_int(max_skip_steps, "method.max_skip_steps", 0)
        require(0.0 <= float(retention_ratio) <= 1.0,
                f"method.retention_ratio must be in [0, 1], got {retention_ratio}")
        require(len(ratios) > 0 and all(isinstance(r, (int, float)) and math.isfinite(r) and r > 0 for r in ratios),
                f"method.mag_ratios must be a non-empty list of positive numbers, got {ratios}")
        require(all(isinstance(k, int) for k in keep), f"method.keep_steps must be a list of integers, got {keep}")
        super().__init__(MagnitudeSchedule(threshold, max_skip_steps, retention_ratio, ratios, keep),
                         ResidualReuse(start=0))
