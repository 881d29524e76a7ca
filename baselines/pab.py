"""Pyramid Attention Broadcast (Zhao et al., 2024, "Real-Time Video Generation with Pyramid Attention
Broadcast"), on the per-site protocol.

Followed: NUS-HPC-AI-Lab/VideoSys at 4cce477, videosys/core/pab/pab_mgr.py (``if_broadcast_spatial``)
and the blocks that call it (videosys/models/transformers/cogvideox_transformer_3d.py):

- every attention keeps a counter of its calls in the generation (the step index here: each is
  called once per step) and broadcasts, i.e. returns its output of its last computed call, when the
  counter is not a multiple of ``spatial_range`` and the model's timestep truncated to an integer
  (``int(timestep[0])``) lies strictly inside ``spatial_threshold``; otherwise it computes. The MLPs
  are computed at every step. The papers' pyramid (cross > temporal > spatial ranges) needs
  cross- and temporal attention, which DiT, FLUX.1 and HunyuanVideo do not have: their blocks'
  self-attention (joint text + image attention in the stream models) is the spatial one, as
  diffusers' hook matches it;
- what is broadcast is the attention's output before the block's gate, and the gate of the current
  step multiplies it (CogVideoX's block and diffusers' hook do so; VideoSys's Open-Sora block keeps
  the gated output instead). A FLUX.1 or HunyuanVideo single-stream block, whose one site fuses
  attention and MLP, broadcasts its attention output before ``proj_out`` and computes its MLP and
  ``proj_out`` (the site's ``attention`` / ``from_attention``): a partial site on every token.

Defaults are VideoSys's Latte pipeline (and diffusers'): range 2, window (100, 800). A range of 1 is
full compute. On flux-tiny it equals diffusers' PyramidAttentionBroadcast hook on FLUX's own forward,
decisions and latents bit for bit (tests/test_attention_reuse.py); where the pipeline timestep is not an
integer, the official truncation differs from diffusers' float comparison only in the one unit
above the window's lower bound.

Accounting: a step counts towards NFC only when it broadcast nothing; at a broadcasting step each
attention site is cached, each MLP site full, each single-stream site partial on all its tokens.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import ClassVar

import torch
from torch import nn

from rfc.cache.base import BranchInput, CacheMethod, Site
from rfc.cache.registry import method_config
from rfc.cache.schedules import require_int, timestep_window
from rfc.samplers.sampling import StepInfo


@method_config("pab")
@dataclass
class PABConfig:
    _target_: str = "baselines.pab.PyramidAttentionBroadcast"
    spatial_range: int = 2
    spatial_threshold: list[int] = field(default_factory=lambda: [100, 800])
    degenerate: ClassVar[tuple[str, ...]] = ("method.spatial_range=1",)


def model_timestep(step: StepInfo) -> int:
    """The timestep the official code compares, ``int(timestep[0])``: the model's timestep
    truncated (flow matching's are not integers; ``StepInfo.value`` holds them unrounded)."""
    return int(step.value) if step.value is not None else int(step.timestep)


class AttentionReuse(CacheMethod):
    """What PAB and FasterCache share: a full step computes every site and keeps each attention's
    output (a single-stream site's attention before ``proj_out``); a cached step computes the MLP
    sites, computes a single-stream site from its ``reused`` attention, and returns the ``reused``
    attention at an attention site. Subclasses give ``decide`` (or set ``reusing`` themselves) and may
    change what is kept (``keep``) and what a reusing site gets (``reused(site_index, rows)``)."""

    def reset(self) -> None:
        super().reset()
        self.kept: dict[int, list[torch.Tensor]] = {}  # site index -> the attention outputs kept, oldest first
        self.reusing = False  # this step's attention sites reuse rather than compute

    def begin_step(self, step: StepInfo) -> None:
        super().begin_step(step)
        self.reusing = not self.full

    def keep(self, index: int, attn: torch.Tensor) -> None:
        self.kept[index] = [attn]

    def reused(self, index: int, rows: int) -> torch.Tensor:
        return self.kept[index][-1]

    def branch(self, site: Site, inp: BranchInput, module: nn.Module) -> torch.Tensor:
        if site.branch == "mlp":
            return self.run_full(site, module, inp.full())
        x = inp.full()
        if site.branch == "total":
            if not (hasattr(module, "attention") and hasattr(module, "from_attention")):
                raise TypeError(f"{self.name} reuses attention alone; a {site.branch!r} site of "
                                f"{type(module).__name__} does not offer attention / from_attention")
            if not self.reusing:
                attn = module.attention(x)
                self.keep(site.index, attn)
                self.count_full(site)
                return module.from_attention(x, attn)
            self.count_partial(site, x.shape[1])
            return module.from_attention(x, self.reused(site.index, x.shape[0]))
        if not self.reusing:
            out = self.run_full(site, module, x)
            self.keep(site.index, out)
            return out
        self._stats.cached_sites += 1
        return self.reused(site.index, x.shape[0])

    def cache_tensors(self) -> Iterable[torch.Tensor]:
        return (t for kept in self.kept.values() for t in kept)


class PyramidAttentionBroadcast(AttentionReuse):
    name = "pab"

    def __init__(self, spatial_range: int = 2, spatial_threshold: list[int] | tuple[int, int] = (100, 800)) -> None:
        super().__init__()
        require_int(spatial_range, "method.spatial_range", 1)
        self.range = spatial_range
        self.window = timestep_window(spatial_threshold, "method.spatial_threshold")

    def decide(self, step: StepInfo) -> bool:
        low, high = self.window
        broadcast = step.index % self.range != 0 and low < model_timestep(step) < high
        return not broadcast

    def params(self) -> dict[str, object]:
        return {"spatial_range": self.range, "spatial_threshold": list(self.window)}
