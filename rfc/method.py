"""Relational Feature Caching (RFC, ICLR 2026): relational feature estimation (RFE) and
relational cache scheduling (RCS).

Notation of the paper: at the last full step t a branch (the attention or MLP of one block) had
input I(t) = modulate(norm(x)) and output O(t); the previous full step was t + N; a cached step is
t - k. Here "index" is the sampler's forward-order step index, so k = index - index of the last
full step, and N is the distance between the last two full steps.

RFE: TaylorSeer's expansion gives the direction of the change, T_m(k) = sum_{i=1..m} k^i / i!
Delta^i O(t) / N^i; the magnitude comes from how much the input moved:
    s(t)     = ||O(t) - O(t+N)|| / ||I(t) - I(t+N)||          (re-estimated at every full step)
    O(t - k) = O(t) + s(t) ||I(t - k) - I(t)|| T_m(k) / ||T_m(k)||
where I(t - k) is computed from the running residual stream (cheap: a norm and a modulation).
Norms run over tokens x channels, per sample (each row, guidance halves apart) by default.

RCS: the monitored module's input is forecast by the same Taylor expansion,
I_T(t - k) = I(t) + sum_i k^i / i! Delta^i I(t) / N^i, and the relative L1 error
E(t - k) = ||I(t - k) - I_T(t - k)||_1 / ||I(t - k)||_1 (sums over the whole batch: one schedule per
batch, as the paper's code; ``schedule_scope=sample``: each sample its own schedule and predictor,
see ``RFC._branch_per_sample``) is accumulated since the last full step. When the sum exceeds tau
the step is computed in full. The decision is made from block 0's attention input, before the
other blocks run. tau = 0 computes every step in full.

Ablation switches: ``rfe`` off = TaylorSeer's magnitude (the plain Taylor prediction); ``rcs`` off
= TaylorSeer's fixed schedule (``warmup`` full steps, then one every ``interval``); ``magnitude``
picks the scale of the Taylor direction: relational (RFE), linear (FasterCache-style: the last
output change scaled by k / N) or constant (``constant_w`` times the Taylor term's own norm);
``rcs_modules`` first (block 0's attention input, the paper's default) or all (see RelationalSchedule).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from rfc.cache.base import BranchInput, CacheMethod, Site, branch_input, input_dtype, input_values
from rfc.cache.fused import (
    GraphedStep,
    branch_dtype,
    forward_with_stores,
    graph_mode,
    grouped_modulation,
    maybe_compile,
    model_device,
    modulate_groups,
    per_token,
    spans,
    step_scalars,
    taylor_cached_step,
    token_groups,
)
from rfc.cache.predictors import (
    FactorBank,
    Predictor,
    TaylorFactors,
    parse_storage_dtype,
    store_all,
    store_factors,
    taylor_expand,
)
from rfc.cache.registry import method_config
from rfc.cache.schedules import Schedule, Signal, WarmupInterval, check_scope, require, scope_params
from rfc.samplers.sampling import StepInfo

MAGNITUDES = ("relational", "linear", "constant")
REDUCTIONS = ("sample", "batch")
RCS_MODULES = ("first", "all")
FIRST = Site(0, "attn")

# ---- the equations ---------------------------------------------------------------------------
# Small functions over stacked tensors (..., B, T, C): one site (B, T, C) on the per-site path,
# every site (S, B, T, C) in the step programs. Both paths call these and nothing else for RFE,
# s(t) and RCS's error.


def token_norm(x: torch.Tensor, reduction: str = "sample") -> torch.Tensor:
    """||x|| over tokens x channels, in fp32: per sample (..., B), or over the whole batch (..., 1)
    with ``reduction="batch"``."""
    flat = x.float().flatten(-2)  # (..., B, T*C)
    return flat.norm(dim=-1) if reduction == "sample" else flat.flatten(-2).norm(dim=-1, keepdim=True)


def change_norm(now: torch.Tensor, before: torch.Tensor, reduction: str = "sample",
                inplace: bool = False) -> torch.Tensor:
    """||now - before|| over tokens x channels, the difference taken in fp32 (``token_norm``).
    ``inplace``: ``now`` is a scratch the caller no longer needs, and the difference of two fp32
    tensors is taken into it (the same values, no allocation)."""
    if inplace and now.dtype == before.dtype == torch.float32:
        return token_norm(now.sub_(before), reduction)
    return token_norm(now.float() - before.float(), reduction)


def relation(out_change: torch.Tensor, in_change: torch.Tensor) -> torch.Tensor:
    """s(t) = ||O(t) - O(t+N)|| / ||I(t) - I(t+N)||: how far the output moved per unit of input
    movement between the last two full steps."""
    return out_change / in_change.clamp_min(1e-12)


def taylor_norm(gram: torch.Tensor, c_hi: torch.Tensor) -> torch.Tensor:
    """||T_m(k)|| with T_m(k) = sum_{i>=1} c_i F_i, from the Gram matrix G_ij = <F_i, F_j> of the
    factors (..., B, m, m) and the coefficients c_i = k^i / i! (m,): sqrt(c^T G c), per sample,
    without reading the factors."""
    return torch.einsum("i,...ij,j->...", c_hi, gram, c_hi).clamp_min(0).sqrt()


def rfe_weight(ratio: torch.Tensor, in_change: torch.Tensor, t_norm: torch.Tensor) -> torch.Tensor:
    """RFE: the weight a of the Taylor term in O(t - k) = O(t) + a T_m(k), a = s(t) ||I(t - k) -
    I(t)|| / ||T_m(k)||: the direction from Taylor, the magnitude from the input's movement."""
    return ratio * in_change / t_norm.clamp_min(1e-12)


