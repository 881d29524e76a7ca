"""diffusers' cache hooks as methods (``method=diffusers/<hook>``): the implementations the field deploys,
measured under the harness's protocol.

diffusers (0.42) ships its caching methods as hooks on its own transformers
(``transformer.enable_cache(config)``): First-Block Cache, TaylorSeer, MagCache, Pyramid Attention
Broadcast, and more. A peer method runs them as they are: it enables the hook on the diffusers
transformer of the model (FLUX.1, HunyuanVideo: the models with ``native_forward``), and each step
calls that transformer's own forward, as the diffusers pipeline calls it, inside the pipeline's
``cache_context("cond")``; the hook's state is reset for every batch, as a pipeline resets it for
every call. The noise, the schedule, the pairing with full compute, the metrics and the latency
rules are the harness's, the same as for every other row. Models that are not diffusers
transformers (DiT) are refused before anything is built.

What the hook skipped is not taken from its own counters: the method watches which modules ran
(torch forward hooks on the blocks' leaf modules: the attention's ``to_q``, the MLP's first linear
layer, the adaLN norms), and counts each block as the harness counts its sites (a double-stream
block's ``attn`` and ``mlp``, a single-stream block's ``total``). A step is full (it counts towards
NFC) when every site ran; a single-stream block whose attention was reused but whose MLP and
output projection ran (diffusers' TaylorSeer caches attention only) is a partial site on all its
tokens, priced as such (rfc.models.flops: flux_single_partial_flops). FLOPs follow from those
counts by the model's own cost model, as for the native methods.

The hooks' settings are diffusers' own, with diffusers' defaults; where a hook needs the sampler
(the number of steps for MagCache, the current timestep for Pyramid Attention Broadcast), the
method hands it what the pipeline would. Where diffusers' method differs from the paper's official
code (its TaylorSeer: another schedule, attention only, bf16 Taylor factors), the native method of
the same name is the official one (docs/methods.md).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from rfc.cache.base import CacheMethod
from rfc.cache.registry import method_config
from rfc.cache.schedules import require
from rfc.samplers.sampling import StepInfo

NATIVE = ("native_forward", "native_blocks", "transformer")  # what a model needs for peer methods


class BlockWatch:
    """Which parts of one diffusers block ran during the current step, from forward hooks on its
    leaf modules: ``attn`` (the attention's ``to_q``), ``mlp`` (a double-stream block's first MLP
    linear, a single-stream block's ``proj_mlp``), ``mod`` (the adaLN modulation of the block's
    first norm) and the tokens its layer norms normalised."""

    def __init__(self, block: nn.Module) -> None:
        self.double = hasattr(block, "ff")
        self.handles: list[Any] = []
        self.clear()
        ff = block.ff if self.double else None
        mlp = next(m for m in ff.modules() if isinstance(m, nn.Linear)) if ff is not None else block.proj_mlp
        self._watch(block.attn.to_q, "attn")
        self._watch(mlp, "mlp")
        first = block.norm1 if self.double else block.norm
        self._watch(first, "mod")
        norms = ("norm1", "norm1_context", "norm2", "norm2_context") if self.double else ("norm",)
        for name in norms:
            self.handles.append(getattr(block, name).register_forward_hook(self._norm_hook))

    def _watch(self, module: nn.Module, part: str) -> None:
        def hook(_m: nn.Module, _args: tuple, _out: object) -> None:
            self.ran[part] += 1

        self.handles.append(module.register_forward_hook(hook))

    def _norm_hook(self, _m: nn.Module, _args: tuple, out: object) -> None:
        x = out[0] if isinstance(out, tuple) else out
        self.norm_tokens += int(x.shape[1])

    def clear(self) -> None:
        self.ran = {"attn": 0, "mlp": 0, "mod": 0}
        self.norm_tokens = 0

    def remove(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


class DiffusersHookMethod(CacheMethod):
    """A diffusers cache hook on the model's own transformer (see the module docstring).
    Subclasses give ``name`` and ``hook_config(num_steps)``: the hook's diffusers config."""

    def __init__(self) -> None:
        super().__init__()
        self._watches: list[BlockWatch] = []
        self._enabled_for: int | None = None  # the step count the hook was configured for
        self._timestep: float | None = None

    # ---- what a hook defines ------------------------------------------------------------------
    def hook_config(self, num_steps: int) -> object:
        raise NotImplementedError

    def check_model_family(self, family: str, model_class: type | None = None) -> None:
        # ``transformer`` is an instance attribute: the class shows the other two
        if model_class is not None and not all(hasattr(model_class, a) for a in NATIVE[:2]):
            raise ValueError(f"method={self.name} runs diffusers' own transformer with its cache hook; model "
                             f"family {family!r} ({model_class.__name__}) is not a diffusers transformer (the peer "
                             "methods run on FLUX.1 and HunyuanVideo)")

    # ---- lifecycle ----------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        missing = [a for a in NATIVE if not hasattr(model, a)]
        if missing:
            raise TypeError(f"method={self.name} needs a model with {', '.join(NATIVE)}; {type(model).__name__} "
                            f"lacks {', '.join(missing)}")
        super().attach(model)
        self._watches = [BlockWatch(b) for b in model.native_blocks]

    def detach(self) -> None:
        if self.model is not None:
            if self._enabled_for is not None:
                self.model.transformer.disable_cache()
            for w in self._watches:
                w.remove()
        self._watches, self._enabled_for = [], None
        super().detach()

    def reset(self) -> None:
        super().reset()
        if self.model is not None and self._enabled_for is not None:
            self.model.transformer._reset_stateful_cache()  # as a pipeline call starts

    def _enable(self, num_steps: int) -> None:
        """Apply the hook (again, when the step count changes) before the first forward."""
        transformer = self.model.transformer
        if self._enabled_for == num_steps:
            return
        if self._enabled_for is not None:
            transformer.disable_cache()
        transformer.enable_cache(self.hook_config(num_steps))
        self._enabled_for = num_steps

    # ---- the sampler's announcements ------------------------------------------------------------
    def begin_step(self, step: StepInfo) -> None:
        self.step = step
        self._timestep = step.value if step.value is not None else float(step.timestep)
        self._enable(step.num_steps)
        for w in self._watches:
            w.clear()

    def own_forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor,
                    y: torch.Tensor) -> torch.Tensor | None:
        with model.transformer.cache_context("cond"):
            return model.native_forward(x, t, y)

    def end_step(self, step: StepInfo) -> None:
        """Count what ran this step (the module docstring), then the base's bookkeeping."""
        stats = self._stats
        full_step = True
        for i, w in enumerate(self._watches):
            kinds = self.kinds_of(i, i + 1)
            before = stats.full_sites, stats.partial_sites
            stats.block_calls += bool(w.ran["mod"])
            stats.norm_tokens += w.norm_tokens
            if w.double:
                for kind, part in zip(kinds, ("attn", "mlp"), strict=True):
                    if w.ran[part]:
                        stats.full_sites += 1
                        setattr(stats, f"full_{kind}", getattr(stats, f"full_{kind}") + 1)
                    else:
                        stats.cached_sites += 1
                        full_step = False
            elif w.ran["attn"] and w.ran["mlp"]:
                stats.full_sites += 1
                stats.full_total += 1
            elif w.ran["mlp"]:  # attention reused, MLP and output projection computed: every token
                self.count_partial_total(self.model.token_shape[0] if not self._tokens else self._tokens)
                full_step = False
            else:
                stats.cached_sites += 1
                full_step = False
            stats.count_block(*before, sites=len(kinds))
        self.full = full_step
        self.count_step(step, full_step)
        super().end_step(step)

    @property
    def _tokens(self) -> int:
        """The stream's tokens this step (text + image), from the first block's norms."""
        w = self._watches[0] if self._watches else None
        if w is None or not w.norm_tokens:
            return 0
        return w.norm_tokens // (2 if w.double else 1)

    def count_partial_total(self, tokens: int) -> None:
        self._stats.partial_sites += 1
        self._stats.partial_total_tokens.append(tokens)

    def current_timestep(self) -> float:
        """The pipeline's ``current_timestep`` (0..1000) of the step being computed."""
        return float(self._timestep if self._timestep is not None else 0.0)

    def params(self) -> dict[str, object]:
        return {}


