"""ToCa, token-wise caching (Zou et al., 2025), as its official DiT code behaves.

Schedule: a step is full when it is the first step or its down-counting index s is a multiple of
the current interval; at each full step the interval becomes round(N / (1 + w - 2 w s / T)),
w = 0.4, forced to 2 for s in [0.2 T, 0.4 T). With fresh_ratio R = 0 the interval stays N (the
official code's switch), so N = 1, R = 0 is full compute.

Partial steps: attention is reused whole; the MLP is recomputed for the k = int(r * tokens) tokens
of highest score, r = clamp(R * l_step(s) * l_layer(block) * l_module, 0, 1), and scattered into
its cache. Score = attention the token received at the last full step (column sums of the
head-averaged softmax map, L2-normalised) + 0.25 * steps since the token was recomputed / N; in
each 2x2 block of the token grid the highest-scoring token gets + 0.6 * the maximum score.
Attention maps are computed only on full steps, and only when R > 0; otherwise the fused
attention of the model runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

import torch
from torch import nn

from rfc.cache.base import BranchInput, CacheMethod, Site
from rfc.cache.schedules import require
from rfc.samplers.sampling import StepInfo

INTERVAL_WEIGHT = 0.4  # w of the adaptive interval
STALENESS_WEIGHT = 0.25
SPATIAL_BONUS = 0.6
MODULE_WEIGHT = {"attn": 0.0, "mlp": 2.5}  # l_module: attention is always fully reused

# ratio schedules: (l_step(s, T), l_layer(layer, depth)), s = down-counting step index
RATIO_SCHEDULES: dict[str, tuple[Callable[[int, int], float], Callable[[int, int], float]]] = {
    "ddim50": (lambda s, T: 3 - 4 * s / T, lambda l, D: 0.8 + 0.4 * l / max(D - 1, 1)),
    "ddpm250": (lambda s, T: 1.4 - 0.8 * s / T, lambda l, D: 1.8 - 1.6 * l / max(D - 1, 1)),
}


class ToCa(CacheMethod):
    name = "toca"

    def __init__(self, interval: int = 3, fresh_ratio: float = 0.07, ratio_schedule: str = "ddim50") -> None:
        require(isinstance(interval, int) and interval >= 1, f"method.interval must be an integer >= 1, got {interval}")
        require(0.0 <= float(fresh_ratio) <= 1.0, f"method.fresh_ratio must be in [0, 1], got {fresh_ratio}")
        require(ratio_schedule in RATIO_SCHEDULES,
                f"method.ratio_schedule must be one of {sorted(RATIO_SCHEDULES)}, got {ratio_schedule!r}")
        super().__init__()
        self.interval = interval
        self.fresh_ratio = float(fresh_ratio)
        self.ratio_schedule = ratio_schedule
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.current_interval = self.interval
        self.cache: dict[Site, torch.Tensor] = {}
        self.received: dict[int, torch.Tensor] = {}  # block -> (B, T) attention received
        self.staleness: dict[Site, torch.Tensor] = {}  # (B, T) steps since each token was recomputed

    # ---- schedule ---------------------------------------------------------------------------
    def decide(self, step: StepInfo) -> bool:
        s = step.down_index
        full = step.index == 0 or s % self.current_interval == 0
        if full and self.fresh_ratio > 0:
            self.current_interval = self.adaptive_interval(s, step.num_steps)
        return full

    def adaptive_interval(self, s: int, T: int) -> int:
        if 0.2 * T <= s < 0.4 * T:
            return 2
        return max(1, round(self.interval / (1 + INTERVAL_WEIGHT - 2 * INTERVAL_WEIGHT * s / T)))

    def fresh_tokens(self, site: Site, s: int, T: int, tokens: int) -> int:
        """k for a site at down-counting step s: int(clamp(R l_step l_layer l_module, 0, 1) * tokens)."""
        l_step, l_layer = RATIO_SCHEDULES[self.ratio_schedule]
        r = self.fresh_ratio * l_step(s, T) * l_layer(site.block, self.depth) * MODULE_WEIGHT[site.branch]
        return int(min(max(r, 0.0), 1.0) * tokens)

    # ---- branches ---------------------------------------------------------------------------
    def branch(self, site: Site, inp: BranchInput, module: nn.Module) -> torch.Tensor:
        if self.full:
            if site.branch == "attn" and self.fresh_ratio > 0:
                self.count_full(site)
                out, self.received[site.block] = attention_with_received(module, inp.full())
            else:
                out = self.run_full(site, module, inp.full())
            self.cache[site] = out
            if self.fresh_ratio > 0 and site.branch == "mlp":
                self.staleness[site] = torch.zeros(out.shape[:2], device=out.device)
            return out
        step = self.step
        k = self.fresh_tokens(site, step.down_index, step.num_steps, inp.x.shape[1])
        if k == 0:
            self._stats.cached_sites += 1
            return self.cache[site]
        stale = self.staleness[site].add_(1)
        idx = self.token_scores(site, stale).topk(k, dim=1).indices  # (B, k)
        fresh = module(inp.tokens(idx))  # (B, k, C)
        self.count_partial(site, k)
        out = self.cache[site].scatter(1, idx.unsqueeze(-1).expand(-1, -1, fresh.shape[-1]), fresh)
        self.cache[site] = out
        stale.scatter_(1, idx, 0.0)
        return out

    def token_scores(self, site: Site, stale: torch.Tensor) -> torch.Tensor:
        """(B, T) selection scores of the tokens of a site's block."""
        received = self.received[site.block]
        score = received / received.norm(dim=1, keepdim=True).clamp_min(1e-12)
        score = score + STALENESS_WEIGHT * stale / self.interval
        return spatial_bonus(score)

    def cache_tensors(self) -> Iterable[torch.Tensor]:
        yield from self.cache.values()
        yield from self.received.values()
        yield from self.staleness.values()

    def params(self) -> dict[str, object]:
        return {"interval": self.interval, "fresh_ratio": self.fresh_ratio, "ratio_schedule": self.ratio_schedule}


def attention_with_received(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention module's output computed with an explicit softmax map, and the attention each
    token receives (column sums of the head-averaged map), (B, T, C) and (B, T)."""
    B, T, C = x.shape
    H = attn.num_heads
    q, k, v = attn.qkv(x).reshape(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, D)
    probs = (q @ k.transpose(-2, -1) * (C // H) ** -0.5).softmax(dim=-1)  # (B, H, T, T)
    out = attn.proj((probs @ v).transpose(1, 2).reshape(B, T, C))
    return out, probs.mean(dim=1).sum(dim=1)


def spatial_bonus(score: torch.Tensor) -> torch.Tensor:
    """Add SPATIAL_BONUS * max score to the best token of every 2x2 block of the token grid, so
    recomputed tokens spread over the image. Grids of odd side get no bonus."""
    B, T = score.shape
    g = math.isqrt(T)
    if g * g != T or g % 2:
        return score
    blocks = score.view(B, g // 2, 2, g // 2, 2).permute(0, 1, 3, 2, 4).reshape(B, -1, 4)  # (B, nb, 4)
    top = blocks.argmax(dim=-1, keepdim=True)
    bonus = torch.zeros_like(blocks).scatter_(-1, top, 1.0) * (SPATIAL_BONUS * score.amax(dim=1))[:, None, None]
    blocks = blocks + bonus
    return blocks.view(B, g // 2, g // 2, 2, 2).permute(0, 1, 3, 2, 4).reshape(B, T)
