"""diffusers' cache hooks as methods (``method=diffusers/<hook>``): the implementations the field deploys,
measured under the harness's protocol (rfc/cache/peers.py: how a peer runs and how what it skipped is
counted).

diffusers (0.42) ships its caching methods as hooks on its own transformers
(``transformer.enable_cache(config)``). Each step here calls the transformer's forward inside the
pipeline's ``cache_context("cond")``, and the hooks' state is reset for every batch
(``_reset_stateful_cache``), as a diffusers pipeline does for every call. The hooks' settings are
diffusers' own, with diffusers' defaults; where a hook needs the sampler (the number of steps for
MagCache, the current timestep for Pyramid Attention Broadcast and FasterCache, the step index,
sigma and latents for SeaCache), the method hands it what the pipeline would. Where diffusers'
method differs from the paper's official code (its TaylorSeer: another schedule, attention only,
bf16 Taylor factors), the native method of the same name is the official one (docs/methods.md).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from rfc.cache.peers import PeerMethod
from rfc.cache.registry import method_config
from rfc.cache.schedules import require, require_int, timestep_window


def _config_class(name: str) -> Callable[..., object]:
    import diffusers.hooks as hooks

    return getattr(hooks, name)


class DiffusersHookMethod(PeerMethod):
    """A diffusers cache hook: subclasses give ``name`` and ``hook_config(num_steps)``."""

    library = "diffusers' cache hook"

    def hook_config(self, num_steps: int) -> object:
        raise NotImplementedError

    def apply(self, transformer: nn.Module, num_steps: int) -> None:
        transformer.enable_cache(self.hook_config(num_steps))

    def restart(self, transformer: nn.Module) -> None:
        transformer._reset_stateful_cache()

    def remove(self, transformer: nn.Module) -> None:
        transformer.disable_cache()

    def context(self, transformer: nn.Module) -> contextlib.AbstractContextManager:
        return transformer.cache_context("cond")


# ------------------------------------------------------------------------------------------------
# The hooks


@method_config("diffusers/first_block_cache")
@dataclass
class FirstBlockCacheConfig:
    """diffusers' FirstBlockCacheConfig: the blocks after the first are skipped while the first
    block's output residual (image tokens) changed by at most ``threshold`` (relative L1)."""

    _target_: str = "baselines.diffusers_hooks.FirstBlockCache"
    threshold: float = 0.05  # diffusers' default
    degenerate: ClassVar[tuple[str, ...]] = ("method.threshold=0",)  # computes whenever the residual changed


class FirstBlockCache(DiffusersHookMethod):
    name = "diffusers/first_block_cache"

    def __init__(self, threshold: float = 0.05) -> None:
        super().__init__()
        require(float(threshold) >= 0.0, f"method.threshold must be >= 0, got {threshold}")
        self.threshold = float(threshold)

    def hook_config(self, num_steps: int) -> object:
        return _config_class("FirstBlockCacheConfig")(threshold=self.threshold)

    def params(self) -> dict[str, object]:
        return {"threshold": self.threshold}


@method_config("diffusers/taylorseer_cache")
@dataclass
class TaylorSeerCacheConfig:
    """diffusers' TaylorSeerCacheConfig (not the official TaylorSeer: ``method=taylorseer`` is): the
    attention modules are computed for the first ``disable_cache_before_step`` calls and then every
    ``cache_interval``-th, and predicted by a Taylor expansion of order ``max_order`` between."""

    _target_: str = "baselines.diffusers_hooks.TaylorSeerCache"
    cache_interval: int = 5
    disable_cache_before_step: int = 3
    disable_cache_after_step: int | None = None
    max_order: int = 1
    taylor_factors_dtype: str = "bfloat16"  # diffusers' default
    use_lite_mode: bool = False
    degenerate: ClassVar[tuple[str, ...]] = ("method.cache_interval=1",)


class TaylorSeerCache(DiffusersHookMethod):
    name = "diffusers/taylorseer_cache"

    def __init__(self, cache_interval: int = 5, disable_cache_before_step: int = 3,
                 disable_cache_after_step: int | None = None, max_order: int = 1,
                 taylor_factors_dtype: str = "bfloat16", use_lite_mode: bool = False) -> None:
        super().__init__()
        require_int(cache_interval, "method.cache_interval", 1)
        require_int(max_order, "method.max_order", 0)
        dtype = getattr(torch, str(taylor_factors_dtype), None)
        require(isinstance(dtype, torch.dtype), f"method.taylor_factors_dtype must name a torch dtype, got "
                f"{taylor_factors_dtype!r}")
        self.settings = {"cache_interval": cache_interval, "disable_cache_before_step": int(disable_cache_before_step),
                         "disable_cache_after_step": disable_cache_after_step, "max_order": max_order,
                         "taylor_factors_dtype": str(taylor_factors_dtype), "use_lite_mode": bool(use_lite_mode)}
        self._dtype = dtype

    def hook_config(self, num_steps: int) -> object:
        return _config_class("TaylorSeerCacheConfig")(**{**self.settings, "taylor_factors_dtype": self._dtype})

    def params(self) -> dict[str, object]:
        return dict(self.settings)


