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

The programs read the model only through the cache protocol, so every family runs the same ones:
its ``blocks`` (each block's sites are its ``norms`` / ``branches``, one or two per block), each
block's ``run`` on full steps, and its adaLN vectors of every site at once from
``grouped_modulation(kinds)`` (B, sites, kinds, groups, C). A model whose tokens are modulated by
different vectors in different spans (FLUX's double-stream blocks: text tokens, then image tokens)
names the spans' lengths in ``token_groups``; a model without them has one group, and its
programs compute exactly what they computed before groups existed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch
from torch import nn

from rfc.cache.base import BranchInput, CacheMethod, Site, modulate, site_bases
from rfc.cache.predictors import FactorBank, FullStep, TaylorPredictor, store_all, store_factors
from rfc.cache.schedules import Schedule
from rfc.samplers.sampling import StepInfo


class OneGroup(nn.Module):
    """A model's ``stacked_modulation`` (B, S, K, C) seen as a grouped one with one token group,
    (B, S, K, 1, C): what a model without ``grouped_modulation`` offers the programs."""

    def __init__(self, stacked: nn.Module) -> None:
        super().__init__()
        self.stacked = stacked

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return self.stacked(c).unsqueeze(3)


def grouped_modulation(model: nn.Module, kinds: tuple[str, ...]) -> nn.Module:
    """The adaLN vectors ``kinds`` of every site, per token group, from one module:
    forward(c) -> (B, sites, len(kinds), groups, C). Models with several token groups provide
    ``grouped_modulation``; the others' ``stacked_modulation`` is one group."""
    if hasattr(model, "grouped_modulation"):
        return model.grouped_modulation(kinds)
    return OneGroup(model.stacked_modulation(kinds))


def token_groups(model: nn.Module, tokens: torch.Tensor) -> tuple[int, ...]:
    """Lengths of the token spans that share adaLN vectors, in stream order (they sum to T): the
    model's ``token_groups`` for the current forward, else one span of every token."""
    groups = getattr(model, "token_groups", None)
    return tuple(groups) if groups else (tokens.shape[1],)


def spans(groups: tuple[int, ...]) -> list[slice]:
    """The token slices of the groups; one group is the whole stream (``slice(None)``)."""
    if len(groups) == 1:
        return [slice(None)]
    out, start = [], 0
    for n in groups:
        out.append(slice(start, start + n))
        start += n
    return out


def per_token(v: torch.Tensor, groups: tuple[int, ...]) -> torch.Tensor:
    """Group vectors (..., G, C) as the modulation a block applies: (..., C), broadcast over the
    tokens, for one group; (..., T, C), each token its group's vector, for several."""
    if v.shape[-2] == 1:
        return v.select(-2, 0)
    parts = [v.narrow(-2, g, 1).expand(*v.shape[:-2], n, v.shape[-1]) for g, n in enumerate(groups)]
    return torch.cat(parts, dim=-2)


def modulate_groups(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, groups: tuple[int, ...],
                    inplace: bool = False) -> torch.Tensor:
    """modulate(x, shift, scale) with shift and scale per group (B, G, C): per sample for one group
    (every token alike), per token for several, the same elementwise arithmetic as the block's own modulate.
    ``inplace`` (eager code that owns x): each group's span of x is modulated in place by its own
    vectors, so neither a new (B, T, C) tensor nor per-token copies of shift and scale are built."""
    if not inplace or torch.compiler.is_compiling():
        return modulate(x, per_token(shift, groups), per_token(scale, groups))
    for g, span in enumerate(spans(groups)):
        x[:, span].mul_(1 + scale[:, g].unsqueeze(1)).add_(shift[:, g].unsqueeze(1))
    return x


def weighted_site_sum(factors: tuple[torch.Tensor, ...], weights: torch.Tensor, out: torch.Tensor,
                      groups: tuple[int, ...] | None = None) -> torch.Tensor:
    """out + sum_{i, s} weights[i, s, b, None, c] * factors[i][s, b, t, c].

    factors: I tensors (S, B, T, C), weights (I, S, B, C), or (I, S, B, G, C) with ``groups``
    (several token groups: each group's tokens weighted by its own vector). Under torch.compile
    it is one reduction over (i, s), which inductor emits as a single kernel that reads every
    factor once; in eager mode the same sum is a loop of in-place multiply-adds (per group, on
    views of the stream), so no (S, B, T, C) temporary is built."""
    if groups is not None and len(groups) > 1:
        return _grouped_site_sum(factors, weights, out, groups)
    if groups is not None:
        weights = weights.select(-2, 0)
    if torch.compiler.is_compiling():
        terms = weights[0].unsqueeze(2) * factors[0]
        for i in range(1, len(factors)):
            terms = terms + weights[i].unsqueeze(2) * factors[i]
        return out + terms.sum(dim=0, dtype=out.dtype)
    acc = out.clone(memory_format=torch.contiguous_format)  # the factors' layout (tokens may be a transposed view)
    for i, slot in enumerate(factors):
        for s in range(slot.shape[0]):
            acc.addcmul_(weights[i, s].unsqueeze(1).to(acc.dtype), slot[s].to(acc.dtype))
    return acc


def _grouped_site_sum(factors: tuple[torch.Tensor, ...], weights: torch.Tensor, out: torch.Tensor,
                      groups: tuple[int, ...]) -> torch.Tensor:
    """``weighted_site_sum`` with one weight vector per token group, weights (I, S, B, G, C)."""
    if torch.compiler.is_compiling():  # the weights expanded over tokens: inductor fuses the broadcast
        w = per_token(weights, groups)  # (I, S, B, T, C)
        terms = w[0] * factors[0]
        for i in range(1, len(factors)):
            terms = terms + w[i] * factors[i]
        return out + terms.sum(dim=0, dtype=out.dtype)
    acc = out.clone(memory_format=torch.contiguous_format)
    for g, span in enumerate(spans(groups)):
        view = acc[:, span]
        for i, slot in enumerate(factors):
            for s in range(slot.shape[0]):
                view.addcmul_(weights[i, s, :, g].unsqueeze(1).to(acc.dtype), slot[s, :, span].to(acc.dtype))
    return acc


def taylor_cached_forward(model: nn.Module, gates: nn.Module, factors: torch.Tensor, coeffs: torch.Tensor,
                          tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """A FORA / TaylorSeer cached step after the embedding: all gates at once, one weighted sum,
    the final layer. gates: the model's grouped modulation of kind gate (``grouped_modulation``);
    factors: I slots (S, B, T, C), S sites in execution order; coeffs (I,)."""
    g = gates(c)[:, :, 0].transpose(0, 1)  # (B, S, G, C) -> (S, B, G, C)
    w = coeffs.view(-1, 1, 1, 1, 1).to(g.dtype) * g.unsqueeze(0)  # (I, S, B, G, C)
    tokens = weighted_site_sum(factors, w, tokens, token_groups(model, tokens))
    return model.head(tokens, c)


def taylor_cached_step(model: nn.Module, gates: nn.Module, factors: torch.Tensor, coeffs: torch.Tensor,
                       x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The whole cached step of FORA / TaylorSeer: embedding, then ``taylor_cached_forward``."""
    tokens, c = model.embed(x, t, y)
    return taylor_cached_forward(model, gates, factors, coeffs, tokens, c)


def forward_with_stores(model: nn.Module, tokens: torch.Tensor, c: torch.Tensor, inp0: torch.Tensor | None,
                        store: Callable[[int, torch.Tensor, torch.Tensor], None] | None
                        ) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor]]:
    """The model's blocks, op for op (each block's own ``run``), for a full step that stores:
    every branch's (site, input, output) goes to ``store`` as it runs (eager code), or, with
    ``store=None``, is collected and returned (compiled code stores every site at once after the
    last block). ``inp0``: block 0's attention input already computed (RFC's probe). Returns the
    residual stream after the last block, the outputs and the inputs (empty when stored)."""
    outs: list[torch.Tensor] = []
    inps: list[torch.Tensor] = []
    for block, base in zip(model.blocks, site_bases(model), strict=True):
        def branch(b: int, x: torch.Tensor, norm: nn.Module, shift: torch.Tensor, scale: torch.Tensor,
                   module: nn.Module, base: int = base) -> torch.Tensor:
            s = base + b
            inp = inp0 if s == 0 and inp0 is not None else modulate(norm(x), shift, scale)
            out = module(inp)
            if store is None:
                outs.append(out)
                inps.append(inp)
            else:
                store(s, inp, out)
            return out

        tokens = block.run(tokens, c, branch)
    return tokens, outs, inps


def full_step(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, slots: tuple[torch.Tensor, ...],
              spacing: torch.Tensor | int, keep: torch.Tensor, valid: int | None) -> torch.Tensor:
    """A full step of FORA / TaylorSeer: the model's forward with every branch output shifted
    into the factor bank's slots. valid = None: the compiled form (every site stored at once,
    the step's scalars as tensors); an int: the eager form (each site stored as it runs, over the
    valid slots, exactly as the per-site path stores it)."""
    tokens, c = model.embed(x, t, y)
    if valid is None:
        tokens, outs, _ = forward_with_stores(model, tokens, c, None, None)
        store_all(slots, None, torch.stack(outs), spacing, keep)
    else:
        def store(s: int, inp: torch.Tensor, out: torch.Tensor) -> None:
            store_factors(slots, None, s, out, spacing, valid)

        tokens, _, _ = forward_with_stores(model, tokens, c, None, store)
    return model.head(tokens, c)


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
            elif dataclasses.is_dataclass(a):  # e.g. RFC's probe: its tensors are per-step inputs
                sig.append((i, type(a).__name__, *((tuple(v.shape), v.dtype) for v in _tensor_fields(a).values())))
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
            if dataclasses.is_dataclass(a):
                for dst, src in zip(slot.values(), _tensor_fields(a).values(), strict=True):
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
            elif dataclasses.is_dataclass(a):
                bound.append(dataclasses.replace(a, **slot))
            else:
                bound.append(slot)
        return bound

    def _capture(self, args: tuple) -> tuple[object, list, torch.Tensor]:
        slots: list = []
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and i not in self.static:
                slots.append(a.clone())
            elif dataclasses.is_dataclass(a):
                slots.append({k: v.clone() for k, v in _tensor_fields(a).items()})
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


def _tensor_fields(obj: object) -> dict[str, torch.Tensor]:
    """The tensor-valued fields of a dataclass argument, by name."""
    values = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
    return {name: v for name, v in values.items() if isinstance(v, torch.Tensor)}


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
    """A method that is a step-level ``Schedule`` (``schedule``) plus a ``TaylorPredictor``
    (``predictor``: Taylor predictions from one FactorBank, FORA: order 0; TaylorSeer: order m):
    full steps store into the bank, cached steps predict per site or run the step programs
    (``full_step``, ``taylor_cached_step``). Subclasses set ``schedule`` and call ``make_bank``
    in ``reset``."""

    schedule: Schedule
    predictor: TaylorPredictor

    @property
    def bank(self) -> FactorBank:
        """The predictor's factor bank, which the step programs read and write."""
        return self.predictor.bank

    def make_bank(self, order: int, dtype: torch.dtype | None) -> None:
        """The predictor for the attached model, its bank kept (zeroed) from batch to batch."""
        predictor = getattr(self, "predictor", None)
        if predictor is None or predictor.order != order or predictor.dtype != dtype:
            self.predictor = predictor = TaylorPredictor(order, dtype)
        predictor.setup(getattr(self, "num_sites", 2 * self.depth))

    def decide(self, step: StepInfo) -> bool:
        return self.schedule.decide(step)

    def store(self, site: Site, inp: BranchInput, out: torch.Tensor) -> None:
        self.predictor.record(site, inp, out, self.step.index)

    def predict(self, site: Site, inp: BranchInput) -> torch.Tensor:
        return self.predictor.predict(site, inp, self.step.index)

    def can_fuse(self) -> bool:
        return True

    def prepare_fused(self, model: nn.Module) -> None:
        device = model_device(model)
        self.gates = grouped_modulation(model, ("gate",))
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
            self._stats.count_full_forward(self.depth, model.token_shape[0], kinds=self.site_kinds)
            spacing, keep, _, valid = step_scalars(step, self.compile)
            return self.full_fn(model, x, t, y, self.bank.slots, spacing, keep, valid)
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
