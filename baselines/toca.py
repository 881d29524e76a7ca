"""ToCa, token-wise caching (Zou et al., 2025), as its official DiT code behaves.

Steps are counted down (s = T - 1 is the first, noisiest step), as the official code counts them.

Schedule. The official code decides inside every block: a block is full when s is the first step
or a multiple of the current interval, and block 0's full computation re-runs the interval
scheduler before the later blocks test s against it. The new interval is
round(N / (1 + w - 2 w s / T)) in fp32, w = 0.4, or 2 for s in [int(0.2 T), int(0.4 T)); with
fresh_ratio R = 0 it stays N (the official switch to FORA), so N = 1, R = 0 is full compute. So a
step is either full in every block, partial in every block, or (where block 0's new interval does
not divide s) full in block 0 only: on DDIM-50 with N = 3, block 0 is full at 20 steps and every
block at 18 (45 and 32 are block-0-only). ``schedule=step`` makes every block follow block 0's
decision instead (a deviation, off by default: 20 whole full steps there).

Partial blocks reuse attention whole; the MLP is recomputed for the k tokens of highest score,
k = int(clamp(R * l_layer * l_step * l_module, 0, 1) * tokens) with the ratio clamped and
multiplied in fp32 as the official code does. The factors are 1 + v - 2 v x / X: l_step over the
step (x = s, X = T) and l_layer over the block (x = layer, X = ``layer_divisor``, hard-coded 27 in
the official code, i.e. DiT-XL/2's depth - 1; ``layer_divisor=null`` uses depth - 1), with
(v_step, v_layer) = (2.0, -0.2) for the DDIM-50 recipe and (0.4, 0.8) for DDPM-250; l_module is
0 for attention and 2.5 for the MLP. Score = attention the token received at its block's last
full computation (column sums of the head-averaged softmax map, L2-normalised) + 0.25 * (partial
steps since the token was recomputed) / N, scored before that count is incremented; then in each
2x2 block of the token grid the highest-scoring token gets + 0.6 * that block's maximum. The
count is incremented at every partial step, also when no token is recomputed.

On FLUX only ``fresh_ratio=0`` runs (the official FLUX code's switch to whole-module reuse, full at
step 0 and every N steps, counted up); token-wise recompute there is refused before sampling.

Attention maps come from an explicit softmax (q scaled before the product, as the official
attention module does it) on full blocks, and only when R > 0; otherwise the model's own fused
attention runs, which keeps N = 1, R = 0 bit-identical to ``method=none``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from rfc.cache.base import BranchInput, CacheMethod, Site
from rfc.cache.registry import method_config
from rfc.cache.schedules import require
from rfc.samplers.sampling import StepInfo

INTERVAL_WEIGHT = 0.4  # w of the adaptive interval
STALENESS_WEIGHT = 0.25  # soft_fresh_weight, lambda_3 of the paper
SPATIAL_BONUS = 0.6
MODULE_WEIGHT, MODULE_TIME_WEIGHT = 2.5, 0.6
# l_module, written as the official code computes it: 0 for attention (always fully reused), 2.5 for the MLP
MODULE_FACTOR = {"attn": 1 - (1 - MODULE_TIME_WEIGHT) * MODULE_WEIGHT, "mlp": 1 + MODULE_TIME_WEIGHT * MODULE_WEIGHT}
# ratio schedules: (step weight, layer weight) of l = 1 + v - 2 v x / X
RATIO_SCHEDULES: dict[str, tuple[float, float]] = {"ddim50": (2.0, -0.2), "ddpm250": (0.4, 0.8)}
SCHEDULES = ("official", "step")
OFFICIAL_LAYER_DIVISOR = 27
TOKENWISE_FLUX = ("method.fresh_ratio must be 0 on FLUX: ToCa's token-wise recompute on FLUX (scores from the joint "
                  "attention's map, single-stream attention cached apart from the block output) is not implemented; "
                  "fresh_ratio=0 runs the official FLUX code's whole-module reuse (full at step 0 and every N)")


def linear_factor(weight: float, x: float, span: float) -> float:
    """1 + v - 2 v x / X, in the official operation order (float64)."""
    return 1 + weight - 2 * weight * x / span


@method_config("toca")
@dataclass
class ToCaConfig:
    _target_: str = "baselines.toca.ToCa"
    interval: int = 3
    fresh_ratio: float = 0.07
    ratio_schedule: str = "ddim50"
    schedule: str = "official"
    layer_divisor: int | None = OFFICIAL_LAYER_DIVISOR


class ToCa(CacheMethod):
    name = "toca"

    def __init__(self, interval: int = 3, fresh_ratio: float = 0.07, ratio_schedule: str = "ddim50",
                 schedule: str = "official", layer_divisor: int | None = OFFICIAL_LAYER_DIVISOR) -> None:
        require(isinstance(interval, int) and interval >= 1, f"method.interval must be an integer >= 1, got {interval}")
        require(0.0 <= float(fresh_ratio) <= 1.0, f"method.fresh_ratio must be in [0, 1], got {fresh_ratio}")
        require(ratio_schedule in RATIO_SCHEDULES,
                f"method.ratio_schedule must be one of {sorted(RATIO_SCHEDULES)}, got {ratio_schedule!r}")
        require(schedule in SCHEDULES, f"method.schedule must be one of {SCHEDULES}, got {schedule!r}")
        require(layer_divisor is None or (isinstance(layer_divisor, int) and layer_divisor >= 1),
                f"method.layer_divisor must be an integer >= 1 or null (depth - 1), got {layer_divisor}")
        super().__init__()
        self.interval = interval
        self.fresh_ratio = float(fresh_ratio)
        self.ratio_schedule = ratio_schedule
        self.schedule = schedule
        self.layer_divisor = layer_divisor
        self.reset()

    def reset(self) -> None:
        super().reset()
        self.current_interval = self.interval  # the official cal_threshold
        self.rest_full = True  # decision of blocks 1.. at the current step (self.full is block 0's)
        self.cache: dict[Site, torch.Tensor] = {}
        self.received: dict[int, torch.Tensor] = {}  # block -> (B, T) attention received
        self.staleness: dict[Site, torch.Tensor] = {}  # (B, T) partial steps since each token was recomputed

    # ---- schedule ---------------------------------------------------------------------------
    def decide(self, step: StepInfo) -> bool:
        """Block 0's decision, which is the step's count in the papers' NFC; blocks 1.. then test
        the same step against the interval block 0 may just have re-scheduled."""
        if self.counting == "up":  # the official FLUX code with fresh_ratio 0 (its FORA switch): 0, N, 2N ...
            require(self.fresh_ratio == 0, TOKENWISE_FLUX)
            self.rest_full = step.index % self.interval == 0
            return self.rest_full
        s, first = step.down_index, step.index == 0
        full = first or s % self.current_interval == 0
        if full:
            self.current_interval = self.adaptive_interval(s, step.num_steps)
        self.rest_full = full if self.schedule == "step" else first or s % self.current_interval == 0
        return full

    def adaptive_interval(self, s: int, T: int) -> int:
        """The official force scheduler: round(N / (1 + w - 2 w s / T)) with the factor in fp32,
        2 for s in range(int(0.2 T), int(0.4 T)); N itself when R = 0."""
        if self.fresh_ratio == 0:
            return self.interval
        if s in range(int(T * 0.2), int(T * 0.4)):
            return 2
        factor = torch.tensor(linear_factor(INTERVAL_WEIGHT, s, T), dtype=torch.float32)
        return max(1, int(torch.round(self.interval / factor)))

    def check_model_family(self, family: str) -> None:
        require(family != "flux" or self.fresh_ratio == 0, TOKENWISE_FLUX)

    def block_full(self, block: int) -> bool:
        return self.full if block == 0 else self.rest_full

    def fresh_tokens(self, site: Site, s: int, T: int, tokens: int) -> int:
        """k for a site at down-counting step s: int(clamp(R l_layer l_step l_module, 0, 1) * tokens),
        the product in float64 and the clamp and count in fp32, as the official code does."""
        v_step, v_layer = RATIO_SCHEDULES[self.ratio_schedule]
        divisor = self.layer_divisor if self.layer_divisor is not None else max(self.depth - 1, 1)
        ratio = (self.fresh_ratio * linear_factor(v_layer, site.block, divisor) * linear_factor(v_step, s, T)
                 * MODULE_FACTOR[site.branch])
        r = torch.tensor(ratio, dtype=torch.float32).clamp(0.0, 1.0)
        return int(r * tokens)

    # ---- branches ---------------------------------------------------------------------------
    def branch(self, site: Site, inp: BranchInput, module: nn.Module) -> torch.Tensor:
        if self.block_full(site.block):
            if site.branch == "attn" and self.fresh_ratio > 0:
                self.count_full(site)
                out, self.received[site.block] = attention_with_received(module, inp.full())
            else:
                out = self.run_full(site, module, inp.full())
            self.cache[site] = out
            if self.fresh_ratio > 0 and site.branch == "mlp":
                self.staleness[site] = torch.zeros(out.shape[:2], dtype=torch.int32, device=out.device)
            return out
        step = self.step
        k = 0 if self.fresh_ratio == 0 else self.fresh_tokens(site, step.down_index, step.num_steps, inp.x.shape[1])
        stale = self.staleness.get(site)
        if k == 0:
            if stale is not None:
                stale.add_(1)
            self._stats.cached_sites += 1
            return self.cache[site]
        idx = self.token_scores(site, stale).argsort(dim=-1, descending=True)[:, :k]  # (B, k)
        stale.add_(1)
        stale.scatter_(1, idx, 0)
        fresh = module(inp.tokens(idx))  # (B, k, C)
        self.count_partial(site, k)
        out = self.cache[site].scatter(1, idx.unsqueeze(-1).expand(-1, -1, fresh.shape[-1]), fresh)
        self.cache[site] = out
        return out

    def token_scores(self, site: Site, stale: torch.Tensor) -> torch.Tensor:
        """(B, T) selection scores of a site's tokens, before their staleness is incremented."""
        score = F.normalize(self.received[site.block], dim=1, p=2)
        score = score + STALENESS_WEIGHT * (stale.float() / self.interval)
        return spatial_bonus(score)

    def cache_tensors(self) -> Iterable[torch.Tensor]:
        yield from self.cache.values()
        yield from self.received.values()
        yield from self.staleness.values()

    def params(self) -> dict[str, object]:
        return {"interval": self.interval, "fresh_ratio": self.fresh_ratio, "ratio_schedule": self.ratio_schedule,
                "schedule": self.schedule, "layer_divisor": self.layer_divisor}


