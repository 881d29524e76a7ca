"""DBCache (cache-dit's "dual block cache"), on the block-level protocol.

Followed: vipshop/cache-dit 1.5.3, src/cache_dit/caching/cache_blocks/pattern_base.py
(``CachedBlocks_Pattern_Base.forward``, ``call_Fn_blocks`` / ``call_Mn_blocks`` / ``call_Bn_blocks``)
and caching/cache_contexts/cache_manager.py (``can_cache``, ``similarity``), cache_context.py
(``warmup_steps``, ``mark_step_begin``, ``add_cached_step``):

- the first ``front`` blocks (cache-dit's ``Fn_compute_blocks``) and the last ``back`` blocks
  (``Bn_compute_blocks``) run at every step; the blocks between are the cached run;
- the signal is the front blocks' residual, (stream after them) - (stream entering block 0), on the
  image tokens (cache-dit's ``hidden_states``; its FLUX adapter keeps text and image apart);
- a step is cached when, in this order: it is not a warm-up step (``range(0, warmup,
  warmup_interval)``: with an interval above 1 the steps between warm-up steps may be cached); fewer
  than ``max_cached_steps`` steps were cached so far (-1: no limit); fewer than
  ``max_continuous_cached_steps`` in a row just before (-1: no limit); ``threshold`` > 0; a
  reference exists; and either ``threshold`` >= 1 (cache-dit then caches without measuring) or
  mean |r - r_ref| / mean |r_ref| < ``threshold``, with r_ref the front residual of the last step
  that computed the cached run (replaced only then, as First-Block Cache's);
- a cached step adds the cached run's last residual, (stream after it) - (stream entering it), to
  the stream the front blocks produced, then runs the back blocks.

With ``front`` 1, ``back`` 0 and no warm-up this is First-Block Cache, and on flux-tiny both equal
cache-dit's own DBCache bit for bit (tests/test_peers.py), as does this method at other settings
(front and back blocks, warm-up intervals, step limits). Not carried over: cache-dit's TaylorSeer
calibrator (the peer ``method=cache-dit/dbcache_taylorseer`` runs it), its step masks, its separate
CFG handling (the harness's FLUX and HunyuanVideo are guidance-distilled), ``downsample_factor`` and
the important-token condition (both off by default there).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from rfc.cache.blocks import BlockCacheMethod, BlockSchedule, ResidualReuse, Signal, relative_l1
from rfc.cache.registry import method_config
from rfc.cache.schedules import require, require_int, scope_params
from rfc.samplers.sampling import StepInfo


@method_config("dbcache")
@dataclass
class DBCacheConfig:
    _target_: str = "baselines.dbcache.DBCache"
    front: int = 1  # cache-dit's Fn_compute_blocks (its default 8 exceeds the tiny models' 5 blocks)
    back: int = 0  # Bn_compute_blocks
    threshold: float = 0.08  # residual_diff_threshold
    warmup: int = 8  # max_warmup_steps
    warmup_interval: int = 1
    max_cached_steps: int = -1
    max_continuous_cached_steps: int = -1
    schedule_scope: str = "batch"
    degenerate: ClassVar[tuple[str, ...]] = ("method.threshold=0",)  # threshold <= 0 never caches


class FrontResidualChange(BlockSchedule):
    """cache-dit's ``can_cache`` (see the module docstring) on the front blocks' residual."""

    signal = Signal.RESIDUAL

    def __init__(self, threshold: float, warmup: int, warmup_interval: int, max_cached_steps: int,
                 max_continuous_cached_steps: int) -> None:
        self.threshold = float(threshold)
        self.warmup, self.warmup_interval = warmup, warmup_interval
        self.max_cached, self.max_continuous = max_cached_steps, max_continuous_cached_steps
        self.reset()

    def reset(self) -> None:
        self.reference: torch.Tensor | None = None
        self.cached: list[int] = []
        self.continuous = 0

    def can_cache(self, step: StepInfo, signal: torch.Tensor) -> bool:
        if step.index in range(0, self.warmup, self.warmup_interval):
            return False
        if 0 <= self.max_cached <= len(self.cached):
            return False
        if 0 <= self.max_continuous <= self.continuous:
            return False
        if self.threshold <= 0.0 or self.reference is None:
            return False
        if self.threshold >= 1.0:  # cache-dit: "always similar", no measure taken
            return True
        return relative_l1(signal, self.reference) < self.threshold

    def decide(self, step: StepInfo, signal: torch.Tensor | None) -> bool:
        assert signal is not None
        if not self.cached or self.cached[-1] != step.index - 1:  # a computed step breaks the streak
            self.continuous = 0
        if self.can_cache(step, signal):
            self.cached.append(step.index)
            self.continuous += 1
            return False
        self.reference = signal
        return True

    def params(self) -> dict[str, object]:
        return {"threshold": self.threshold, "warmup": self.warmup, "warmup_interval": self.warmup_interval,
                "max_cached_steps": self.max_cached, "max_continuous_cached_steps": self.max_continuous}

    def tensors(self) -> Iterable[torch.Tensor]:
        return () if self.reference is None else (self.reference,)


class DBCache(BlockCacheMethod):
    name = "dbcache"

    def __init__(self, front: int = 1, back: int = 0, threshold: float = 0.08, warmup: int = 8,
                 warmup_interval: int = 1, max_cached_steps: int = -1, max_continuous_cached_steps: int = -1,
                 schedule_scope: str = "batch") -> None:
        for key, value, low in (("front", front, 1), ("back", back, 0), ("warmup", warmup, 0),
                                ("warmup_interval", warmup_interval, 1), ("max_cached_steps", max_cached_steps, -1),
                                ("max_continuous_cached_steps", max_continuous_cached_steps, -1)):
            require_int(value, f"method.{key}", low)
        require(float(threshold) >= 0.0, f"method.threshold must be >= 0, got {threshold}")
        schedule = FrontResidualChange(threshold, warmup, warmup_interval, max_cached_steps,
                                       max_continuous_cached_steps)
        super().__init__(schedule, ResidualReuse(start=front, back=back), scope=schedule_scope)

    def attach(self, model: nn.Module) -> None:
        blocks, front, back = len(model.blocks), self.predictor.start, self.predictor.back
        require(front + back < blocks, f"method.front + method.back = {front + back} leaves no block "
                f"of the model's {blocks} to cache")
        super().attach(model)

    def params(self) -> dict[str, object]:
        return {"front": self.predictor.start, "back": self.predictor.back, **self.schedule.params(),
                **scope_params(self.scope)}
