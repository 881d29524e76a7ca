"""cache-dit's DBCache as a method (``method=cache-dit/dbcache``, ``method=cache-dit/dbcache_taylorseer``):
the library the field deploys for DiT caching, measured under the harness's protocol
(rfc/cache/peers.py: how a peer runs and how what it skipped is counted).

cache-dit (vipshop/cache-dit, 1.5) caches at the block level: DBCache ("dual block cache") computes
the first ``Fn_compute_blocks`` blocks at every step, compares their output residual with the last
computed step's (relative L1, ``residual_diff_threshold``), and when it is close enough reuses the
residual of the middle blocks, still computing the last ``Bn_compute_blocks``; it never caches in the
first ``max_warmup_steps`` steps, and can bound the cached steps (``max_cached_steps``,
``max_continuous_cached_steps``; -1: no bound). Its TaylorSeer calibrator forecasts the reused
residual by a Taylor expansion of order ``taylorseer_order`` instead of reusing the last one.

Here cache-dit is applied to the model's own diffusers transformer as its transformer-only
integration does (``cache_dit.enable_cache(transformer, cache_config=DBCacheConfig(...,
num_inference_steps=N))``, cache-dit's own block adapter and patches for FLUX.1 and HunyuanVideo),
and its context is rebuilt for every batch (``cache_dit.refresh_context``), as for a new pipeline
call. The keys are cache-dit's, with its defaults but one: ``Fn_compute_blocks`` is 1 (cache-dit's
"F1B0"), not its 8, so that the preset runs on every model, the tiny ones (5 blocks) included
(``method.Fn_compute_blocks=8`` gives cache-dit's default on FLUX.1-dev; more front and back blocks
than the model has are refused when the method attaches, before sampling). cache-dit is an optional extra
(``pip install -e ".[peers]"``); without it the method is refused in one line before anything is
built. DBCache with Fn 1, Bn 0 and no warm-up is First-Block Cache: on flux-tiny it equals
``method=fbcache`` bit for bit (tests/test_peers.py).
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import ClassVar

from torch import nn

from rfc.cache.peers import PeerMethod
from rfc.cache.registry import method_config
from rfc.cache.schedules import require, require_int

INSTALL = 'pip install -e ".[peers]"'


@method_config("cache-dit/dbcache")
@dataclass
class DBCacheConfig:
    _target_: str = "baselines.cachedit_dbcache.DBCache"
    Fn_compute_blocks: int = 1  # cache-dit's default is 8 (F8B0), more blocks than the tiny models have
    Bn_compute_blocks: int = 0
    residual_diff_threshold: float = 0.08
    max_warmup_steps: int = 8
    warmup_interval: int = 1
    max_cached_steps: int = -1
    max_continuous_cached_steps: int = -1
    taylorseer_order: int = 0  # 0: reuse the residual; >= 1: cache-dit's TaylorSeer calibrator of that order
    degenerate: ClassVar[tuple[str, ...]] = ("method.residual_diff_threshold=0",)  # caches when the diff is < 0


@method_config("cache-dit/dbcache_taylorseer")
@dataclass
class DBCacheTaylorSeerConfig(DBCacheConfig):
    taylorseer_order: int = 1


class DBCache(PeerMethod):
    library = "cache-dit's DBCache"

    def __init__(self, Fn_compute_blocks: int = 1, Bn_compute_blocks: int = 0,  # noqa: N803 (cache-dit's names)
                 residual_diff_threshold: float = 0.08, max_warmup_steps: int = 8, warmup_interval: int = 1,
                 max_cached_steps: int = -1, max_continuous_cached_steps: int = -1, taylorseer_order: int = 0) -> None:
        super().__init__()
        require(importlib.util.find_spec("cache_dit") is not None,
                f"method=cache-dit/... needs the cache-dit package, which is not installed: {INSTALL}")
        for key, value, low in (("Fn_compute_blocks", Fn_compute_blocks, 1),
                                ("Bn_compute_blocks", Bn_compute_blocks, 0),
                                ("max_warmup_steps", max_warmup_steps, 0), ("warmup_interval", warmup_interval, 1),
                                ("max_cached_steps", max_cached_steps, -1),
                                ("max_continuous_cached_steps", max_continuous_cached_steps, -1),
                                ("taylorseer_order", taylorseer_order, 0)):
            require_int(value, f"method.{key}", low)
        require(float(residual_diff_threshold) >= 0.0,
                f"method.residual_diff_threshold must be >= 0, got {residual_diff_threshold}")
        self.name = "cache-dit/dbcache_taylorseer" if taylorseer_order else "cache-dit/dbcache"
        self.settings = {"Fn_compute_blocks": Fn_compute_blocks, "Bn_compute_blocks": Bn_compute_blocks,
                         "residual_diff_threshold": float(residual_diff_threshold),
                         "max_warmup_steps": max_warmup_steps, "warmup_interval": warmup_interval,
                         "max_cached_steps": max_cached_steps,
                         "max_continuous_cached_steps": max_continuous_cached_steps}
        self.taylorseer_order = taylorseer_order

    def _configs(self, num_steps: int) -> dict[str, object]:
        import cache_dit

        configs: dict[str, object] = {"cache_config": cache_dit.DBCacheConfig(**self.settings,
                                                                              num_inference_steps=num_steps)}
        if self.taylorseer_order:
            configs["calibrator_config"] = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=self.taylorseer_order)
        return configs

    def attach(self, model: nn.Module) -> None:
        blocks = len(model.native_blocks)
        front, back = self.settings["Fn_compute_blocks"], self.settings["Bn_compute_blocks"]
        require(front + back <= blocks, f"method.Fn_compute_blocks + method.Bn_compute_blocks = {front + back} exceeds "
                f"the model's {blocks} blocks")
        super().attach(model)

    def apply(self, transformer: nn.Module, num_steps: int) -> None:
        import cache_dit

        # cache-dit patches forwards on the instances (its FLUX adapter: the transformer's and the
        # single-stream blocks') and re-registers the block lists (their order among the transformer's
        # children changes), and leaves both when disabled: remember what was there
        self._forwards = [(m, vars(m).get("forward"), list(m._modules)) for m in transformer.modules()]
        with _quiet():
            cache_dit.enable_cache(transformer, **self._configs(num_steps))

    def restart(self, transformer: nn.Module) -> None:
        import cache_dit

        with _quiet():
            cache_dit.refresh_context(transformer, **self._configs(self._enabled_for or 1))

    def remove(self, transformer: nn.Module) -> None:
        import cache_dit

        with _quiet():
            cache_dit.disable_cache(transformer)
        for module, forward, order in getattr(self, "_forwards", ()):  # the model as it was before cache-dit
            if forward is None:
                vars(module).pop("forward", None)
            else:
                module.forward = forward
            children = module._modules
            keys = [*order, *(k for k in children if k not in order)]
            module._modules = type(children)((k, children[k]) for k in keys if k in children)
        vars(transformer).pop("_is_patched", None)
        self._forwards = []

    def params(self) -> dict[str, object]:
        return {**self.settings, "taylorseer_order": self.taylorseer_order}


class _quiet:
    """cache-dit logs every context it builds at INFO: kept out of the run's output."""

    def __enter__(self) -> None:
        import logging

        self.loggers = [logging.getLogger(n) for n in logging.root.manager.loggerDict if n.startswith("cache_dit")]
        self.levels = [lg.level for lg in self.loggers]
        for lg in self.loggers:
            lg.setLevel(logging.WARNING)

    def __exit__(self, *exc: object) -> None:
        for lg, level in zip(self.loggers, self.levels, strict=True):
            lg.setLevel(level)
