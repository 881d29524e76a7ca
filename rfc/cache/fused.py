"""Step programs: each step of a cached run (full or cached) as one function over contiguous buffers.

On a cached step of FORA or TaylorSeer every branch output is a prediction that does not depend
on the residual stream, so the 2 x depth sequential residual updates collapse into one sum:

    x_out = x_in + sum_{i, s} (c_i g_s) * F[i, s],      c_i = k^i / i!

over Taylor orders i and sites s (attention and MLP of every block), with the gates g_s of all
blocks taken from one matmul of stacked adaLN weights. No norm, modulation or per-site Python
runs; the stored factors are read once. RFC's relational magnitude needs each branch's current
input, so its cached step walks the blocks in order, but each site is one layer norm, two
per-sample norms and one weighted sum; ||T_m(k)|| comes from the Gram matrix of the factors,
computed once per full step, so the factors are read once per cached step there too.

Full steps of a caching method are one function too (``full_step``): the model's forward with
every branch output shifted into the factor bank, and, for RFC, each branch's input, s(t), the
Gram matrices and RCS's forecast of block 0's input, all written in place. Step-dependent
scalars (the spacing of full steps, which factor slots are valid, k) are tensors, so under
``compile=true`` each program is one graph (fullgraph, fixed shapes per batch size) that is
traced once and replayed for all 50 steps of every batch. On a GPU the cached-step programs are
also captured as CUDA graphs (``GraphedStep``): a cached step then costs its memory traffic,
not its kernel launches.

``FactorBank`` keeps every site's Taylor factors in one (order+1, sites, B, T, C) buffer, which
both the per-site path (``fused=false``) and the programs read, so the two differ only in
summation order (tests bound the difference).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from rfc.cache.base import BranchInput, CacheMethod, Site, modulate
from rfc.cache.predictors import taylor_expand


@dataclass
class FullStep:
    """What a full step's factor update depends on, as Python values (eager code) and as tensors
    (compiled code: passing the step's scalars as tensors keeps one graph for all 50 steps).

    spacing: steps since the previous full step (1 before there is one; it then divides nothing
    kept); keep[i]: slot i holds a factor after this step (i < valid); first: no previous full step."""

    valid: int
    spacing: int
    spacing_t: torch.Tensor  # 0-d fp32
    keep: torch.Tensor  # (order + 1,) bool
    first: torch.Tensor  # 0-d bool
    is_first: bool


class FactorBank:
    """Taylor factors of all sites, one buffer per order: slots[i][s] is factor i of site s, each
    slot a contiguous (sites, B, T, C) tensor (a compiled full step rewrites whole slots, which
    inductor writes in place; writes into slices of one buffer it would copy the buffer for).

    Update rule per site (TaylorSeer's): new[0] = value, new[i + 1] = (new[i] - old[i]) / d, with d
    the steps between the last two full steps; ``valid`` factors exist (fewer than order + 1 until
    enough full steps have been seen), and the slots beyond them hold zeros, so a prediction may
    sum every slot with one fixed shape. All sites are updated at the same full steps. With
    ``gram=True`` the bank also keeps, per site and sample, the Gram matrix of factors 1..order
    (fp32), from which RFC's ||T_m(k)|| follows without reading the factors again.

    The buffers keep their memory across ``reset`` (they are zeroed in place) while the batch
    shape stays the same, so a CUDA graph captured over them stays valid from batch to batch."""

    def __init__(self, order: int, sites: int, dtype: torch.dtype | None = torch.float32, gram: bool = False) -> None:
        self.order, self.sites, self.dtype, self.with_gram = order, sites, dtype, gram
        self.slots: tuple[torch.Tensor, ...] = ()
        self.gram: torch.Tensor | None = None  # (sites, B, order, order)
        self.reset()

    def reset(self) -> None:
        """Forget every factor (zeros in place: the allocation is kept)."""
        for t in self.tensors():
            t.zero_()
        self.valid = 0
        self.last_index: int | None = None
        self.current: FullStep | None = None  # the full step being stored
        self._step: int | None = None

    def free(self) -> None:
        """Release the buffers (the method was detached)."""
        self.slots, self.gram = (), None
        self.reset()

    def allocate(self, shape: torch.Size, dtype: torch.dtype, device: torch.device) -> None:
        """Buffers for values of ``shape`` (B, T, C), unless the current ones already fit."""
        store_dtype = self.dtype or dtype
        want = (self.sites, *shape)
        first = self.slots[0] if self.slots else None
        if first is None or first.shape != want or first.dtype != store_dtype or first.device != device:
            self.slots = tuple(torch.zeros(want, dtype=store_dtype, device=device) for _ in range(self.order + 1))
            self.gram = torch.zeros((self.sites, shape[0], self.order, self.order), device=device) \
                if self.with_gram else None

    def begin(self, index: int, device: torch.device) -> FullStep:
        """Start storing the full step ``index`` (every site will be stored at this step)."""
        spacing = 1 if self.last_index is None else index - self.last_index
        first = self.last_index is None
        self.valid = 1 if first else min(self.order + 1, self.valid + 1)
        self._step, self.last_index = index, index
        keep = torch.arange(self.order + 1) < self.valid
        self.current = FullStep(self.valid, spacing, torch.tensor(float(spacing), device=device), keep.to(device),
                                torch.tensor(first, device=device), first)
        return self.current

    def update(self, site: int, value: torch.Tensor, index: int) -> None:
        """Record site ``site``'s full output at step ``index`` (the per-site path)."""
        self.allocate(value.shape, value.dtype, value.device)
        if index != self._step:  # the first site of a new full step
            self.begin(index, value.device)
        store_factors(self.slots, self.gram, site, value, self.current.spacing, self.current.valid)

    def coefficients(self, index: int, padded: bool = False) -> list[float]:
        """c_i = k^i / i! for the valid factors, k = steps since the last full step; ``padded``
        appends zeros up to order + 1 (the slots beyond ``valid`` hold zeros)."""
        k = index - self.last_index
        coeffs = [k**i / math.factorial(i) for i in range(self.valid)]
        return coeffs + [0.0] * (self.order + 1 - self.valid) if padded else coeffs

    def predict(self, site: int, index: int, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """sum_i c_i F[i, site] for one site, accumulated in ``out_dtype`` (the per-site path)."""
        if self.last_index is None:
            raise RuntimeError("Taylor prediction before any full step")
        return taylor_expand([self.slots[i][site] for i in range(self.valid)], index - self.last_index, out_dtype)

    def factors(self) -> tuple[torch.Tensor, ...]:
        """All factor slots, order + 1 tensors of (sites, B, T, C), the buffers themselves. Slots
        beyond ``valid`` are zero, so with ``coefficients(padded=True)`` one fixed shape serves
        every cached step: a compiled step function is traced once per batch size, not once per
        factor count."""
        return self.slots

    def tensors(self) -> list[torch.Tensor]:
        return [*self.slots, *([self.gram] if self.gram is not None else [])]


def store_factors(slots: tuple[torch.Tensor, ...], gram: torch.Tensor | None, s: int, value: torch.Tensor,
                  spacing: int, valid: int) -> None:
    """Shift ``value`` into site s's factors in place (the update rule of FactorBank), over the
    valid slots, as TaylorSeer's code runs it: eager code, one site at a time."""
    cur = value
    for i in range(valid - 1):
        nxt = (cur - slots[i][s]) / spacing
        slots[i][s] = cur
        cur = nxt
    slots[valid - 1][s] = cur
    if gram is not None and valid > 1:
        flat = torch.stack([slots[i][s] for i in range(1, valid)]).float().flatten(2).transpose(0, 1)  # (B, n, T*C)
        gram[s, :, : valid - 1, : valid - 1] = flat @ flat.transpose(1, 2)


def store_all(slots: tuple[torch.Tensor, ...], gram: torch.Tensor | None, values: torch.Tensor,
              spacing: torch.Tensor, keep: torch.Tensor) -> None:
    """The same rule for every site at once, values (sites, B, T, C): compiled code. Every slot
    is rewritten whole, the slots not yet valid zeroed by ``keep`` and the spacing a tensor, so
    the traced graph does not depend on how many full steps came before; the valid slots get
    the values the eager rule gives them."""
    cur = values
    for i in range(len(slots) - 1):
        nxt = (cur - slots[i]) / spacing
        slots[i].copy_(torch.where(keep[i], cur, 0))
        cur = nxt
    slots[-1].copy_(torch.where(keep[-1], cur, 0))
    if gram is not None and len(slots) > 1:
        flat = torch.stack(slots[1:]).float().flatten(3).permute(1, 2, 0, 3)  # (S, B, m, T*C)
        gram.copy_(flat @ flat.transpose(-1, -2))


def weighted_site_sum(factors: tuple[torch.Tensor, ...], weights: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out + sum_{i, s} weights[i, s, b, None, c] * factors[i][s, b, t, c].

    factors: I tensors (S, B, T, C), weights (I, S, B, C). Under torch.compile it is one
    reduction over (i, s), which inductor emits as a single kernel that reads every factor once;
    in eager mode the same sum is a loop of in-place multiply-adds, so no (S, B, T, C) temporary
    is built."""
    if torch.compiler.is_compiling():
        terms = weights[0].unsqueeze(2) * factors[0]
        for i in range(1, len(factors)):
            terms = terms + weights[i].unsqueeze(2) * factors[i]
        return out + terms.sum(dim=0, dtype=out.dtype)
    acc = out.clone()
    for i, slot in enumerate(factors):
        for s in range(slot.shape[0]):
            acc.addcmul_(weights[i, s].unsqueeze(1).to(acc.dtype), slot[s].to(acc.dtype))
    return acc


def taylor_cached_forward(model: nn.Module, gates: nn.Module, factors: torch.Tensor, coeffs: torch.Tensor,
                          tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """A FORA / TaylorSeer cached step after the embedding: all gates at once, one weighted sum,
    the final layer. gates: the model's stacked modulation of kind gate; factors: I slots
    (S, B, T, C), S sites in execution order; coeffs (I,)."""
    g = gates(c)[:, :, 0].transpose(0, 1)  # (B, S, 1, C) -> (S, B, C)
    w = coeffs.view(-1, 1, 1, 1).to(g.dtype) * g.unsqueeze(0)  # (I, S, B, C)
    tokens = weighted_site_sum(factors, w, tokens)
    return model.head(tokens, c)


def taylor_cached_step(model: nn.Module, gates: nn.Module, factors: torch.Tensor, coeffs: torch.Tensor,
                       x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The whole cached step of FORA / TaylorSeer: embedding, then ``taylor_cached_forward``."""
    tokens, c = model.embed(x, t, y)
    return taylor_cached_forward(model, gates, factors, coeffs, tokens, c)


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
    inp0 = modulate(block.norms[0](tokens), *block.modulation(c)[0][:2])
    if forecast is None:
        return tokens, c, inp0, None
    predicted = taylor_expand([f[0] for f in forecast], k, inp0.dtype)
    error = (inp0 - predicted).abs().sum() / inp0.abs().sum().clamp_min(1e-12)
    return tokens, c, inp0, error


def full_step(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, probe: Probe | None,
              slots: tuple[torch.Tensor, ...], gram: torch.Tensor | None, inputs: torch.Tensor | None,
              ratios: torch.Tensor | None, forecast: tuple[torch.Tensor, ...] | None, spacing: torch.Tensor | int,
              keep: torch.Tensor, first: torch.Tensor | bool, valid: int | None) -> torch.Tensor:
    """A full step of a caching method: the model's forward, op for op, storing what the method
    needs from every branch in place.

    slots / gram: the factor bank (every branch output is shifted in); inputs / ratios (RFC's
    relational magnitude, else None): each branch's input I(t) and s(t) = ||O(t) - O(t+N)|| /
    ||I(t) - I(t+N)|| per sample, measured against the previous full step before it is
    overwritten; forecast (RCS, else None): the factor slots of block 0's attention input.
    ``probe``: the embedding and block 0's input already computed by the schedule (else computed
    here). valid = None: the compiled form, which collects every branch's output (and input) and
    stores them all at once after the last block, with tensors for the step's scalars; an int:
    the eager form, which stores each branch as it runs, over the valid slots."""
    if probe is None:
        tokens, c = model.embed(x, t, y)
        inp0 = None
    else:
        tokens, c, inp0 = probe.tokens, probe.c, probe.inp0
    compiled = valid is None
    outs: list[torch.Tensor] = []
    inps: list[torch.Tensor] = []

    def store(s: int, inp: torch.Tensor, out: torch.Tensor) -> None:  # eager: one site
        if inputs is not None:
            out_change = (out - slots[0][s]).float().flatten(1).norm(dim=1)  # (B,) ||O(t) - O(t+N)||
            in_change = (inp - inputs[s]).float().flatten(1).norm(dim=1)
            if not first:
                ratios[s] = out_change / in_change.clamp_min(1e-12)
            inputs[s] = inp
        store_factors(slots, gram, s, out, spacing, valid)
        if s == 0 and forecast is not None:
            store_factors(forecast, None, 0, inp, spacing, valid)

    for i, block in enumerate(model.blocks):
        def branch(b: int, x: torch.Tensor, norm: nn.Module, shift: torch.Tensor, scale: torch.Tensor,
                   module: nn.Module, i: int = i) -> torch.Tensor:
            s = 2 * i + b
            inp = inp0 if s == 0 and inp0 is not None else modulate(norm(x), shift, scale)
            out = module(inp)
            if compiled:
                outs.append(out)
                inps.append(inp)
            else:
                store(s, inp, out)
            return out

        tokens = block.run(tokens, c, branch)
    if compiled:  # every site at once: whole-tensor writes, no Python per site at run time
        values = torch.stack(outs)  # (S, B, T, C)
        if inputs is not None:
            now = torch.stack(inps)
            out_change = (values - slots[0]).float().flatten(2).norm(dim=2)  # (S, B)
            in_change = (now - inputs).float().flatten(2).norm(dim=2)
            ratios.copy_(torch.where(first, ratios, out_change / in_change.clamp_min(1e-12)))
            inputs.copy_(now)
        store_all(slots, gram, values, spacing, keep)
        if forecast is not None:
            store_all(forecast, None, inps[0].unsqueeze(0), spacing, keep)
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
    two full steps the ratios are zero (and the higher factors zero), so the prediction is F0."""
    m = mods(c)  # (B, S, 3, C): shift, scale, gate of every site
    n = len(factors)
    c_hi = coeffs[1:].float()
    compiled = torch.compiler.is_compiling()
    if not compiled:
        tokens = tokens.clone()  # eager code adds into the residual stream in place
    for blk_i, block in enumerate(model.blocks):
        for branch, norm in enumerate(block.norms):
            s = 2 * blk_i + branch
            shift, scale, gate = m[:, s, 0], m[:, s, 1], m[:, s, 2]
            a = None
            if n > 1:
                if s == 0 and inp0 is not None:
                    inp = inp0
                else:
                    inp = norm(tokens) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
                d_in = (inp.float() - inputs[s].float()).flatten(1).norm(dim=1)  # (B,)
                t_norm = torch.einsum("i,bij,j->b", c_hi, grams[s, :, : n - 1, : n - 1], c_hi).clamp_min(0).sqrt()
                a = ratio[s] * d_in / t_norm.clamp_min(1e-12)  # (B,)
            if compiled:  # inductor fuses the prediction and the residual update into one kernel
                pred = factors[0][s].to(tokens.dtype)
                for i in range(1, n):
                    pred = pred + (a * c_hi[i - 1]).view(-1, 1, 1).to(tokens.dtype) * factors[i][s].to(tokens.dtype)
                tokens = tokens + gate.unsqueeze(1) * pred
            else:  # x += g F0 + sum_i (g a c_i) F_i: one in-place pass per factor, no temporaries
                g = gate.unsqueeze(1).to(tokens.dtype)  # (B, 1, C)
                tokens.addcmul_(g, factors[0][s].to(tokens.dtype))
                for i in range(1, n):
                    w = g * (a * c_hi[i - 1]).view(-1, 1, 1).to(tokens.dtype)
                    tokens.addcmul_(w, factors[i][s].to(tokens.dtype))
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


def maybe_compile(fn: Callable, enabled: bool, backend: str = "inductor") -> Callable:
    """torch.compile(fn) when asked: one whole graph (fullgraph) per batch size (fixed shapes)."""
    return torch.compile(fn, fullgraph=True, dynamic=False, backend=backend) if enabled else fn


class GraphedStep:
    """A step program replayed as a CUDA graph: the launches of a cached step cost one replay.

    ``static`` names the positions of arguments that live at fixed addresses across steps and
    batches (the factor bank and RFC's buffers); every other tensor argument is copied into a
    buffer the graph owns before each replay. A graph is captured per argument signature (shapes,
    dtypes, the static buffers' addresses, the identity of other arguments), after two warm-up
    calls on a side stream (they also compile the program); a re-allocated bank gets a new graph.
    ``mode``: "cuda" captures and replays; "emulate" runs the same copy-in / replay bookkeeping
    with the function called on the graph's buffers (how the CPU tests check the plumbing);
    "off" calls the function directly."""

    def __init__(self, fn: Callable, static: tuple[int, ...], mode: str = "off") -> None:
        if mode not in ("off", "cuda", "emulate"):
            raise ValueError(f"unknown CUDA graph mode {mode!r}")
        self.fn, self.static, self.mode = fn, set(static), mode
        self.graphs: dict[tuple, tuple[object, list, torch.Tensor]] = {}
        self.captures = 0

    def _signature(self, args: tuple) -> tuple:
        sig = []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor):
                sig.append((i, tuple(a.shape), a.dtype, a.device, a.data_ptr() if i in self.static else None))
            elif isinstance(a, tuple) and i in self.static:  # the bank's slots
                sig.append((i, *((tuple(v.shape), v.dtype, v.device, v.data_ptr()) for v in a)))
            elif isinstance(a, Probe):
                sig.append((i, "probe", *((tuple(v.shape), v.dtype) for v in (a.tokens, a.c, a.inp0))))
            else:
                sig.append((i, id(a)))
        return tuple(sig)

    def __call__(self, *args: object) -> torch.Tensor:
        if self.mode == "off":
            return self.fn(*args)
        key = self._signature(args)
        if key not in self.graphs:
            self.graphs[key] = self._capture(args)
        graph, slots, out = self.graphs[key]
        for slot, a in zip(slots, args, strict=True):
            if slot is None:
                continue
            if isinstance(a, Probe):
                for dst, src in zip(slot, (a.tokens, a.c, a.inp0), strict=True):
                    dst.copy_(src)
            else:
                slot.copy_(a)
        if graph is None:  # emulate: the same buffers, called instead of replayed
            return self.fn(*self._bound(args, slots)).clone()
        graph.replay()
        return out.clone()  # the graph overwrites ``out`` at its next replay

    def _bound(self, args: tuple, slots: list) -> list:
        bound = []
        for slot, a in zip(slots, args, strict=True):
            if slot is None:
                bound.append(a)
            elif isinstance(a, Probe):
                bound.append(Probe(*slot))
            else:
                bound.append(slot)
        return bound

    def _capture(self, args: tuple) -> tuple[object, list, torch.Tensor]:
        slots: list = []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and i not in self.static:
                slots.append(a.clone())
            elif isinstance(a, Probe):
                slots.append([a.tokens.clone(), a.c.clone(), a.inp0.clone()])
            else:
                slots.append(None)
        bound = self._bound(args, slots)
        self.captures += 1
        if self.mode == "emulate":
            return None, slots, self.fn(*bound)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                self.fn(*bound)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = self.fn(*bound)
        return graph, slots, out


def graph_mode(device: torch.device, compiled: bool) -> str:
    """CUDA graphs for compiled cached steps on a GPU; eager steps and CPUs call directly."""
    return "cuda" if compiled and device.type == "cuda" else "off"


def model_device(model: nn.Module) -> torch.device:
    """The device the model's weights are on."""
    return next(model.parameters()).device


def branch_dtype(model: nn.Module, device: torch.device) -> torch.dtype:
    """The dtype the branches output: the autocast dtype under autocast, else the weights'."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return model.weight_dtype


class TaylorBankMethod(CacheMethod):
    """A method whose cached sites are Taylor predictions from one FactorBank (FORA: order 0;
    TaylorSeer: order m): full steps store into the bank, cached steps predict per site or run
    the step programs (``full_step``, ``taylor_cached_step``). Subclasses call ``make_bank`` in
    ``reset`` and define ``decide``."""

    bank: FactorBank

    def make_bank(self, order: int, dtype: torch.dtype | None) -> None:
        """The bank for the attached model, kept (zeroed) from batch to batch."""
        bank = getattr(self, "bank", None)
        if bank is None or bank.sites != 2 * self.depth or bank.order != order:
            self.bank = FactorBank(order, 2 * self.depth, dtype)
        else:
            bank.reset()

    def store(self, site: Site, inp: BranchInput, out: torch.Tensor) -> None:
        self.bank.update(site.module_index, out, self.step.index)

    def predict(self, site: Site, inp: BranchInput) -> torch.Tensor:
        return self.bank.predict(site.module_index, self.step.index, inp.x.dtype)

    def can_fuse(self) -> bool:
        return True

    def prepare_fused(self, model: nn.Module) -> None:
        device = model_device(model)
        self.gates = model.stacked_modulation(("gate",))
        self.full_fn = maybe_compile(full_step, self.compile, self.compile_backend)
        self.cached_fn = GraphedStep(maybe_compile(taylor_cached_step, self.compile, self.compile_backend),
                                     static=(2,), mode=graph_mode(device, self.compile))

    def allocate(self, model: nn.Module, x: torch.Tensor) -> None:
        """The bank's buffers before the first program runs (programs only write in place)."""
        shape = (x.shape[0], *model.token_shape)
        self.bank.allocate(torch.Size(shape), branch_dtype(model, x.device), x.device)

    def fast_forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor,
                     y: torch.Tensor) -> torch.Tensor | None:
        index = self.step.index
        if self.full:
            self.allocate(model, x)
            step = self.bank.begin(index, x.device)
            self._stats.count_full_forward(self.depth, model.token_shape[0])
            return self.full_fn(model, x, t, y, None, self.bank.slots, None, None, None, None,
                                *step_scalars(step, self.compile))
        self.count_fused_cached()
        coeffs = torch.tensor(self.bank.coefficients(index, padded=True), device=x.device)
        return self.cached_fn(model, self.gates, self.bank.factors(), coeffs, x, t, y)

    def _release(self) -> None:
        self.bank.free()
        super()._release()

    def cache_tensors(self) -> list[torch.Tensor]:
        return self.bank.tensors()


def step_scalars(step: FullStep, compiled: bool) -> tuple:
    """full_step's (spacing, keep, first, valid): tensors for a compiled program, Python values
    for eager code."""
    if compiled:
        return step.spacing_t, step.keep, step.first, None
    return step.spacing, step.keep, step.is_first, step.valid