def forecast_error(actual: torch.Tensor, forecast: torch.Tensor) -> torch.Tensor:
    """RCS: E = ||I - I_T||_1 / ||I||_1 over the whole batch (one schedule per batch)."""
    return (actual - forecast).abs().sum() / actual.abs().sum().clamp_min(1e-12)


def relative_l1(actual: torch.Tensor, forecast: torch.Tensor) -> float:
    """``forecast_error`` as a Python float (what the schedule accumulates)."""
    return float(forecast_error(actual, forecast))


def row_norm(x: torch.Tensor, reduction: str) -> torch.Tensor:
    """||x|| over tokens x channels shaped to scale (B, T, C) values: (B, 1, 1) or (1, 1, 1)."""
    return token_norm(x, reduction).view(-1, 1, 1)


@dataclass
class RelationalState:
    """What RFE keeps for one branch: the output's Taylor factors (factors[0] = O(t)), the input at
    the last full step, and the two scales measured between the last two full steps."""

    out: TaylorFactors
    inp: torch.Tensor | None = None  # I(t)
    ratio: torch.Tensor | None = None  # s(t) = ||dO|| / ||dI||, (B, 1, 1) or (1, 1, 1)
    out_change: torch.Tensor | None = None  # ||O(t) - O(t+N)||, for the linear magnitude
    spacing: int = 0  # N: steps between the last two full steps

    def update(self, out: torch.Tensor, inp: torch.Tensor | None, index: int, reduction: str,
               dtype: torch.dtype) -> None:
        """Record a full computation at step ``index``."""
        if self.out.last_index is not None:
            self.out_change = change_norm(out, self.out.factors[0], reduction).view(-1, 1, 1)
            self.spacing = index - self.out.last_index
            if inp is not None and self.inp is not None:
                self.ratio = relation(self.out_change, change_norm(inp, self.inp, reduction).view(-1, 1, 1))
        self.out.update(out, index)
        if inp is not None:
            self.inp = inp.to(dtype)

    def tensors(self) -> list[torch.Tensor]:
        return self.out.tensors() + ([self.inp] if self.inp is not None else [])


def relational_prediction(state: RelationalState, index: int, magnitude: str, reduction: str,
                          inp: torch.Tensor | None = None, constant_w: float = 1.2) -> torch.Tensor:
    """O(t - k) = O(t) + a T_m(k), the weight a given by ``magnitude`` (relational: RFE's
    ``rfe_weight``; linear: ||O(t) - O(t+N)|| k / N / ||T_m(k)||; constant: w); plain reuse of
    O(t) until two full steps exist (no direction yet)."""
    base = state.out.factors[0].float()
    if len(state.out.factors) < 2:
        return base
    taylor = state.out.predict(index) - base  # T_m(k)
    t_norm = row_norm(taylor, reduction)
    if magnitude == "relational":
        if state.ratio is None or inp is None:
            return base
        a = rfe_weight(state.ratio, change_norm(inp, state.inp, reduction).view(-1, 1, 1), t_norm)
    elif magnitude == "linear":
        k = index - state.out.last_index
        a = state.out_change * (k / state.spacing) / t_norm.clamp_min(1e-12)
    else:  # constant: the Taylor term rescaled by w
        a = constant_w
    return base + a * taylor