@method_config("diffusers/mag_cache")
@dataclass
class MagCacheConfig:
    """diffusers' MagCacheConfig: every block skipped, the last residual reused, while the
    accumulated error of the magnitude ratios stays within ``threshold`` (at most
    ``max_skip_steps`` in a row, never in the first ``retention_ratio`` of the steps). ``mag_ratios``:
    ``flux`` (diffusers' FLUX.1 ratios, interpolated to the step count) or ``calibrate`` (diffusers'
    calibration pass: computes every step)."""

    _target_: str = "baselines.diffusers_hooks.MagCache"
    threshold: float = 0.06
    max_skip_steps: int = 3
    retention_ratio: float = 0.2
    mag_ratios: str = "flux"
    degenerate: ClassVar[tuple[str, ...]] = ("method.max_skip_steps=0",)


class MagCache(DiffusersHookMethod):
    name = "diffusers/mag_cache"

    def __init__(self, threshold: float = 0.06, max_skip_steps: int = 3, retention_ratio: float = 0.2,
                 mag_ratios: str = "flux") -> None:
        super().__init__()
        require(float(threshold) >= 0.0, f"method.threshold must be >= 0, got {threshold}")
        require_int(max_skip_steps, "method.max_skip_steps", 0)
        require(0.0 <= float(retention_ratio) <= 1.0,
                f"method.retention_ratio must be in [0, 1], got {retention_ratio}")
        require(mag_ratios in ("flux", "calibrate"), f"method.mag_ratios must be flux or calibrate, got {mag_ratios!r}")
        self.settings = {"threshold": float(threshold), "max_skip_steps": max_skip_steps,
                         "retention_ratio": float(retention_ratio), "mag_ratios": mag_ratios}

    def hook_config(self, num_steps: int) -> object:
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

        s = self.settings
        ratios = {"mag_ratios": FLUX_MAG_RATIOS} if s["mag_ratios"] == "flux" else {"calibrate": True}
        return _config_class("MagCacheConfig")(threshold=s["threshold"], max_skip_steps=s["max_skip_steps"],
                                               retention_ratio=s["retention_ratio"], num_inference_steps=num_steps,
                                               **ratios)

    def params(self) -> dict[str, object]:
        return dict(self.settings)


def _skip_and_window(skip: int, window: list[int] | tuple[int, int]) -> tuple[int, tuple[float, float]]:
    """The attention hooks' skip range and timestep window, checked (one line naming the key)."""
    require_int(skip, "method.spatial_attention_block_skip_range", 1)
    return skip, timestep_window(window, "method.spatial_attention_timestep_skip_range")


@method_config("diffusers/pyramid_attention_broadcast")
@dataclass
class PyramidAttentionBroadcastConfig:
    """diffusers' PyramidAttentionBroadcastConfig on the spatial (self-) attention of every block:
    while the pipeline's current timestep lies inside ``spatial_attention_timestep_skip_range``,
    an attention computes at every ``spatial_attention_block_skip_range``-th call and reuses its
    last output between."""

    _target_: str = "baselines.diffusers_hooks.PyramidAttentionBroadcast"
    spatial_attention_block_skip_range: int = 2
    spatial_attention_timestep_skip_range: list[int] = field(default_factory=lambda: [100, 800])
    degenerate: ClassVar[tuple[str, ...]] = ("method.spatial_attention_block_skip_range=1",)


class PyramidAttentionBroadcast(DiffusersHookMethod):
    name = "diffusers/pyramid_attention_broadcast"

    def __init__(self, spatial_attention_block_skip_range: int = 2,
                 spatial_attention_timestep_skip_range: list[int] | tuple[int, int] = (100, 800)) -> None:
        super().__init__()
        self.skip, self.window = _skip_and_window(spatial_attention_block_skip_range,
                                                  spatial_attention_timestep_skip_range)

    def hook_config(self, num_steps: int) -> object:
        return _config_class("PyramidAttentionBroadcastConfig")(
            spatial_attention_block_skip_range=self.skip, spatial_attention_timestep_skip_range=self.window,
            current_timestep_callback=self.current_timestep)

    def params(self) -> dict[str, object]:
        return {"spatial_attention_block_skip_range": self.skip,
                "spatial_attention_timestep_skip_range": list(self.window)}


@method_config("diffusers/faster_cache")
@dataclass
class FasterCacheConfig:
    """diffusers' FasterCacheConfig on the spatial attention of every block: inside
    ``spatial_attention_timestep_skip_range`` an attention computes at every
    ``spatial_attention_block_skip_range``-th call and between them is extrapolated from its last two
    outputs, weighted by ``attention_weight`` (diffusers' default 0.5). Its classifier-free-guidance
    reuse is off: FLUX.1 and HunyuanVideo are guidance-distilled (one forward per step), which
    diffusers' ``is_guidance_distilled=True`` declares."""

    _target_: str = "baselines.diffusers_hooks.FasterCache"
    spatial_attention_block_skip_range: int = 2
    spatial_attention_timestep_skip_range: list[int] = field(default_factory=lambda: [-1, 681])
    attention_weight: float = 0.5
    degenerate: ClassVar[tuple[str, ...]] = ("method.spatial_attention_block_skip_range=1",)


