"""Peer implementations as methods: another library's caching hooks on the model's own diffusers
transformer, measured under the harness's protocol (baselines/diffusers_hooks.py: diffusers' hooks;
baselines/cachedit_dbcache.py: cache-dit's DBCache).

A peer runs as its library runs it: each step calls the transformer's own forward (the model's
``native_forward``, equal to the harness's site-by-site forward bit for bit), as the library's
pipeline integration calls it, with the library's state reset for every batch, as a pipeline call
resets it. The noise, the schedule, the pairing with full compute, the metrics and the latency rules
are the harness's, as for every other row. Models that are not diffusers transformers are
refused before anything is built.

What a peer skipped is not taken from the library's own counters: the method watches which
modules ran (torch forward hooks on the blocks' leaf modules: the attention's ``to_q``, the MLP's
first linear layer, the adaLN norms), and counts each block as the harness counts its sites (a
double-stream block's ``attn`` and ``mlp``, a single-stream block's ``total``). A step is full (it
counts towards NFC) when every site ran; a single-stream block whose attention was reused but whose
MLP and output projection ran (diffusers' TaylorSeer caches attention only) is a partial site on all
its tokens, priced as such (rfc.models.flops: flux_single_partial_flops). FLOPs follow from those
counts by the model's own cost model, as for the native methods.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import nn

from rfc.cache.base import CacheMethod, Site
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


class PeerMethod(CacheMethod):
    """Another library's caching on the model's own transformer (see the module docstring).
    Subclasses give ``name`` and how the library is applied (``apply(num_steps)``), reset for a
    new batch (``restart``), removed (``remove``), and the context of one forward (``context``)."""

    def __init__(self) -> None:
        super().__init__()
        self._watches: list[BlockWatch] = []
        self._enabled_for: int | None = None  # the step count the hook was configured for
        self._timestep: float | None = None

    library = "the peer library"  # named in refusals

    # ---- what a peer defines ------------------------------------------------------------------
    def apply(self, transformer: nn.Module, num_steps: int) -> None:
        """Put the library's caching on ``transformer`` for ``num_steps`` steps."""
        raise NotImplementedError

    def restart(self, transformer: nn.Module) -> None:
        """Forget everything cached, as the library's pipeline integration does for a new call."""
        raise NotImplementedError

    def remove(self, transformer: nn.Module) -> None:
        """Take the library's caching off ``transformer``."""
        raise NotImplementedError

    def context(self, transformer: nn.Module) -> contextlib.AbstractContextManager:
        """What surrounds one forward, as the library's pipeline integration surrounds it."""
        return contextlib.nullcontext()

    def check_model_family(self, family: str, model_class: type | None = None) -> None:
        # ``transformer`` is an instance attribute: the class shows the other two
        if model_class is not None and not all(hasattr(model_class, a) for a in NATIVE[:2]):
            raise ValueError(f"method={self.name} runs {self.library} on the model's own diffusers transformer; "
                             f"model family {family!r} ({model_class.__name__}) is not a diffusers transformer (no "
                             f"{' / '.join(NATIVE[:2])})")

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
                self.remove(self.model.transformer)
            for w in self._watches:
                w.remove()
        self._watches, self._enabled_for = [], None
        super().detach()

    def reset(self) -> None:
        super().reset()
        if self.model is not None and self._enabled_for is not None:
            self.restart(self.model.transformer)  # as a pipeline call starts

    def _enable(self, num_steps: int) -> None:
        """Apply the library (again, when the step count changes) before the first forward."""
        transformer = self.model.transformer
        if self._enabled_for == num_steps:
            return
        if self._enabled_for is not None:
            self.remove(transformer)
        self.apply(transformer, num_steps)
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
        with self.context(model.transformer):
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
            ran = (w.ran["attn"], w.ran["mlp"]) if w.double else (w.ran["attn"] and w.ran["mlp"],)
            for b, (kind, computed) in enumerate(zip(kinds, ran, strict=True)):
                site = Site(i, kind, self.site_base[i] + b)
                if computed:
                    self.count_full(site)
                elif kind == "total" and w.ran["mlp"]:  # attention reused, MLP and output projection ran
                    self.count_partial(site, w.norm_tokens)  # on every token its norm normalised
                    full_step = False
                else:
                    stats.cached_sites += 1
                    full_step = False
            stats.count_block(*before, sites=len(kinds))
        self.full = full_step
        self.count_step(step, full_step)
        super().end_step(step)

    def current_timestep(self) -> float:
        """The pipeline's ``current_timestep`` (0..1000) of the step being computed."""
        return float(self._timestep if self._timestep is not None else 0.0)


__all__ = ["NATIVE", "BlockWatch", "PeerMethod"]