class RelationalSchedule(Schedule):
    """RCS, a ``Schedule`` whose signal is block 0's attention input (``Signal.INPUT``).
    ``observe_full`` is told every full step's monitored inputs; ``decide`` takes block 0's
    attention input at a candidate step and says whether to compute it in full.

    With ``modules="all"`` every branch's input is forecast; the accumulated error is a sum over
    cached steps of the mean relative error over all branches. Only block 0's input exists before
    the blocks run, so the current step enters the decision with block 0's error, and is replaced
    by the all-branch mean once the step has run (``end_step``).
    """

    signal = Signal.INPUT

    def __init__(self, tau: float, warmup: int, order: int, modules: str, dtype: torch.dtype) -> None:
        self.tau, self.warmup, self.order, self.modules, self.dtype = tau, warmup, order, modules, dtype
        self.bank = FactorBank(order, 0, dtype)
        self.reset()

    def setup(self, num_sites: int) -> None:
        """Size the forecast bank for a model of ``num_sites`` sites (one site, or every branch)."""
        sites = num_sites if self.modules == "all" else 1
        if self.bank.sites != sites:
            self.bank = FactorBank(self.order, sites, self.dtype)

    def reset(self) -> None:
        self.bank.reset()  # the forecasts' Taylor factors, slot s = site.module_index ("all") or 0
        self.accumulated = 0.0
        self.step_errors: list[float] = []  # the current cached step's per-branch errors ("all")
        self.history: list[tuple[int, float]] = []  # (index, accumulated error) at each decision

    def monitors(self, site: Site) -> bool:
        return site == FIRST or self.modules == "all"

    def slot(self, site: Site) -> int:
        return site.module_index if self.modules == "all" else 0

    def observe_full(self, site: Site, inp: torch.Tensor, index: int) -> None:
        self.bank.update(self.slot(site), inp, index)

    def error(self, site: Site, inp: torch.Tensor, index: int) -> float:
        return relative_l1(inp, self.bank.predict(self.slot(site), index, inp.dtype))

    def decide(self, step: StepInfo, signal: torch.Tensor | None = None, error: torch.Tensor | None = None) -> bool:
        """Full or cached at ``step`` from block 0's attention input ``signal``; ``error``: its
        forecast error already computed by the step's probe (the same quantity as
        ``error(FIRST, signal, step.index)``)."""
        inp0, index = signal, step.index
        if self.tau <= 0 or index < self.warmup or self.bank.last_index is None:
            self.accumulated = 0.0
            return True
        e0 = float(error) if error is not None else self.error(FIRST, inp0, index)
        self.accumulated += e0
        self.history.append((index, self.accumulated))
        if self.accumulated > self.tau:
            self.accumulated = 0.0
            return True
        self.step_errors = [e0]
        return False

    def observe_cached(self, site: Site, inp: torch.Tensor, index: int) -> None:
        if self.modules == "all" and site != FIRST and self.bank.last_index is not None:
            self.step_errors.append(self.error(site, inp, index))

    def end_cached_step(self) -> None:
        if self.modules == "all" and self.step_errors:
            self.accumulated += sum(self.step_errors) / len(self.step_errors) - self.step_errors[0]
        self.step_errors = []

    def tensors(self) -> list[torch.Tensor]:
        return self.bank.tensors()

    def params(self) -> dict[str, object]:
        return {"tau": self.tau, "warmup": self.warmup, "rcs_modules": self.modules}