def attention_with_received(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The attention module's output computed with an explicit softmax map, and the attention each
    token receives (column sums of the head-averaged map), (B, T, C) and (B, T). q is scaled
    before the product, as the official ToCa attention does (the order changes the rounding)."""
    B, T, C = x.shape
    H = attn.num_heads
    q, k, v = attn.qkv(x).reshape(B, T, 3, H, C // H).permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, D)
    probs = ((q * (C // H) ** -0.5) @ k.transpose(-2, -1)).softmax(dim=-1)  # (B, H, T, T)
    out = attn.proj((probs @ v).transpose(1, 2).reshape(B, T, C))
    return out, probs.mean(dim=1).sum(dim=1)


def spatial_bonus(score: torch.Tensor) -> torch.Tensor:
    """Add SPATIAL_BONUS * (the block's maximum) to the best token of every 2x2 block of the token
    grid, so recomputed tokens spread over the image. Grids of odd side get no bonus."""
    B, T = score.shape
    g = math.isqrt(T)
    if g * g != T or g % 2:
        return score
    blocks = score.view(B, g // 2, 2, g // 2, 2).permute(0, 1, 3, 2, 4).reshape(B, -1, 4)  # (B, nb, 4)
    top, where = blocks.max(dim=-1, keepdim=True)
    mask = torch.zeros_like(blocks).scatter_(-1, where, 1.0)
    blocks = blocks + mask * top * SPATIAL_BONUS
    return blocks.view(B, g // 2, g // 2, 2, 2).permute(0, 1, 3, 2, 4).reshape(B, T)
