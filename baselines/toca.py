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
  (1262.84 / 1126.36 / 989.88 T with the FLOPs module's conventions and the re-projection below; the
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
The FLOPs module counts a partial single-stream site as the whole block recomputed for k queries
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
from rfc.cache.predictors import Predictor
from rfc.cache.registry import method_config
from rfc.cache.schedules import Schedule, require
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


RECIPES = ("auto", "dit", "flux")


@method_config("toca")
@dataclass
class ToCaConfig:
    _target_: str = "baselines.toca.ToCa"
    interval: int = 3
    fresh_ratio: float = 0.07
    ratio_schedule: str = "ddim50"
    schedule: str = "official"
    layer_divisor: int | None = OFFICIAL_LAYER_DIVISOR
    recipe: str = "auto"
    # every step full (N = 1) and no partial compute in between (R = 0), DiT and FLUX recipes alike
    degenerate: ClassVar[tuple[str, ...]] = ("method.interval=1", "method.fresh_ratio=0")


class ToCaDitSchedule(Schedule):
    """The official DiT code's schedule: block 0 decides (full at the first step and whenever the
    down-counting step is a multiple of the current interval, re-scheduling the interval when
    full); ``rest_full`` is the decision of blocks 1.. (the re-scheduled interval, or block 0's
    with ``mode="step"``). ``decide`` returns block 0's decision, the step's count in the NFC."""

    def __init__(self, interval: int, fresh_ratio: float, mode: str) -> None:
        self.interval, self.fresh_ratio, self.mode = interval, fresh_ratio, mode
        self.reset()

    def reset(self) -> None:
        self.current_interval = self.interval  # the official cal_threshold
        self.rest_full = True

    def decide(self, step: StepInfo, signal: torch.Tensor | None = None) -> bool:
        s, first = step.down_index, step.index == 0
        full = first or s % self.current_interval == 0
        if full:
            self.current_interval = self.adaptive_interval(s, step.num_steps)
        self.rest_full = full if self.mode == "step" else first or s % self.current_interval == 0
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


class ToCaFluxSchedule(Schedule):
    """The official FLUX code's schedule (``flux_full_steps``): one decision per step for every
    block; ``need_map``: this full step's attention maps are read by the next (partial) step."""

    def __init__(self, interval: int, fresh_ratio: float) -> None:
        self.interval, self.fresh_ratio = interval, fresh_ratio
        self._tables: dict[int, tuple[bool, ...]] = {}
        self.reset()

    def reset(self) -> None:
        self.rest_full = True
        self.need_map = False

    def table(self, num_steps: int) -> tuple[bool, ...]:
        if num_steps not in self._tables:
            self._tables[num_steps] = flux_full_steps(num_steps, self.interval, self.fresh_ratio)
        return self._tables[num_steps]

    def decide(self, step: StepInfo, signal: torch.Tensor | None = None) -> bool:
        table = self.table(step.num_steps)
        self.rest_full = table[step.index]
        following = step.index + 1
        self.need_map = self.fresh_ratio > 0 and self.rest_full and following < step.num_steps and not table[following]
        return self.rest_full


class TokenCache(Predictor):
    """ToCa's predictor: each site's output at its last full computation, of which a partial step
    recomputes the fresh tokens (the highest-scoring ones: attention received at the last full
    step plus staleness) and keeps the others. ``recipe`` picks how tokens are counted, scored
    and recomputed: "dit" (the official DiT code) or "flux" (the official FLUX code: per stream,
    single-stream blocks through their cached attention). ``recomputed`` is the number of tokens
    the last ``predict`` recomputed (0: the site was reused whole), for the method's accounting.
    The model's modules are used by the names the cache protocol gives them (``with_received``,
    ``with_attention``, ``from_attention``, a double-stream MLP's ``spans``: its token groups and their
    MLPs, the image MLP first)."""

    def __init__(self, method: ToCa) -> None:
        self.method = method
        self.reset()

    def reset(self) -> None:
        self.cache: dict[Site, torch.Tensor] = {}
        self.received: dict[int, torch.Tensor] = {}  # block -> (B, T) attention received
        self.staleness: dict[Site, torch.Tensor] = {}  # (B, T) partial steps since each token was recomputed
        self.single_attn: dict[int, torch.Tensor] = {}  # FLUX single-stream block -> attention before proj_out
        self.recomputed = 0

    def record(self, site: Site, inp: BranchInput | torch.Tensor, out: torch.Tensor, index: int) -> None:
        """A full computation; staleness back to zero where a later partial step scores tokens."""
        self.cache[site] = out
        m = self.method
        scored = site.branch != "attn" and (m.need_map if m.flux else site.branch == "mlp" and m.fresh_ratio > 0)
        if scored:
            self.staleness[site] = torch.zeros(out.shape[:2], dtype=torch.int32, device=out.device)

    def record_map(self, site: Site, received: torch.Tensor, attn: torch.Tensor | None = None) -> None:
        """The attention each token received at this full step (and a single-stream block's
        attention output before proj_out, which its partial steps reuse)."""
        self.received[site.block] = received
        if attn is not None:
            self.single_attn[site.block] = attn

    def predict(self, site: Site, inp: BranchInput | torch.Tensor, index: int,
                module: nn.Module | None = None) -> torch.Tensor:
        self.recomputed = 0
        if self.method.flux:
            return self._predict_flux(site, inp, module)
        return self._predict_dit(site, inp, module)

    def _predict_dit(self, site: Site, inp: BranchInput, module: nn.Module) -> torch.Tensor:
        m, step = self.method, self.method.step
        k = 0 if m.fresh_ratio == 0 else m.fresh_tokens(site, step.down_index, step.num_steps, inp.x.shape[1])
        stale = self.staleness.get(site)
        if k == 0:
            if stale is not None:
                stale.add_(1)
            return self.cache[site]
        idx = self.token_scores(site, stale).argsort(dim=-1, descending=True)[:, :k]  # (B, k)
        stale.add_(1)
        stale.scatter_(1, idx, 0)
        fresh = module(inp.tokens(idx))  # (B, k, C)
        self.recomputed = k
        out = scatter_tokens(self.cache[site], idx, fresh)
        self.cache[site] = out
        return out

    def token_scores(self, site: Site, stale: torch.Tensor) -> torch.Tensor:
        """(B, T) selection scores of a site's tokens, before their staleness is incremented."""
        score = F.normalize(self.received[site.block], dim=1, p=2)
        score = score + STALENESS_WEIGHT * (stale.float() / self.method.interval)
        return spatial_bonus(score)

    def _predict_flux(self, site: Site, inp: BranchInput, module: nn.Module) -> torch.Tensor:
        """Attention reused; MLPs (double-stream) and ``total`` (single-stream) recomputed for the
        fresh tokens."""
        if site.branch == "attn" or self.method.fresh_ratio == 0:
            return self.cache[site]
        if site.branch == "mlp":
            return self._flux_partial_mlp(site, inp, module)
        return self._flux_partial_total(site, inp, module)

    def _flux_fresh(self, site: Site, lo: int, hi: int) -> torch.Tensor:
        """(B, k) fresh tokens of a module covering tokens lo..hi of the stream, as positions in the
        whole stream: scored, then the module's staleness advanced (official cache_cutfresh)."""
        m = self.method
        double, layer = m.stream_layer[site.block]
        divisor = m.layer_divisor if m.layer_divisor is not None else max(m.stream_depth[double] - 1, 1)
        k = flux_fresh_tokens(m.fresh_ratio, layer, double, hi - lo, m.step.index, m.step.num_steps, divisor)
        stale = self.staleness[site][:, lo:hi]
        score = F.normalize(self.received[site.block][:, lo:hi], dim=-1, p=2)
        score = score + STALENESS_WEIGHT * (stale.float() / m.interval)
        idx = score.argsort(dim=-1, descending=True)[:, :k]
        stale.add_(1)
        stale.scatter_(1, idx, 0)
        return idx + lo

    def _flux_partial_mlp(self, site: Site, inp: BranchInput, module: nn.Module) -> torch.Tensor:
        """img_mlp on the fresh image tokens, then txt_mlp on the fresh text tokens, each chosen
        within its own stream; the other tokens keep the cached MLP outputs."""
        out, recomputed = self.cache[site], 0
        for lo, hi, ff in module.spans(inp.x.shape[1]):
            idx = self._flux_fresh(site, lo, hi)
            if idx.shape[1]:
                out = scatter_tokens(out, idx, ff(inp.tokens(idx)))
                recomputed += idx.shape[1]
        return self._flux_done(site, out, recomputed)

    def _flux_partial_total(self, site: Site, inp: BranchInput, module: nn.Module) -> torch.Tensor:
        """A single-stream block: proj_out([cached attention, gelu(proj_mlp(x))]) for the fresh
        tokens (among all text + image tokens), the cached output for the others."""
        idx = self._flux_fresh(site, 0, inp.x.shape[1])
        out = self.cache[site]
        if idx.shape[1]:
            attn = self.single_attn[site.block]
            attn = torch.gather(attn, 1, idx.unsqueeze(-1).expand(-1, -1, attn.shape[-1]))
            out = scatter_tokens(out, idx, module.from_attention(inp.tokens(idx), attn))
        return self._flux_done(site, out, idx.shape[1])

    def _flux_done(self, site: Site, out: torch.Tensor, recomputed: int) -> torch.Tensor:
        self.recomputed = recomputed
        self.cache[site] = out
        return out

    def tensors(self) -> Iterable[torch.Tensor]:
        yield from self.cache.values()
        yield from self.received.values()
        yield from self.staleness.values()
        yield from self.single_attn.values()


class ToCa(CacheMethod):
    """ToCa: a recipe's schedule (``ToCaDitSchedule`` or ``ToCaFluxSchedule``) plus a
    ``TokenCache`` predictor. ``recipe``: "dit" and "flux" follow the official DiT and FLUX code;
    "auto" (the default) takes the attached model's (its ``step_counting``: "up" is FLUX's)."""

    name = "toca"

    def __init__(self, interval: int = 3, fresh_ratio: float = 0.07, ratio_schedule: str = "ddim50",
                 schedule: str = "official", layer_divisor: int | None = OFFICIAL_LAYER_DIVISOR,
                 recipe: str = "auto") -> None:
        require(isinstance(interval, int) and interval >= 1, f"method.interval must be an integer >= 1, got {interval}")
        require(0.0 <= float(fresh_ratio) <= 1.0, f"method.fresh_ratio must be in [0, 1], got {fresh_ratio}")
        require(ratio_schedule in RATIO_SCHEDULES,
                f"method.ratio_schedule must be one of {sorted(RATIO_SCHEDULES)}, got {ratio_schedule!r}")
        require(schedule in SCHEDULES, f"method.schedule must be one of {SCHEDULES}, got {schedule!r}")
        require(layer_divisor is None or (isinstance(layer_divisor, int) and layer_divisor >= 1),
                f"method.layer_divisor must be an integer >= 1 or null (depth - 1), got {layer_divisor}")
        require(recipe in RECIPES, f"method.recipe must be one of {RECIPES}, got {recipe!r}")
        super().__init__()
        self.interval = interval
        self.fresh_ratio = float(fresh_ratio)
        self.ratio_schedule = ratio_schedule
        self.schedule_mode = schedule
        self.layer_divisor = layer_divisor
        self.recipe = recipe
        self.flux = recipe == "flux"  # resolved again on attach for "auto"
        self.predictor = TokenCache(self)
        self.schedule = self._make_schedule()
        self.reset()

    def _make_schedule(self) -> Schedule:
        if self.flux:
            return ToCaFluxSchedule(self.interval, self.fresh_ratio)
        return ToCaDitSchedule(self.interval, self.fresh_ratio, self.schedule_mode)

    @property
    def used_recipe(self) -> str:
        """The recipe this method runs: the configured one, "auto" resolved by the attached model."""
        return "flux" if self.flux else "dit"

    def reset(self) -> None:
        super().reset()
        self.schedule.reset()
        self.predictor.reset()
        self.rest_full = True  # decision of blocks 1.. at the current step (self.full is block 0's)
        self.need_map = False  # FLUX: this full step's attention maps are read by the next (partial) step

    # the predictor's stores, by the names the tests and diagnostics read
    @property
    def cache(self) -> dict[Site, torch.Tensor]:
        return self.predictor.cache

    @property
    def received(self) -> dict[int, torch.Tensor]:
        return self.predictor.received

    @property
    def staleness(self) -> dict[Site, torch.Tensor]:
        return self.predictor.staleness

    @property
    def current_interval(self) -> int:
        return getattr(self.schedule, "current_interval", self.interval)

    def set_sites(self, model: nn.Module) -> None:
        """The sites, the recipe ("auto": FLUX's when the model counts steps up, as the official
        FLUX code does), and on FLUX each block's stream and layer within it (the official code
        counts layers per stream: a double-stream block has an attention and an MLP site, a
        single-stream block only ``total``)."""
        super().set_sites(model)
        flux = self.recipe == "flux" or (self.recipe == "auto" and self.counting == "up")
        if flux != self.flux:
            self.flux = flux
            self.schedule = self._make_schedule()
        self.stream_layer: list[tuple[bool, int]] = []
        counts = {True: 0, False: 0}
        for block in model.blocks:
            double = "total" not in block_branches(block)
            self.stream_layer.append((double, counts[double]))
            counts[double] += 1
        self.stream_depth = counts

    def attach(self, model: nn.Module) -> None:
        """Refuse a model whose official code follows the other recipe (its ``step_counting``:
        "up" is FLUX's), before anything is hooked."""
        native = "flux" if getattr(model, "step_counting", "down") == "up" else "dit"
        if self.recipe not in ("auto", native):
            raise ValueError(f"method.recipe={self.recipe} cannot run on this model, whose recipe is {native} "
                             "(use method.recipe=auto)")
        super().attach(model)

    def check_model_family(self, family: str, model_class: type | None = None) -> None:
        if self.recipe != "auto" and self.recipe != family:
            raise ValueError(f"method.recipe={self.recipe} cannot run on a {family} model (use method.recipe=auto "
                             f"or {family})")

    # ---- schedule ---------------------------------------------------------------------------
    def decide(self, step: StepInfo) -> bool:
        """Block 0's decision, which is the step's count in the papers' NFC; blocks 1.. then test
        the same step against the interval block 0 may just have re-scheduled (DiT recipe)."""
        full = self.schedule.decide(step)
        self.rest_full = self.schedule.rest_full
        self.need_map = getattr(self.schedule, "need_map", False)
        return full

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
        full = self.full if self.flux else self.block_full(site.block)
        if full:
            out = self.full_site(site, inp, module)
            self.predictor.record(site, inp, out, self.step.index if self.step is not None else 0)
            return out
        out = self.predictor.predict(site, inp, self.step.index, module)
        if self.predictor.recomputed:
            self.count_partial(site, self.predictor.recomputed)
        else:
            self._stats.cached_sites += 1
        return out

    def full_site(self, site: Site, inp: BranchInput, module: nn.Module) -> torch.Tensor:
        """A site computed on every token; with the explicit attention map when a partial step
        will score tokens by it (DiT recipe: whenever R > 0; FLUX recipe: when the next step is
        partial), else the model's own fused computation."""
        x = inp.full()
        if self.flux and self.need_map and site.branch == "attn":
            self.count_full(site)
            out, received = module.with_received(x)
            self.predictor.record_map(site, received)
        elif self.flux and self.need_map and site.branch == "total":
            self.count_full(site)
            out, attn, received = module.with_attention(x)
            self.predictor.record_map(site, received, attn)
        elif not self.flux and site.branch == "attn" and self.fresh_ratio > 0:
            self.count_full(site)
            out, received = attention_with_received(module, x)
            self.predictor.record_map(site, received)
        else:
            out = self.run_full(site, module, x)
        return out

    def cache_tensors(self) -> Iterable[torch.Tensor]:
        return self.predictor.tensors()

    def params(self) -> dict[str, object]:
        """The settings; ``recipe`` only when it was named (auto is the model family's recipe, which
        the row already records, and leaving it out keeps the settings of earlier rows the same)."""
        params: dict[str, object] = {"interval": self.interval, "fresh_ratio": self.fresh_ratio,
                                     "ratio_schedule": self.ratio_schedule, "schedule": self.schedule_mode,
                                     "layer_divisor": self.layer_divisor}
        if self.recipe != "auto":
            params["recipe"] = self.recipe
        return params


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
