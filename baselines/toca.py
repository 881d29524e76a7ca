"""ToCa, token-wise caching (Zou et al., 2025), as its official DiT code behaves, and on FLUX as its
official FLUX code behaves (below).

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

Attention maps come from an explicit softmax (q scaled before the product, as the official
attention module does it) on full blocks, and only when R > 0; otherwise the model's own fused
attention runs, which keeps N = 1, R = 0 bit-identical to ``method=none``.

FLUX (a model with ``step_counting == "up"``) follows the official FLUX code instead
(flux-ToCa/src/flux: model.py, modules/layers.py, modules/cache_functions), which differs from the
DiT code in almost every choice:

- Schedule (cal_type, once per step for every block, steps counted up from 0 = our index): with
  R > 0 steps 0, 1 and 2 are full, then a step is full when the counter of partial steps since the
  last full one equals N - 1, i.e. full at 2 + jN; with R = 0 full at 0 and every N (FORA). The
  force scheduler's step weight is 0 on FLUX, so the interval stays N (no adaptive interval). NFC
  on 50 steps: N = 4 / 5 / 6 / 12 -> 14 / 12 / 10 / 6. The FLOPs the official README lists for
  ToCa4/5/6-01 (1263.22 / 1126.76 / 990.30 T) follow from these counts and the ratios below
  (1262.84 / 1126.36 / 989.88 T with rfc.models.flops' conventions and the re-projection below; the
  0.4 T left is what calflops counts outside the blocks).
- Modules. Double-stream block: the joint attention (img_attn + txt_attn, our ``attn`` site) is
  reused whole; its MLPs (img_mlp, txt_mlp: our ``mlp`` site) are recomputed on a token subset
  chosen per stream, image tokens among image tokens and text tokens among text tokens, in that
  order. Single-stream block (``total``): the partial step recomputes proj_mlp + GELU for the fresh
  tokens (chosen among all text + image tokens) and forms their output as proj_out([cached
  attention of those tokens, new MLP]); the other tokens keep the cached ``total``. The attention
  output before proj_out is therefore cached on full steps, apart from ``total``.
- Ratio (fresh_ratio_schedule 'ToCa'): R * l_layer * l_step * l_stream in float64, clamped in fp32,
  k = int(ratio * tokens of the stream) (n_img for img_mlp, n_txt for txt_mlp, n_txt + n_img in a
  single-stream block). l_layer = 1 + 0.5 - 2 * 0.5 * layer / X with the layer counted within its
  stream (0..18 double, 0..37 single on FLUX.1) and X = ``layer_divisor`` (27 hard-coded there too;
  null = that stream's depth - 1), l_step = 1 (step weight 0), l_stream = 0.4 double / 1.6 single;
  no module factor.
- Score: the L2-normalised attention each token received at its block's last full step (the map
  averaged over heads, then over queries; a double-stream block's joint map is split into its text
  and image parts, each normalised alone) + 0.25 * staleness / N; no spatial bonus (commented out
  in the official cache_cutfresh). Staleness is kept per module (img_mlp, txt_mlp, single ``mlp``),
  zero after a full step, + 1 at every partial step (also when k = 0), 0 for the recomputed tokens,
  after they were scored.
- ``ratio_schedule`` and ``schedule`` are DiT options and are not read on FLUX. The official FLUX
  defaults are R = 0.1 and N = 4 (cache_init's 'ToCa' mode, soft_fresh_weight 0.25); the method's
  defaults stay the DiT ones (R = 0.07, N = 3), the FLUX variants set R = 0.1.

Where the official FLUX code is odd, this follows it and says so: the received attention is a mean
over queries (the DiT code sums; the L2 normalisation leaves only rounding between them); text
tokens compete with image tokens in single-stream blocks; the official double-stream partial step
caches the attention before to_out / to_add_out and re-applies both to every token at every
partial step: the same numbers as reusing the projected output, which is what runs here, so the
accounting counts that site as cached (calflops counted the 2 N C^2 per block, included in the
README figures above); its single-stream partial step also writes the fresh tokens' pre-activation
MLP into a cache that nothing reads (not kept here), and it slices proj_mlp out of linear1 every
time (diffusers has proj_mlp already). Its attention is always the explicit softmax; here a full
step computes the map only when the next step is partial (no other map is ever read) and runs
diffusers' fused attention otherwise, so N = 1 (every step full) equals ``method=none`` bit for bit
at any R, and a full step that computes a map differs from the fused one by rounding only
(tests: 1e-5 of the output's scale).

Accounting on FLUX: a partial double-stream MLP is count_partial(mlp site, k_txt + k_img)
(partial_mlp_tokens), a partial single-stream block count_partial(total site, k)
(partial_total_tokens); reused attention and k = 0 sites are cached_sites; NFC is the full steps.
rfc.models.flops counts a partial single-stream site as the whole block recomputed for k queries
(q, k, v, attention against all keys, proj_mlp, GELU, proj_out), more than this partial step runs
(proj_mlp, GELU, proj_out): FLUX.1-dev, 50 steps, N = 5, R = 0.1 comes to 1161.7 T there against
the 1063.6 T that ran (1126.4 T with the official re-projection).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from rfc.cache.base import BranchInput, CacheMethod, Site, block_branches
from rfc.cache.registry import method_config
from rfc.cache.schedules import require
from rfc.models.flux import joint_attention_with_received, single_total_from_attention, single_total_with_attention
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
# the official FLUX code (cal_type, fresh_ratio_scheduler 'ToCa', force_scheduler)
FLUX_FIRST_FULL = 3  # steps 0, 1, 2 are full when R > 0
FLUX_STEP_WEIGHT = 0.0  # l_step = 1 - v + 2 v step / T with v = 0 (and the force scheduler's weight is 0 too)
FLUX_LAYER_WEIGHT = 0.5
FLUX_STREAM_WEIGHT = 0.6  # l_stream = 1 - 0.6 in double-stream blocks, 1 + 0.6 in single-stream ones


def linear_factor(weight: float, x: float, span: float) -> float:
    """1 + v - 2 v x / X, in the official operation order (float64)."""
    return 1 + weight - 2 * weight * x / span


def flux_full_steps(num_steps: int, interval: int, fresh_ratio: float) -> tuple[bool, ...]:
    """Which steps (counted up) the official FLUX code computes in full: its cal_type run step by
    step. With R > 0 the first three steps are full; afterwards a step is full when the count of
    partial steps since the last full one has reached interval - 1 (the interval is
    round(N / l_step) with l_step = 1, i.e. N); a full step resets the count. With R = 0 only
    step 0 is a first step (FORA)."""
    counter, full = 0, []
    for step in range(num_steps):
        first = step < FLUX_FIRST_FULL if fresh_ratio > 0 else step == 0
        if first or counter == interval - 1:
            counter = 0
            full.append(True)
        else:
            counter += 1
            full.append(False)
    return tuple(full)


def flux_fresh_tokens(fresh_ratio: float, layer: int, double: bool, tokens: int, step: int = 0, num_steps: int = 1,
                      layer_divisor: float = OFFICIAL_LAYER_DIVISOR) -> int:
    """k of the official FLUX 'ToCa' ratio schedule: R * l_layer * l_step * l_stream multiplied in
    float64 in the official order, clamped to [0, 1] as an fp32 tensor, times ``tokens`` in fp32,
    truncated. ``layer`` counts within its stream; l_step is 1 (weight 0) whatever the step."""
    step_factor = 1 - FLUX_STEP_WEIGHT + 2 * FLUX_STEP_WEIGHT * step / num_steps
    layer_factor = linear_factor(FLUX_LAYER_WEIGHT, layer, layer_divisor)
    stream_factor = (1 - FLUX_STREAM_WEIGHT) if double else (1 + FLUX_STREAM_WEIGHT)
    ratio = fresh_ratio * layer_factor * step_factor * stream_factor
    r = torch.tensor(ratio, dtype=torch.float32).clamp(0.0, 1.0)
    return int(r * tokens)


@method_config("toca")
@dataclass
class ToCaConfig:
    _target_: str = "baselines.toca.ToCa"
    interval: int = 3
    fresh_ratio: float = 0.07
    ratio_schedule: str = "ddim50"
    schedule: str = "official"
    layer_divisor: int | None = OFFICIAL_LAYER_DIVISOR
    # every step full (N = 1) and no partial compute in between (R = 0), DiT and FLUX recipes alike
    degenerate: ClassVar[tuple[str, ...]] = ("method.interval=1", "method.fresh_ratio=0")


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
        self.flux = False  # set on attach: the model counts steps up (the official FLUX code's path)
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
        self.need_map = False  # FLUX: this full step's attention maps are read by the next (partial) step
        self.single_attn: dict[int, torch.Tensor] = {}  # FLUX single-stream block -> attention before proj_out
        self._flux_schedules: dict[int, tuple[bool, ...]] = {}

    def set_sites(self, model: nn.Module) -> None:
        """The sites, and on FLUX each block's stream and layer within it (the official code counts
        layers per stream: a double-stream block has an attention and an MLP site, a single-stream
        block only ``total``)."""
        super().set_sites(model)
        self.flux = self.counting == "up"
        self.stream_layer: list[tuple[bool, int]] = []
        counts = {True: 0, False: 0}
        for block in model.blocks:
            double = "total" not in block_branches(block)
            self.stream_layer.append((double, counts[double]))
            counts[double] += 1
        self.stream_depth = counts

    # ---- schedule ---------------------------------------------------------------------------
    def decide(self, step: StepInfo) -> bool:
        """Block 0's decision, which is the step's count in the papers' NFC; blocks 1.. then test
        the same step against the interval block 0 may just have re-scheduled."""
        if self.counting == "up":  # the official FLUX code: one decision per step for every block
            schedule = self.flux_schedule(step.num_steps)
            self.rest_full = schedule[step.index]
            following = step.index + 1
            self.need_map = (self.fresh_ratio > 0 and self.rest_full and following < step.num_steps
                             and not schedule[following])
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

    def flux_schedule(self, num_steps: int) -> tuple[bool, ...]:
        if num_steps not in self._flux_schedules:
            self._flux_schedules[num_steps] = flux_full_steps(num_steps, self.interval, self.fresh_ratio)
        return self._flux_schedules[num_steps]

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
        if self.flux:
            return self.flux_branch(site, inp, module)
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
        out = scatter_tokens(self.cache[site], idx, fresh)
        self.cache[site] = out
        return out

    def token_scores(self, site: Site, stale: torch.Tensor) -> torch.Tensor:
        """(B, T) selection scores of a site's tokens, before their staleness is incremented."""
        score = F.normalize(self.received[site.block], dim=1, p=2)
        score = score + STALENESS_WEIGHT * (stale.float() / self.interval)
        return spatial_bonus(score)

    # ---- FLUX ---------------------------------------------------------------------------------
    def flux_branch(self, site: Site, inp: BranchInput, module: nn.Module) -> torch.Tensor:
        """A site on FLUX: computed and cached on full steps; on partial steps attention reused,
        MLPs (double-stream) and ``total`` (single-stream) recomputed for the fresh tokens."""
        if self.full:
            return self.flux_full(site, inp, module)
        if site.branch == "attn" or self.fresh_ratio == 0:
            self._stats.cached_sites += 1
            return self.cache[site]
        if site.branch == "mlp":
            return self.flux_partial_mlp(site, inp, module)
        return self.flux_partial_total(site, inp, module)

    def flux_full(self, site: Site, inp: BranchInput, module: nn.Module) -> torch.Tensor:
        """A full site; when the next step is partial, with the explicit attention map (and a
        single-stream block's attention output kept apart), staleness back to zero."""
        x = inp.full()
        if self.need_map and site.branch == "attn":
            self.count_full(site)
            out, self.received[site.block] = joint_attention_with_received(module, x)
        elif self.need_map and site.branch == "total":
            self.count_full(site)
            out, self.single_attn[site.block], self.received[site.block] = single_total_with_attention(module, x)
        else:
            out = self.run_full(site, module, x)
        self.cache[site] = out
        if self.need_map and site.branch != "attn":
            self.staleness[site] = torch.zeros(out.shape[:2], dtype=torch.int32, device=out.device)
        return out

    def flux_fresh(self, site: Site, lo: int, hi: int) -> torch.Tensor:
        """(B, k) fresh tokens of a module covering tokens lo..hi of the stream, as positions in the
        whole stream: scored, then the module's staleness advanced (official cache_cutfresh)."""
        double, layer = self.stream_layer[site.block]
        divisor = self.layer_divisor if self.layer_divisor is not None else max(self.stream_depth[double] - 1, 1)
        k = flux_fresh_tokens(self.fresh_ratio, layer, double, hi - lo, self.step.index, self.step.num_steps, divisor)
        stale = self.staleness[site][:, lo:hi]
        score = F.normalize(self.received[site.block][:, lo:hi], dim=-1, p=2)
        score = score + STALENESS_WEIGHT * (stale.float() / self.interval)
        idx = score.argsort(dim=-1, descending=True)[:, :k]
        stale.add_(1)
        stale.scatter_(1, idx, 0)
        return idx + lo

    def flux_partial_mlp(self, site: Site, inp: BranchInput, module: nn.Module) -> torch.Tensor:
        """img_mlp on the fresh image tokens, then txt_mlp on the fresh text tokens, each chosen
        within its own stream; the other tokens keep the cached MLP outputs."""
        n, T = module.ctx.n_txt, inp.x.shape[1]
        out, recomputed = self.cache[site], 0
        for lo, hi, ff in ((n, T, module.ff_img), (0, n, module.ff_txt)):
            idx = self.flux_fresh(site, lo, hi)
            if idx.shape[1]:
                out = scatter_tokens(out, idx, ff(inp.tokens(idx)))
                recomputed += idx.shape[1]
        return self.flux_partial_done(site, out, recomputed)

    def flux_partial_total(self, site: Site, inp: BranchInput, module: nn.Module) -> torch.Tensor:
        """A single-stream block: proj_out([cached attention, gelu(proj_mlp(x))]) for the fresh
        tokens (among all text + image tokens), the cached output for the others."""
        idx = self.flux_fresh(site, 0, inp.x.shape[1])
        out = self.cache[site]
        if idx.shape[1]:
            attn = self.single_attn[site.block]
            attn = torch.gather(attn, 1, idx.unsqueeze(-1).expand(-1, -1, attn.shape[-1]))
            out = scatter_tokens(out, idx, single_total_from_attention(module, inp.tokens(idx), attn))
        return self.flux_partial_done(site, out, idx.shape[1])

    def flux_partial_done(self, site: Site, out: torch.Tensor, recomputed: int) -> torch.Tensor:
        if recomputed:
            self.count_partial(site, recomputed)
        else:
            self._stats.cached_sites += 1
        self.cache[site] = out
        return out

    def cache_tensors(self) -> Iterable[torch.Tensor]:
        yield from self.cache.values()
        yield from self.received.values()
        yield from self.staleness.values()
        yield from self.single_attn.values()

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


def scatter_tokens(out: torch.Tensor, idx: torch.Tensor, fresh: torch.Tensor) -> torch.Tensor:
    """``out`` (B, T, C) with the tokens idx (B, k) replaced by fresh (B, k, C) (a new tensor)."""
    return out.scatter(1, idx.unsqueeze(-1).expand(-1, -1, fresh.shape[-1]), fresh)


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