def _config_class(name: str) -> Callable[..., object]:
    import diffusers.hooks as hooks

    return getattr(hooks, name)


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
        require(isinstance(cache_interval, int) and cache_interval >= 1,
                f"method.cache_interval must be an integer >= 1, got {cache_interval}")
        require(isinstance(max_order, int) and max_order >= 0, f"method.max_order must be an integer >= 0, got "
                f"{max_order}")
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
        require(isinstance(max_skip_steps, int) and max_skip_steps >= 0,
                f"method.max_skip_steps must be an integer >= 0, got {max_skip_steps}")
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
        skip, window = spatial_attention_block_skip_range, tuple(spatial_attention_timestep_skip_range)
        require(isinstance(skip, int) and skip >= 1,
                f"method.spatial_attention_block_skip_range must be an integer >= 1, got {skip}")
        require(len(window) == 2 and window[0] <= window[1],
                f"method.spatial_attention_timestep_skip_range must be [low, high], got {list(window)}")
        self.skip, self.window = skip, (float(window[0]), float(window[1]))

    def hook_config(self, num_steps: int) -> object:
        return _config_class("PyramidAttentionBroadcastConfig")(
            spatial_attention_block_skip_range=self.skip, spatial_attention_timestep_skip_range=self.window,
            current_timestep_callback=self.current_timestep)

    def params(self) -> dict[str, object]:
        return {"spatial_attention_block_skip_range": self.skip,
                "spatial_attention_timestep_skip_range": list(self.window)}
