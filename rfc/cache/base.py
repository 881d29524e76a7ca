"""The contract between the runner, the sampler, the model and a caching method.

A method attaches to a built, unmodified model by overriding ``forward`` on the model *instance*
(so ``state_dict`` keys and the class never change) and detaches by deleting the override. It
sees a step at three levels, outermost first, and each level is a hook with a default that
computes everything:

- guidance (``guidance``): the guided output from the conditional and unconditional rows;
- blocks (``run_blocks``): the residual stream through every block (skip or reuse whole blocks);
- branches (``branch``): one attention or MLP output (compute it, predict it, or compute part).

Step programs (``fast_forward``) may replace a whole step by one function. The model side is
``MODEL_PROTOCOL``: embed, blocks (each with ``modulation`` and ``run``), head, and the shapes
and stacked modulations step programs need, by name. The sampler announces every step
(``begin_step`` / ``end_step``); ``decide`` turns the step into "full or cached" once,
separately from what a cached step uses instead. The runner calls ``reset()`` before each batch
and reads ``stats()`` after it; it never branches on which method it holds.

Accounting is done here, not in the methods' math: a branch input records the layer-norm work it
really did, ``run_full`` / ``count_partial`` record the module work, and the analytic FLOPs follow
from those counts (rfc.models.flops, the papers' formula, each site kind at the cost its model
family declares: ``ModelFamily.cost``). A forward that computes fewer rows than the guided
forward asks for (guidance-level reuse: the conditional rows alone) notes its work in
``MethodStats.reduced_rows``, so the FLOPs charge the rows that ran, not both halves of guidance.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import ClassVar, Literal, Protocol

import torch
from torch import nn

from rfc.cache.registry import method_config
from rfc.samplers.sampling import StepInfo
from rfc.utils.modulation import dense, modulate

Branch = Literal["attn", "mlp", "total"]

MODEL_PROTOCOL = ("embed", "blocks", "head", "token_shape", "weight_dtype", "stacked_modulation")
"""What a model exposes to caching methods (each model class documents them): nothing here
reads a model's parameter names or the order of its modulation chunks. Optional: ``image_slice``,
the positions of the image tokens in the residual stream after ``embed`` (a text-to-image model's
stream also holds text tokens); a model without it has image tokens only. A model whose tokens are
modulated by different vectors in different spans (FLUX: text, then image tokens) also offers
``token_groups`` and ``grouped_modulation(kinds)``, which the step programs read
(rfc.cache.fused); one with one group needs only ``stacked_modulation``."""


class GuidedModel(Protocol):
    """The guidance wrapper as the guidance hook sees it (rfc.samplers.sampling.CFGDenoiser)."""

    model: Callable[..., torch.Tensor]
    batch_multiplier: int

    def guided(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor: ...

    def rows(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]: ...

    def combine(self, out: torch.Tensor, batch: int) -> torch.Tensor: ...


@dataclass(frozen=True)
class Site:
    """One cached module: branch ``branch`` of block ``block`` (a block's attention or MLP;
    FLUX's single-stream blocks have one site, ``total``). ``index`` is its position among all
    sites in execution order, given by the method that routes it (not part of its identity)."""

    block: int
    branch: Branch
    index: int = field(default=-1, compare=False)

    @property
    def module_index(self) -> int:
        """0 .. sites-1 in execution order (attn of block 0, mlp of block 0, attn of block 1 ...);
        a site made without an index is a two-site block's (attention, MLP)."""
        return self.index if self.index >= 0 else 2 * self.block + (0 if self.branch == "attn" else 1)


def block_branches(block: object) -> tuple[str, ...]:
    """A block's sites in execution order (``branches``; by default attention, then MLP)."""
    return tuple(getattr(block, "branches", ("attn", "mlp")))


def site_bases(model: nn.Module) -> list[int]:
    """Block i's first site index, for sites numbered in execution order across all blocks."""
    bases, n = [], 0
    for block in model.blocks:
        bases.append(n)
        n += len(block_branches(block))
    return bases


class BranchInput:
    """The input of a branch, computed only when asked for: x (B, T, C) is the residual stream
    before the branch; ``full()`` gives modulate(norm(x)) for all tokens (memoised), ``tokens(idx)``
    for a subset (B, k). Methods that predict without looking at inputs never pay for them."""

    def __init__(self, x: torch.Tensor, norm: nn.Module, shift: torch.Tensor, scale: torch.Tensor,
                 stats: MethodStats) -> None:
        self.x, self.norm, self.shift, self.scale = x, norm, shift, scale
        self._stats = stats
        self._full: torch.Tensor | None = None

    def full(self) -> torch.Tensor:
        if self._full is None:
            self._full = modulate(self.norm(self.x), self.shift, self.scale)
            self._stats.norm_tokens += self.x.shape[1]
        return self._full

    def tokens(self, idx: torch.Tensor) -> torch.Tensor:
        """Modulated input of the tokens idx (B, k) -> (B, k, C); layer norm is per token, so this
        equals full()[rows, idx] without normalising the other tokens."""
        where = idx.unsqueeze(-1).expand(-1, -1, self.x.shape[-1])
        x = torch.gather(self.x, 1, where)
        self._stats.norm_tokens += idx.shape[1]
        if self.shift.dim() == 2:
            return modulate(self.norm(x), self.shift, self.scale)
        shift, scale = dense(self.shift), dense(self.scale)
        return modulate(self.norm(x), torch.gather(shift, 1, where), torch.gather(scale, 1, where))


def input_values(inp: BranchInput | torch.Tensor) -> torch.Tensor:
    """What a site reads, as a tensor: a lazy ``BranchInput`` computed, a tensor as it is (a
    predictor is handed either: a branch's input, or the stream entering replaced blocks)."""
    return inp.full() if isinstance(inp, BranchInput) else inp


def input_dtype(inp: BranchInput | torch.Tensor) -> torch.dtype:
    """The stream's dtype, in which a prediction is returned, without computing a lazy input."""
    return inp.x.dtype if isinstance(inp, BranchInput) else inp.dtype


@dataclass
class MethodStats:
    """Per-batch accounting, per sample (every row of a batch follows the same schedule)."""

    full_steps: int = 0  # steps decided "full": the NFC the papers report (ToCa: block 0 full)
    full_indices: list[int] = field(default_factory=list)  # their forward-order indices
    cached_steps: int = 0
    full_sites: int = 0  # branch computations that ran on every token
    cached_sites: int = 0  # branches predicted or reused without compute
    partial_sites: int = 0  # branches recomputed on a token subset (ToCa)
    block_calls: int = 0  # adaLN modulations computed (one per block per step)
    full_blocks: int = 0  # blocks whose branches both ran on every token
    partial_blocks: int = 0  # blocks that recomputed some tokens (ToCa); the rest were cached
    full_attn: int = 0
    full_mlp: int = 0
    full_total: int = 0  # single-stream blocks (FLUX) computed in full
    partial_attn_tokens: list[int] = field(default_factory=list)
    partial_mlp_tokens: list[int] = field(default_factory=list)
    partial_total_tokens: list[int] = field(default_factory=list)
    norm_tokens: int = 0  # tokens pushed through a layer norm + modulate
    cache_bytes_peak: int = 0
    # schedule_scope=sample: each sample's own full steps (forward-order indices), in batch order;
    # empty in batch scope, where every sample follows ``full_indices``. There ``full_steps`` counts
    # the steps whose forward computed in full for any sample (the work), these what each sample got.
    sample_full_indices: list[list[int]] = field(default_factory=list)
    # work done by forwards that computed only a fraction of the guided forward's rows: fraction ->
    # that work (a MethodStats of work counters), which the FLOPs charge at that fraction of the rows
    reduced_rows: dict[float, MethodStats] = field(default_factory=dict)

    WORK_COUNTS = ("block_calls", "norm_tokens", "full_attn", "full_mlp", "full_total")  # what FLOPs are priced on
    WORK_LISTS = ("partial_attn_tokens", "partial_mlp_tokens", "partial_total_tokens")

    def __post_init__(self) -> None:
        # read back from a shard's JSON (rfc.run.shards): float keys arrive as strings, work as dicts
        self.reduced_rows = {float(f): w if isinstance(w, MethodStats) else MethodStats(**w)
                             for f, w in self.reduced_rows.items()}

    def work_mark(self) -> tuple[int, ...]:
        """Where the work counters stand now (``note_rows`` takes what was added since)."""
        return (*(getattr(self, k) for k in self.WORK_COUNTS), *(len(getattr(self, k)) for k in self.WORK_LISTS))

    def note_rows(self, fraction: float, mark: tuple[int, ...]) -> None:
        """The work counted since ``mark`` ran on ``fraction`` of the guided forward's rows: keep it
        under that fraction, so the FLOPs charge it only for the rows that ran."""
        work = self.reduced_rows.setdefault(fraction, MethodStats())
        counts, lengths = mark[:len(self.WORK_COUNTS)], mark[len(self.WORK_COUNTS):]
        for name, before in zip(self.WORK_COUNTS, counts, strict=True):
            setattr(work, name, getattr(work, name) + getattr(self, name) - before)
        for name, before in zip(self.WORK_LISTS, lengths, strict=True):
            getattr(work, name).extend(getattr(self, name)[before:])

    @property
    def total_steps(self) -> int:
        return self.full_steps + self.cached_steps

    def sample_nfc(self, samples: int) -> list[int]:
        """Each of the batch's ``samples`` samples' NFC: its own full steps in sample scope, the
        batch's in batch scope."""
        if self.sample_full_indices:
            return [len(indices) for indices in self.sample_full_indices]
        return [self.full_steps] * samples

    def count_block(self, full_sites_before: int, partial_sites_before: int, sites: int = 2) -> None:
        """Classify one block evaluation of ``sites`` sites by what they ran (counted since the
        given marks)."""
        full = self.full_sites - full_sites_before
        if full == sites:
            self.full_blocks += 1
        elif full or self.partial_sites - partial_sites_before:
            self.partial_blocks += 1

    def count_full_forward(self, depth: int, tokens: int, probed_tokens: int = 0,
                           kinds: tuple[str, ...] | None = None) -> None:
        """A whole forward computed in full: every block's modulation, every site on every token,
        one layer norm per site (``probed_tokens`` of them already counted by a probe that
        computed block 0's attention input first). ``kinds``: every site's branch in execution
        order (default: attention and MLP per block)."""
        kinds = kinds if kinds is not None else ("attn", "mlp") * depth
        self.block_calls += depth
        self.full_blocks += depth
        self.full_attn += kinds.count("attn")
        self.full_mlp += kinds.count("mlp")
        self.full_total += kinds.count("total")
        self.full_sites += len(kinds)
        self.norm_tokens += len(kinds) * tokens - probed_tokens


def sample_nfcs(stats: Iterable[MethodStats], sizes: Iterable[int]) -> list[int]:
    """Every sample's NFC, in sample order, from its batches' stats and sizes (MethodStats.sample_nfc)."""
    return [nfc for s, n in zip(stats, sizes, strict=True) for nfc in s.sample_nfc(n)]


class CacheMethod:
    """Base class. Subclasses set ``name``, implement ``decide`` (the step-level schedule) and
    ``predict`` (what a cached site returns), and may override ``branch`` for partial compute.
    The default branch: on full steps compute and ``store``; on cached steps ``predict``."""

    name = "base"
    computes_everything = False
    """True for the full-compute reference (``method=none``): the plain model computes every step,
    so its samples are the ones every cached run is paired with. The runner reads this instead of
    asking which method it holds."""

    def __init__(self) -> None:
        self.model: nn.Module | None = None
        self.depth = 0
        self.counting = "down"
        self.step: StepInfo | None = None
        self.full = True  # decision for the current step
        self._stats = MethodStats()
        self.fused = False  # every step through the method's step programs (one function per step)
        self.programs = False  # attached with step programs (fused and this configuration has them)
        self.compile = False  # torch.compile the step programs
        self.compile_backend = "inductor"  # tests trace with "aot_eager"
        self.guided_rows: int | None = None  # rows of the guided forward of the step being computed
        self.samples: int | None = None  # samples of the batch (known once a guided step ran)

    # ---- lifecycle ---------------------------------------------------------------------------
    def attach(self, model: nn.Module) -> None:
        """Route ``model``'s forward through this method's hooks (an instance-level override, so
        ``state_dict`` and the class are untouched) and make the method the model's
        ``cache_method``, which the guidance wrapper asks first."""
        if self.model is not None:
            raise RuntimeError(f"method {self.name!r} is already attached to a model")
        missing = [name for name in MODEL_PROTOCOL if not hasattr(model, name)]
        if missing:
            raise TypeError(f"caching methods attach to a model with {', '.join(MODEL_PROTOCOL)}; "
                            f"{type(model).__name__} lacks {', '.join(missing)}")
        if "forward" in vars(model) or getattr(model, "cache_method", None) is not None:
            raise RuntimeError("the model already has a forward override (another method attached?)")
        self.model = model
        self.depth = len(model.blocks)
        self.counting = getattr(model, "step_counting", "down")  # how the model's official caching code counts steps
        self.set_sites(model)
        self.programs = self.fused and self.can_fuse()
        if self.programs:
            self.prepare_fused(model)
        model.forward = functools.partial(_model_forward, model, method=self)
        model.cache_method = self
        self.reset()

    def set_sites(self, model: nn.Module) -> None:
        """Every site of ``model`` in execution order: ``site_kinds`` (their branches),
        ``num_sites`` and ``site_base`` (block i's first site index)."""
        self.site_base = site_bases(model)
        self.site_kinds = tuple(kind for block in model.blocks for kind in block_branches(block))
        self.num_sites = len(self.site_kinds)

    def detach(self) -> None:
        if self.model is None:
            return
        vars(self.model).pop("forward", None)
        vars(self.model).pop("cache_method", None)
        self.model = None
        self._release()

    def check_model_family(self, family: str, model_class: type | None = None) -> None:
        """Raise a ValueError naming the key when this configuration cannot run on models of
        ``family`` ("dit", "flux"), whose model class is ``model_class`` (what a method reads of it:
        the attributes it has, never which class it is); called while the run is planned, before
        anything is built."""

    # ---- step programs (optional) -------------------------------------------------------------
    def can_fuse(self) -> bool:
        """Whether this configuration has step programs (else the per-site path runs)."""
        return False

    def prepare_fused(self, model: nn.Module) -> None:
        """Build the step programs for the attached model (stacked adaLN weights, compiled functions)."""

    def fast_forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor,
                     y: torch.Tensor) -> torch.Tensor | None:
        """The model output of this step computed by the method's step programs (a full step
        with its stores, or a cached step, each one function), or None to run the model's own
        forward with the blocks routed per site."""
        return None

    def own_forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor,
                    y: torch.Tensor) -> torch.Tensor | None:
        """The model output of this step by another computation than the model's site-by-site
        forward (a peer implementation's hooks on the model's own diffusers forward), or None."""
        return None

    def count_fused_cached(self, norm_tokens: int = 0) -> None:
        """Accounting of a fused cached step: every block's adaLN ran, every site was predicted."""
        self._stats.block_calls += self.depth
        self._stats.cached_sites += self.num_sites
        self._stats.norm_tokens += norm_tokens

    def kinds_of(self, start: int, stop: int) -> tuple[str, ...]:
        """The site kinds of blocks [start, stop) in execution order: what a method that computes
        or skips whole blocks counts (a FLUX single-stream block is one ``total`` site, not an
        attention and an MLP)."""
        end = self.site_base[stop] if stop < len(self.site_base) else self.num_sites
        return self.site_kinds[self.site_base[start]:end] if start < stop else ()

    def _release(self) -> None:
        """Drop cached tensors but keep the last batch's accounting readable."""
        stats = self._stats
        self.reset()
        self._stats = stats

    def reset(self) -> None:
        """Forget everything cached and start a new batch's accounting."""
        self._stats = MethodStats()
        self.step = None
        self.full = True

    # ---- the sampler's announcements ---------------------------------------------------------
    def begin_step(self, step: StepInfo) -> None:
        self.step = step
        self.full = bool(self.decide(step))
        self.count_step(step, self.full)

    def count_step(self, step: StepInfo, full: bool) -> None:
        """Record the step decision (methods that decide later, inside the forward, call this)."""
        if full:
            self._stats.full_steps += 1
            self._stats.full_indices.append(step.index)
        else:
            self._stats.cached_steps += 1

    def batch_samples(self, rows: int) -> int:
        """schedule_scope=sample: how many samples a forward of ``rows`` rows holds (samples x
        guidance halves, halves outermost: row r is sample r % samples), from the guided step."""
        samples = self.samples or rows
        if rows % samples:
            raise RuntimeError(f"{self.name}: {rows} rows are not whole samples of a batch of {samples}")
        return samples

    def count_sample_steps(self, step: StepInfo, decisions: list[bool]) -> None:
        """schedule_scope=sample: each sample's decision at ``step`` (MethodStats.sample_full_indices),
        then the step itself, full when any sample computed (the work done)."""
        stats = self._stats
        if not stats.sample_full_indices:
            stats.sample_full_indices = [[] for _ in decisions]
        for indices, full in zip(stats.sample_full_indices, decisions, strict=True):
            if full:
                indices.append(step.index)
        self.full = any(decisions)
        self.count_step(step, self.full)

    def end_step(self, step: StepInfo) -> None:
        live = sum(t.numel() * t.element_size() for t in self.cache_tensors())
        self._stats.cache_bytes_peak = max(self._stats.cache_bytes_peak, live)

    # ---- the hooks, outermost first -----------------------------------------------------------
    def guided_step(self, denoiser: GuidedModel, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """What the guidance wrapper calls: notes how many rows the guided forward computes (its
        accounting charges a forward that computes fewer only for those), then the guidance hook."""
        self.guided_rows = x.shape[0] * denoiser.batch_multiplier
        self.samples = x.shape[0]  # the guided forward's rows are samples x halves, halves outermost
        try:
            return self.guidance(denoiser, x, t, y)
        finally:
            self.guided_rows = None

    @contextlib.contextmanager
    def counting_rows(self, rows: int) -> Iterator[None]:
        """Around one model forward of ``rows`` rows: when that is fewer than the guided forward's,
        the work it counts is noted as done on that fraction of the rows (MethodStats.note_rows)."""
        expected = self.guided_rows
        if expected is None or rows == expected:
            yield
            return
        stats = self._stats
        mark = stats.work_mark()
        yield
        stats.note_rows(rows / expected, mark)

    def guidance(self, denoiser: GuidedModel, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Guidance level: the denoiser's output for (x, t, y). The default is the denoiser's own
        guided forward; a method that reuses one half of classifier-free guidance computes fewer
        rows here (``denoiser.rows`` / ``denoiser.combine`` give the layout)."""
        return denoiser.guided(x, t, y)

    def run_blocks(self, model: nn.Module, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Block level: the residual stream after every block. The default runs each block with
        its branches routed through ``branch``; a method that skips whole blocks (First-Block
        Cache, TeaCache) overrides this."""
        for i, block in enumerate(model.blocks):
            tokens = self.run_block(i, block, tokens, c)
        return tokens

    def run_block(self, index: int, block: nn.Module, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """One block computed by the model's own ``run`` with each branch routed through
        ``branch`` (the per-site path), and its accounting."""
        stats = self._stats
        stats.block_calls += 1
        marks = stats.full_sites, stats.partial_sites

        branches, base = block_branches(block), self.site_base[index]

        def routed(b: int, x: torch.Tensor, norm: nn.Module, shift: torch.Tensor, scale: torch.Tensor,
                   module: nn.Module) -> torch.Tensor:
            site = Site(index, branches[b], base + b)
            return self.branch(site, BranchInput(x, norm, shift, scale, stats), module)

        out = block.run(x, c, routed)
        stats.count_block(*marks, sites=len(branches))
        return out

    # ---- what subclasses define --------------------------------------------------------------
    def decide(self, step: StepInfo) -> bool:
        """True = compute every site in full at this step."""
        return True

    def branch(self, site: Site, inp: BranchInput, module: nn.Module) -> torch.Tensor:
        """The branch output (before its gate) for ``site`` at the current step."""
        if self.full:
            out = self.run_full(site, module, inp.full())
            self.store(site, inp, out)
            return out
        self._stats.cached_sites += 1
        return self.predict(site, inp)

    def store(self, site: Site, inp: BranchInput, out: torch.Tensor) -> None:
        """Remember what a full computation produced."""

    def predict(self, site: Site, inp: BranchInput) -> torch.Tensor:
        raise NotImplementedError(f"{self.name} has cached steps but no predictor")

    def cache_tensors(self) -> Iterable[torch.Tensor]:
        """Every tensor the method currently keeps (for the cache-memory column)."""
        return ()

    def params(self) -> dict[str, object]:
        """Hyperparameters recorded in the result row."""
        return {}

    # ---- helpers for subclasses --------------------------------------------------------------
    def run_full(self, site: Site, module: nn.Module, x_in: torch.Tensor) -> torch.Tensor:
        """Compute the branch on every token and count it."""
        self.count_full(site)
        return module(x_in)

    def count_full(self, site: Site) -> None:
        """Count a full branch computation done by the method's own code (e.g. attention that
        also returns its map)."""
        self._stats.full_sites += 1
        if site.branch == "attn":
            self._stats.full_attn += 1
        elif site.branch == "mlp":
            self._stats.full_mlp += 1
        else:
            self._stats.full_total += 1

    def count_partial(self, site: Site, tokens: int) -> None:
        self._stats.partial_sites += 1
        lists = {"attn": self._stats.partial_attn_tokens, "mlp": self._stats.partial_mlp_tokens,
                 "total": self._stats.partial_total_tokens}
        lists[site.branch].append(tokens)

    def stats(self) -> MethodStats:
        return self._stats


def plain_branch(
    b: int, x: torch.Tensor, norm: nn.Module, shift: torch.Tensor, scale: torch.Tensor, module: nn.Module
) -> torch.Tensor:
    """A branch computed on every token, module(modulate(norm(x), shift, scale)): what a model's
    own forward passes to each block's ``run``, so ``block.run(x, c, plain_branch)`` is the
    block's plain computation, bit for bit, without the method knowing the model's class."""
    return module(modulate(norm(x), shift, scale))


def image_slice(model: nn.Module) -> slice:
    """The positions of the image tokens in ``model``'s residual stream (set by its last
    ``embed``): signals that the official code measures on the image stream (First-Block Cache's
    residual, TeaCache's modulated input) read these tokens only. Every token when the model does
    not say (class-conditional models have image tokens only)."""
    return getattr(model, "image_slice", slice(None))


def branch_input(block: nn.Module, b: int, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """modulate(norm(x), shift, scale) of branch ``b`` of ``block`` from its own modulation of c:
    what that branch would read, computed ahead of the block (RFC's probe, TeaCache's signal)."""
    mod = block.modulation(c)[b]
    return modulate(block.norms[b](x), mod.shift, mod.scale)


def _model_forward(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor, *,
                   method: CacheMethod) -> torch.Tensor:
    """The attached model's forward: the method's step program when it has one for this step,
    else the model's own computation (embed, blocks, head) with the blocks run by ``run_blocks``."""
    with method.counting_rows(x.shape[0]):
        out = method.own_forward(model, x, t, y)
        if out is None and method.programs:
            out = method.fast_forward(model, x, t, y)
        if out is not None:
            return out
        tokens, c = model.embed(x, t, y)
        return model.head(method.run_blocks(model, tokens, c), c)


@method_config("none")
@dataclass
class NoCacheConfig:
    _target_: str = "rfc.cache.NoCache"
    degenerate: ClassVar[tuple[str, ...]] = ()  # full compute already


class NoCache(CacheMethod):
    """``method=none``: the full-compute reference every cached run is compared with.

    It does not hook the blocks at all, so its samples and its latency are those of the plain
    model; it only counts the full steps for the accounting."""

    name = "none"
    computes_everything = True

    def attach(self, model: nn.Module) -> None:
        if self.model is not None:
            raise RuntimeError(f"method {self.name!r} is already attached to a model")
        self.model = model
        self.depth = len(model.blocks)
        self.set_sites(model)
        self.tokens = model.token_shape[0]
        self.reset()

    def detach(self) -> None:
        self.model = None

    def begin_step(self, step: StepInfo) -> None:
        super().begin_step(step)
        self._stats.count_full_forward(self.depth, self.tokens, kinds=self.site_kinds)


class WarmedUp:
    """A listener between the sampler and a method: forwards every announcement and, once the
    method has run both kinds of step (a full and a cached one, so every step program has been
    traced; full compute: two steps), calls ``then()`` once. Benchmarks stop their warm-up loop
    there; tests forbid recompilation from there on."""

    def __init__(self, method: CacheMethod, then: Callable[[], None]) -> None:
        self.method, self.then = method, then
        self.seen: set[bool] = set()
        self.done = False

    def begin_step(self, step: StepInfo) -> None:
        self.method.begin_step(step)

    def end_step(self, step: StepInfo) -> None:
        self.method.end_step(step)
        self.seen.add(self.method.full)
        ready = self.seen == {True, False} or (self.method.computes_everything and step.index >= 1)
        if ready and not self.done:
            self.done = True
            self.then()