class RelationalPredictor(Predictor):
    """RFE as a ``Predictor``: every site's output factors in one FactorBank (with the Gram
    matrices of the higher factors for the relational magnitude), and per site a
    ``RelationalState`` (I(t), s(t), the last output change). ``magnitude``: relational (RFE),
    linear, constant or taylor (rfe off: the plain Taylor prediction). With ``stacked`` the
    inputs and ratios of every site also live in (S, B, T, C) / (S, B) buffers, the layout the
    step programs read and write."""

    def __init__(self, order: int, magnitude: str, reduction: str, dtype: torch.dtype, constant_w: float) -> None:
        self.order, self.magnitude, self.reduction = order, magnitude, reduction
        self.dtype, self.constant_w = dtype, constant_w
        self.stacked = False
        self.bank = FactorBank(order, 0, dtype, gram=magnitude == "relational")
        self.inputs: torch.Tensor | None = None  # (S, B, T, C): I(t) of every site, for the fused step
        self.ratios: torch.Tensor | None = None  # (S, B): s(t) of every site
        self.states: dict[Site, RelationalState] = {}

    @property
    def needs_inputs(self) -> bool:
        """Whether predictions read the branch inputs (RFE's relational magnitude does)."""
        return self.magnitude == "relational"

    def setup(self, sites: int) -> None:
        """Size the bank for ``sites`` sites; kept from batch to batch (zeroed) while the count
        fits, so captured step programs stay valid."""
        self.states = {}
        if self.bank.sites != sites:
            self.bank = FactorBank(self.order, sites, self.dtype, gram=self.magnitude == "relational")
            self.inputs = self.ratios = None
        else:
            self.bank.reset()
            for buf in (self.inputs, self.ratios):
                if buf is not None:
                    buf.zero_()

    def reset(self) -> None:
        self.setup(self.bank.sites)

    def free(self) -> None:
        """Release the buffers (the method was detached)."""
        self.bank.free()
        self.inputs = self.ratios = None

    def record(self, site: Site, inp: BranchInput | torch.Tensor, out: torch.Tensor, index: int) -> None:
        state = self.states.setdefault(site, RelationalState(TaylorFactors(bank=self.bank, site=site.module_index)))
        state.update(out, input_values(inp) if self.needs_inputs else None, index, self.reduction, self.dtype)
        if self.needs_inputs and self.stacked:
            self._gather(site.module_index, state)

    def predict(self, site: Site, inp: BranchInput | torch.Tensor, index: int,
                module: nn.Module | None = None) -> torch.Tensor:
        state = self.states[site]
        dtype = input_dtype(inp)
        if self.magnitude == "taylor":
            return state.out.predict(index, dtype)
        x_now = input_values(inp) if self.needs_inputs else None
        return relational_prediction(state, index, self.magnitude, self.reduction, x_now, self.constant_w).to(dtype)

    def _gather(self, s: int, state: RelationalState) -> None:
        """Keep I(t) and s(t) of site s in the stacked buffers the fused step reads."""
        self.allocate_inputs(state.inp.shape, state.inp.device)
        self.inputs[s] = state.inp
        state.inp = self.inputs[s]
        if state.ratio is not None:
            self.ratios[s] = state.ratio.view(-1)

    def allocate_inputs(self, shape: torch.Size, device: torch.device) -> None:
        """I(t) and s(t) of every site, (S, B, T, C) and (S, B), kept while the shape fits."""
        want = (self.bank.sites, *shape)
        if self.inputs is None or self.inputs.shape != want or self.inputs.device != device:
            self.inputs = torch.zeros(want, dtype=self.dtype, device=device)
            self.ratios = torch.zeros(want[:2], device=device)

    def tensors(self) -> Iterable[torch.Tensor]:
        for state in self.states.values():
            if self.inputs is None or state.inp is None:
                yield from state.tensors()
        yield from self.bank.tensors()
        if self.inputs is not None:
            yield from (self.inputs, self.ratios)

    def params(self) -> dict[str, object]:
        return {"order": self.order, "magnitude": self.magnitude, "constant_w": self.constant_w,
                "norm_reduction": self.reduction}


# ---- step programs: memory arranged for one function per step, the math from above -------------


@dataclass
class Probe:
    """What RFC's schedule computed before deciding a step: the embedding, block 0's attention
    input and (with a forecast) RCS's error; the step's program reuses them."""

    tokens: torch.Tensor
    c: torch.Tensor
    inp0: torch.Tensor
    error: torch.Tensor | None = None