class FasterCache(DiffusersHookMethod):
    name = "diffusers/faster_cache"

    def __init__(self, spatial_attention_block_skip_range: int = 2,
                 spatial_attention_timestep_skip_range: list[int] | tuple[int, int] = (-1, 681),
                 attention_weight: float = 0.5) -> None:
        super().__init__()
        self.skip, self.window = _skip_and_window(spatial_attention_block_skip_range,
                                                  spatial_attention_timestep_skip_range)
        self.weight = float(attention_weight)

    def hook_config(self, num_steps: int) -> object:
        weight = self.weight
        return _config_class("FasterCacheConfig")(
            spatial_attention_block_skip_range=self.skip, spatial_attention_timestep_skip_range=self.window,
            attention_weight_callback=lambda _module: weight, is_guidance_distilled=True,
            current_timestep_callback=self.current_timestep)

    def params(self) -> dict[str, object]:
        return {"spatial_attention_block_skip_range": self.skip,
                "spatial_attention_timestep_skip_range": list(self.window), "attention_weight": self.weight}


@method_config("diffusers/sea_cache")
@dataclass
class SeaCacheConfig:
    """diffusers' SeaCacheConfig (generic path): every block skipped, the last residual reused (order 0)
    or extrapolated from the last two (order 1), while the accumulated relative L1 change of the
    spectral-evolution-aware indicator (the step's input latents through a sigma-dependent Wiener
    filter) stays below ``threshold``; the first ``retention_steps`` and last ``cache_end_steps``
    steps compute, and at most ``max_consecutive_cached`` steps in a row are reused."""

    _target_: str = "baselines.diffusers_hooks.SeaCache"
    threshold: float = 0.25
    residual_order: int = 1
    retention_steps: int = 1
    cache_end_steps: int = 1
    max_consecutive_cached: int = 2
    power_exp: float = 3.0
    degenerate: ClassVar[tuple[str, ...]] = ("method.threshold=0",)  # any change >= 0: compute


class SeaCache(DiffusersHookMethod):
    """diffusers' SeaCache needs what a pipeline that supports it hands over: the scheduler's step
    index, sigma and step count in the cache context (``cache_context("cond", step_index=...,
    sigma=..., num_inference_steps=...)``), and a model adapter giving the step's visual latents as
    (C, T, H, W) per sample (its built-in ones are Cosmos 3's and Wan's). The harness hands over the
    flow-matching sampler's step and sigma and the latents the model is called with (an image is one
    frame). Without them diffusers runs "fail-open" (every step in full, a warning): a sampler
    without sigmas is refused instead."""

    name = "diffusers/sea_cache"

    def __init__(self, threshold: float = 0.25, residual_order: int = 1, retention_steps: int = 1,
                 cache_end_steps: int = 1, max_consecutive_cached: int = 2, power_exp: float = 3.0) -> None:
        super().__init__()
        require(float(threshold) >= 0.0, f"method.threshold must be >= 0, got {threshold}")
        require(residual_order in (0, 1), f"method.residual_order must be 0 or 1, got {residual_order}")
        for key, value in (("retention_steps", retention_steps), ("cache_end_steps", cache_end_steps),
                           ("max_consecutive_cached", max_consecutive_cached)):
            require_int(value, f"method.{key}", 0)
        require(float(power_exp) > 0, f"method.power_exp must be > 0, got {power_exp}")
        self.settings = {"threshold": float(threshold), "residual_order": residual_order,
                         "retention_steps": retention_steps, "cache_end_steps": cache_end_steps,
                         "max_consecutive_cached": max_consecutive_cached, "power_exp": float(power_exp)}
        self._latents: torch.Tensor | None = None

    def hook_config(self, num_steps: int) -> object:
        return _config_class("SeaCacheConfig")(**self.settings, raw_vision_callback=self._raw_vision)

    def _raw_vision(self, _module: nn.Module, _args: tuple, _kwargs: dict) -> list[torch.Tensor] | None:
        """The step's latents, (C, T, H, W) per sample (an image's T is 1), as the model receives them."""
        if self._latents is None:
            return None
        x = self._latents.to(self.model.weight_dtype)
        return [v if v.dim() == 4 else v.unsqueeze(1) for v in x.unbind(0)]

    def context(self, transformer: nn.Module) -> contextlib.AbstractContextManager:
        step = self.step
        if step is None or step.sigma is None:
            raise ValueError(f"method={self.name} needs the scheduler's sigma at every step (a flow-matching "
                             "sampler: sampler=flow_euler); this sampler gives none")
        return transformer.cache_context("cond", step_index=step.index, sigma=step.sigma,
                                         num_inference_steps=step.num_steps)

    def own_forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor,
                    y: torch.Tensor) -> torch.Tensor | None:
        self._latents = x
        try:
            return super().own_forward(model, x, t, y)
        finally:
            self._latents = None

    def params(self) -> dict[str, object]:
        return dict(self.settings)