def probe_step(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
               forecast: tuple[torch.Tensor, ...] | None, k: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
    """RCS's look at a step before it is decided, as one function: tokens, c, block 0's attention
    input I and the relative L1 error ||I - I_T||_1 / ||I||_1 of the Taylor forecast I_T of I k
    steps after the last full step. forecast: the forecast's factor slots (1, B, T, C), zero
    beyond the valid ones (they add nothing); None: no error (eager code computes it only when
    the schedule needs it)."""
    tokens, c = model.embed(x, t, y)
    block = model.blocks[0]
    inp0 = branch_input(block, 0, tokens, c)
    if forecast is None:
        return tokens, c, inp0, None
    return tokens, c, inp0, forecast_error(inp0, taylor_expand([f[0] for f in forecast], k, inp0.dtype))


def rfc_full_step(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, probe: Probe | None,
                  slots: tuple[torch.Tensor, ...], gram: torch.Tensor | None, inputs: torch.Tensor | None,
                  ratios: torch.Tensor | None, forecast: tuple[torch.Tensor, ...] | None,
                  spacing: torch.Tensor | int, keep: torch.Tensor, first: torch.Tensor | bool,
                  valid: int | None) -> torch.Tensor:
    """A full step of RFC: the model's forward (fused.forward_with_stores) storing, from every
    branch, the output into the factor bank (slots, and the Gram matrices for ``taylor_norm``),
    and with the relational magnitude (else inputs / ratios are None) the input I(t) and
    s(t) = ``relation`` measured against the previous full step before it is overwritten; with
    RCS (else forecast is None) block 0's attention input into the forecast's factors.
    ``probe``: the embedding and block 0's input already computed by the schedule. valid = None:
    the compiled form (all sites at once after the last block, the step's scalars as tensors);
    an int: the eager form (each site as it runs, as the per-site path stores it)."""
    if probe is None:
        tokens, c = model.embed(x, t, y)
        inp0 = None
    else:
        tokens, c, inp0 = probe.tokens, probe.c, probe.inp0
    if valid is None:
        tokens, outs, inps = forward_with_stores(model, tokens, c, inp0, None)
        values = torch.stack(outs)  # (S, B, T, C)
        if inputs is not None:
            now = torch.stack(inps)
            s_t = relation(change_norm(values, slots[0]), change_norm(now, inputs))  # (S, B)
            ratios.copy_(torch.where(first, ratios, s_t))
            inputs.copy_(now)
        store_all(slots, gram, values, spacing, keep)
        if forecast is not None:
            store_all(forecast, None, inps[0].unsqueeze(0), spacing, keep)
        return model.head(tokens, c)

    def store(s: int, inp: torch.Tensor, out: torch.Tensor) -> None:
        diff = None
        if inputs is not None:
            if not first:
                if out.dtype == slots[0].dtype == torch.float32:  # O(t) - O(t+N) taken once: s(t) and F_1
                    diff = torch.sub(out, slots[0][s])
                    out_change = token_norm(diff)
                else:
                    out_change = change_norm(out, slots[0][s])
                ratios[s] = relation(out_change, change_norm(inp, inputs[s]))
            inputs[s].copy_(inp)
        store_factors(slots, gram, s, out, spacing, valid, diff)
        if s == 0 and forecast is not None:
            store_factors(forecast, None, 0, inp, spacing, valid)

    tokens, _, _ = forward_with_stores(model, tokens, c, inp0, store)
    return model.head(tokens, c)


def relational_cached_forward(model: nn.Module, mods: nn.Module, factors: torch.Tensor,
                              inputs: torch.Tensor, ratio: torch.Tensor, grams: torch.Tensor,
                              coeffs: torch.Tensor, tokens: torch.Tensor, c: torch.Tensor,
                              inp0: torch.Tensor | None) -> torch.Tensor:
    """An RFC cached step (relational magnitude, per-sample norms) after the embedding, site by site:

        I = modulate(norm(x), shift, scale);  a = s(t) ||I - I(t)|| / ||T_m(k)||
        x = x + gate * (F0 + a * sum_{i>=1} c_i F_i)

    factors: I slots (S, B, T, C); inputs (S, B, T, C) = I(t); ratio (S, B) = s(t); grams (S, B, m, m);
    coeffs (I,); inp0 = block 0's attention input when the schedule already computed it. Before
    two full steps the ratios are zero (and the higher factors zero), so the prediction is F0.
    mods: the model's grouped modulation (shift, scale, gate per token group), so a block whose
    text and image tokens are modulated apart (FLUX) runs the same function as a DiT block."""
    m = mods(c)  # (B, S, 3, G, C): shift, scale, gate of every site, per token group
    groups = token_groups(model, tokens)
    n = len(factors)
    c_hi = coeffs[1:].float()
    compiled = torch.compiler.is_compiling()
    if not compiled:
        # eager code adds into the residual stream in place, in the factors' (contiguous) layout: a
        # patch embedding's tokens are a transposed view, and clone() would keep that, making every
        # layer norm copy the stream and every multiply-add stride across it (2x the step on a CPU)
        tokens = tokens.clone(memory_format=torch.contiguous_format)
    # ||T_m(k)|| of every site at once (it reads only the Gram matrices): one op, not one per site
    t_norms = taylor_norm(grams[:, :, : n - 1, : n - 1], c_hi) if n > 1 else None  # (S, B)
    pred = None if compiled else torch.empty_like(tokens)  # eager: one scratch for every site's prediction
    s = 0
    for block in model.blocks:
        for norm in block.norms:
            shift, scale, gate = m[:, s, 0], m[:, s, 1], m[:, s, 2]  # (B, G, C)
            a = None
            if n > 1:
                if s == 0 and inp0 is not None:
                    in_change = change_norm(inp0, inputs[s])
                else:  # the input is needed only for its change: eager code takes it in place
                    inp = modulate_groups(norm(tokens), shift, scale, groups, inplace=True)
                    in_change = change_norm(inp, inputs[s], inplace=not compiled)
                a = rfe_weight(ratio[s], in_change, t_norms[s])  # (B,)
            if compiled:  # inductor fuses the prediction and the residual update into one kernel
                pred = factors[0][s].to(tokens.dtype)
                for i in range(1, n):
                    pred = pred + (a * c_hi[i - 1]).view(-1, 1, 1).to(tokens.dtype) * factors[i][s].to(tokens.dtype)
                g = per_token(gate, groups)
                tokens = tokens + (g.unsqueeze(1) if g.dim() == 2 else g) * pred
            else:  # P = F0 + sum_i (a c_i) F_i into the scratch (each factor read once), then x += g P
                if n > 1:
                    w = (a.unsqueeze(1) * c_hi).to(tokens.dtype).view(-1, n - 1, 1, 1)  # (B, m, 1, 1)
                    torch.addcmul(factors[0][s].to(tokens.dtype), w[:, 0], factors[1][s].to(tokens.dtype), out=pred)
                    for i in range(2, n):
                        pred.addcmul_(w[:, i - 1], factors[i][s].to(tokens.dtype))
                    terms = pred
                else:
                    terms = factors[0][s].to(tokens.dtype)
                for grp, span in enumerate(spans(groups)):
                    tokens[:, span].addcmul_(gate[:, grp].unsqueeze(1).to(tokens.dtype), terms[:, span])
            s += 1
    return model.head(tokens, c)


def relational_cached_step(model: nn.Module, mods: nn.Module, factors: torch.Tensor, inputs: torch.Tensor,
                           ratio: torch.Tensor, grams: torch.Tensor, coeffs: torch.Tensor, x: torch.Tensor,
                           t: torch.Tensor, y: torch.Tensor, probe: Probe | None) -> torch.Tensor:
    """The whole RFC cached step: the embedding (or the probe's), then ``relational_cached_forward``."""
    if probe is None:
        tokens, c = model.embed(x, t, y)
        return relational_cached_forward(model, mods, factors, inputs, ratio, grams, coeffs, tokens, c, None)
    return relational_cached_forward(model, mods, factors, inputs, ratio, grams, coeffs, probe.tokens, probe.c,
                                     probe.inp0)


@method_config("rfc")
@dataclass
class RFCConfig:
    _target_: str = "rfc.method.RFC"
    tau: float = 0.1
    order: int = 2
    warmup: int = 2
    rfe: bool = True
    rcs: bool = True
    interval: int = 4
    magnitude: str = "relational"
    constant_w: float = 1.2
    rcs_modules: str = "first"
    norm_reduction: str = "sample"
    storage_dtype: str = "fp32"
    fused: bool = True
    schedule_scope: str = "batch"
    # tau 0: RCS computes every step; interval 1: so does the fixed schedule (rcs=false ablations)
    degenerate: ClassVar[tuple[str, ...]] = ("method.tau=0", "method.interval=1")


class RFC(CacheMethod):
    """Relational Feature Caching. See the module docstring for the equations and switches."""

    name = "rfc"

    def __init__(self, tau: float = 0.1, order: int = 2, warmup: int = 2, rfe: bool = True, rcs: bool = True,
                 interval: int = 4, magnitude: str = "relational", constant_w: float = 1.2,
                 rcs_modules: str = "first", norm_reduction: str = "sample", storage_dtype: str = "fp32",
                 fused: bool = True, schedule_scope: str = "batch") -> None:
        require(isinstance(order, int) and order >= 0, f"method.order must be an integer >= 0, got {order}")
        require(float(tau) >= 0, f"method.tau must be >= 0, got {tau}")
        require(isinstance(warmup, int) and warmup >= 0, f"method.warmup must be an integer >= 0, got {warmup}")
        require(magnitude in MAGNITUDES, f"method.magnitude must be one of {MAGNITUDES}, got {magnitude!r}")
        require(rcs_modules in RCS_MODULES, f"method.rcs_modules must be one of {RCS_MODULES}, got {rcs_modules!r}")
        require(norm_reduction in REDUCTIONS,
                f"method.norm_reduction must be one of {REDUCTIONS}, got {norm_reduction!r}")
        require(float(constant_w) > 0, f"method.constant_w must be > 0, got {constant_w}")
        check_scope(schedule_scope)
        super().__init__()
        self.scope = schedule_scope
        self.tau, self.order, self.warmup = float(tau), order, warmup
        self.rfe, self.rcs = bool(rfe), bool(rcs)
        self.magnitude = magnitude if self.rfe else "taylor"
        self.constant_w = float(constant_w)
        self.rcs_modules, self.reduction = rcs_modules, norm_reduction
        self.storage = storage_dtype
        self.dtype = parse_storage_dtype(storage_dtype)
        self.fixed = WarmupInterval(interval, warmup)  # validates interval; used when rcs is off
        self.schedule, self.predictor = self._new_state()
        self.fused = bool(fused)
        self.reset()

    @property
    def needs_inputs(self) -> bool:
        """Whether cached steps read the branch inputs (RFE's relational magnitude does)."""
        return self.magnitude == "relational"

    # the predictor's buffers, read and written by the step programs
    @property
    def bank(self) -> FactorBank:
        return self.predictor.bank

    @property
    def inputs(self) -> torch.Tensor | None:
        return self.predictor.inputs

    @property
    def ratios(self) -> torch.Tensor | None:
        return self.predictor.ratios

    @property
    def states(self) -> dict[Site, RelationalState]:
        return self.predictor.states

    def reset(self) -> None:
        super().reset()
        self.fixed.reset()
        self.schedule.reset()
        self.pending = False
        sites = getattr(self, "num_sites", 2 * self.depth)
        self.schedule.setup(sites)
        self.predictor.stacked = self.can_fuse()
        self.predictor.setup(sites)
        self.per_sample: list[tuple[RelationalSchedule, RelationalPredictor]] = []  # schedule_scope=sample
        self.sample_rows: list[torch.Tensor] = []
        self.decisions: list[bool] = []

    def _release(self) -> None:
        self.predictor.free()
        self.schedule.bank.free()
        super()._release()

    # ---- schedule -----------------------------------------------------------------------------
    def _new_state(self) -> tuple[RelationalSchedule, RelationalPredictor]:
        """An RCS schedule and an RFE predictor of this configuration (the batch's, or a sample's)."""
        return (RelationalSchedule(self.tau, self.warmup, self.order, self.rcs_modules, self.dtype),
                RelationalPredictor(self.order, self.magnitude, self.reduction, self.dtype, self.constant_w))

    @property
    def per_sample_scope(self) -> bool:
        """schedule_scope=sample with RCS (a fixed schedule decides alike for every sample)."""
        return self.scope == "sample" and self.rcs

    def begin_step(self, step: StepInfo) -> None:
        if self.rcs:
            self.step, self.pending = step, True  # decided at block 0's attention input
        else:
            super().begin_step(step)

    def decide(self, step: StepInfo) -> bool:
        return self.fixed.decide(step)

    def end_step(self, step: StepInfo) -> None:
        if self.per_sample_scope:
            for (schedule, _), full in zip(self.per_sample, self.decisions, strict=True):
                if not full:
                    schedule.end_cached_step()
        elif self.rcs and not self.full:
            self.schedule.end_cached_step()
        super().end_step(step)

    def _decide_now(self, inp0: torch.Tensor) -> None:
        self.pending = False
        self.full = self.schedule.decide(self.step, inp0)
        self.count_step(self.step, self.full)

    # ---- branches ------------------------------------------------------------------------------
    def branch(self, site: Site, inp: BranchInput, module: nn.Module) -> torch.Tensor:
        if self.per_sample_scope:
            return self._branch_per_sample(site, inp, module)
        if self.pending:
            self._decide_now(inp.full())
        index = self.step.index
        if self.full:
            x_in = inp.full()
            out = self.run_full(site, module, x_in)
            self.predictor.record(site, inp, out, index)
            if self.rcs and self.schedule.monitors(site):
                self.schedule.observe_full(site, x_in, index)
            return out
        self._stats.cached_sites += 1
        if self.rcs and self.rcs_modules == "all" and site != FIRST:
            self.schedule.observe_cached(site, inp.full(), index)
        return self.predictor.predict(site, inp, index, module)

    def _branch_per_sample(self, site: Site, inp: BranchInput, module: nn.Module) -> torch.Tensor:
        """schedule_scope=sample: every sample has its own RCS schedule and RFE predictor (its own
        full steps, hence its own k and N) over its own rows (its guidance halves), each fed exactly
        what a batch of that one sample would feed it. A step where any sample computes is a masked
        full step: the site runs on every row, the computing samples record their rows, the others
        take their own prediction."""
        rows, index = inp.x.shape[0], self.step.index
        samples = self.batch_samples(rows)
        if not self.per_sample:
            for _ in range(samples):
                schedule, predictor = self._new_state()
                schedule.setup(self.num_sites)
                predictor.setup(self.num_sites)
                self.per_sample.append((schedule, predictor))
            self.sample_rows = [torch.arange(i, rows, samples, device=inp.x.device) for i in range(samples)]
        where = self.sample_rows  # each sample's rows (its guidance halves), the same for the whole batch
        x_in = inp.full()
        mine = [x_in.index_select(0, w) for w in where]  # each sample's rows, contiguous, as alone
        if self.pending:
            self.pending = False
            self.decisions = [bool(schedule.decide(self.step, mine[i])) for i, (schedule, _) in
                              enumerate(self.per_sample)]
            self.count_sample_steps(self.step, self.decisions)
        out = None
        if self.full:
            out = self.run_full(site, module, x_in)
            for i, (schedule, predictor) in enumerate(self.per_sample):
                if self.decisions[i]:
                    predictor.record(site, mine[i], out.index_select(0, where[i]), index)
                    if schedule.monitors(site):
                        schedule.observe_full(site, mine[i], index)
        else:
            self._stats.cached_sites += 1
        for i, (schedule, predictor) in enumerate(self.per_sample):
            if self.decisions[i]:
                continue
            if self.rcs_modules == "all" and site != FIRST:
                schedule.observe_cached(site, mine[i], index)
            value = predictor.predict(site, mine[i], index, module)
            if out is None:
                out = torch.empty((rows, *value.shape[1:]), dtype=value.dtype, device=value.device)
            out.index_copy_(0, where[i], value)
        return out

    # ---- fused cached step ---------------------------------------------------------------------
    def can_fuse(self) -> bool:
        """Fused for the paper's configuration and rfe=false: per-sample norms, RCS on block 0, one
        schedule per batch (sample scope runs the per-site path)."""
        return (self.magnitude in ("relational", "taylor") and self.reduction == "sample"
                and self.rcs_modules == "first" and not self.per_sample_scope)

    def prepare_fused(self, model: nn.Module) -> None:
        device, backend = model_device(model), self.compile_backend
        self.full_fn = maybe_compile(rfc_full_step, self.compile, backend)
        self.probe_fn = maybe_compile(probe_step, self.compile, backend)
        mode = graph_mode(device, self.compile)
        if self.magnitude == "taylor":
            self.gates = grouped_modulation(model, ("gate",))
            self.cached_fn = GraphedStep(maybe_compile(taylor_cached_step, self.compile, backend), (2,), mode)
        else:
            self.mods = grouped_modulation(model, ("shift", "scale", "gate"))
            self.cached_fn = GraphedStep(maybe_compile(relational_cached_step, self.compile, backend),
                                         (2, 3, 4, 5), mode)

    def fast_forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor,
                     y: torch.Tensor) -> torch.Tensor | None:
        index, device = self.step.index, x.device
        shape = torch.Size((x.shape[0], *model.token_shape))
        T = shape[1]
        self.bank.allocate(shape, branch_dtype(model, device), device)
        relational = self.magnitude == "relational"
        if relational:
            self.predictor.allocate_inputs(shape, device)
        probe = None
        if self.pending:  # RCS: decide from block 0's attention input, as the per-site path does
            forecast = self.schedule.bank
            forecast.allocate(shape, self.dtype, device)
            k = 0 if forecast.last_index is None else index - forecast.last_index
            # compiled: the error is part of the one probe graph; eager: computed when decide needs it
            slots = forecast.slots if self.compile else None
            probe = Probe(*self.probe_fn(model, x, t, y, slots, torch.tensor(float(k), device=device)))
            self._stats.norm_tokens += T
            self.pending = False
            self.full = self.schedule.decide(self.step, probe.inp0, error=probe.error)
            self.count_step(self.step, self.full)
        if self.full:
            step = self.bank.begin(index, device)
            forecast = None
            if self.rcs:
                self.schedule.bank.begin(index, device)
                forecast = self.schedule.bank.slots
            self._stats.count_full_forward(self.depth, T, probed_tokens=T if probe is not None else 0,
                                           kinds=self.site_kinds)
            return self.full_fn(model, x, t, y, probe, self.bank.slots, self.bank.gram if relational else None,
                                self.inputs if relational else None, self.ratios if relational else None, forecast,
                                *step_scalars(step, self.compile))
        coeffs = torch.tensor(self.bank.coefficients(index, padded=True), device=device)
        if not relational:
            self.count_fused_cached()
            return self.cached_fn(model, self.gates, self.bank.factors(), coeffs, x, t, y)
        self.count_fused_cached(norm_tokens=self.num_sites * T - (T if probe is not None else 0))
        return self.cached_fn(model, self.mods, self.bank.factors(), self.inputs, self.ratios, self.bank.gram,
                              coeffs, x, t, y, probe)

    def cache_tensors(self) -> Iterable[torch.Tensor]:
        yield from self.predictor.tensors()
        yield from self.schedule.tensors()
        for schedule, predictor in self.per_sample:
            yield from predictor.tensors()
            yield from schedule.tensors()

    def params(self) -> dict[str, object]:
        return {"tau": self.tau, "order": self.order, "warmup": self.warmup, "rfe": self.rfe, "rcs": self.rcs,
                "interval": self.fixed.interval, "magnitude": self.magnitude, "constant_w": self.constant_w,
                "rcs_modules": self.rcs_modules, "norm_reduction": self.reduction, "storage_dtype": self.storage,
                **scope_params(self.scope)}
