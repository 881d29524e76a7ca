"""Block-level caching: skip a run of whole blocks at some steps and reuse what they added.

First-Block Cache and TeaCache do not predict branch outputs site by site: at a cached step they
skip every block from some index on and add, to the stream entering the first skipped block, the
residual those blocks added at the last step they were computed. Such a method is two
independent parts, composed by ``BlockCacheMethod``:

- a **schedule** (``rfc.cache.schedules.Schedule``): *when* to compute. It reads one signal, named by its
  ``signal`` attribute, so the method knows what to compute for it and when it can decide:
  ``Signal.STEP`` (the step alone, decided before any block runs), ``Signal.INPUT`` (block 0's
  modulated attention input, modulate(norm(x), shift, scale), decided before any block runs: TeaCache)
  or ``Signal.RESIDUAL`` (the residual of the blocks before ``start``, their output minus block 0's
  input, decided after they ran: First-Block Cache's block 0, DBCache's front blocks);
- a **predictor** (``ResidualReuse``, a ``rfc.cache.predictors.Predictor``): *what* to use
  instead. It names the first block it replaces (``start``) and how many blocks at the end it leaves
  (``back``, default 0); blocks before ``start`` and the last ``back`` are computed at every step
  (cache-dit's DBCache: front and back blocks).

Full steps run each block through the block protocol, ``block.run(x, c, plain_branch)``: the
very computation the model's own forward makes, so a schedule that always says "compute" gives
samples bit-identical to ``method=none``, on any model whose blocks follow the protocol
(class-conditional transformer blocks, FLUX's double-stream and single-stream blocks alike).
Nothing here reads a model's class or parameter names: block 0's signal comes from
``block.modulation(c)`` and ``block.norms``, and the tokens it is measured on from
``image_slice(model)`` (rfc.cache.base's model protocol). On a text-to-image model the signals
cover the image tokens only, as the official FLUX code measures them (ParaAttention: the image
stream's residual of the first block; TeaCache4FLUX: the image stream's ``norm1``); the reused
residual covers the whole stream (text and image tokens), as ParaAttention caches both streams'
residuals.

``schedule_scope=sample`` (BlockCacheMethod's ``scope``) gives every sample its own copy of the
schedule, deciding on that sample's rows; a step where some samples compute runs the replaced
blocks on every row (a masked full step) and only those samples take the result and store their
residual (``_decide``, ``ResidualReuse.store_rows``).

Accounting (MethodStats) stays honest about what ran: a computed block is a full block (its
modulation, each of its sites, one layer norm per site); a skipped block is its sites cached (two
for an attention + MLP block, one for a FLUX single-stream block) and no modulation; the
work a schedule does to decide (Signal.INPUT: one more modulation of block 0 and one more layer
norm of its input's measured tokens, at every step) is counted in ``block_calls`` /
``norm_tokens``. The step's decision is made inside the forward, so the NFC (``full_steps``)
counts the steps at which the replaced blocks ran.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import nn

from rfc.cache.base import CacheMethod, image_slice, modulate, plain_branch
from rfc.cache.predictors import Predictor
from rfc.cache.schedules import Schedule, Signal, check_scope, scope_params
from rfc.samplers.sampling import StepInfo

BlockSchedule = Schedule
"""A block-level method's schedule is the one schedule interface (rfc.cache.schedules)."""


class ResidualReuse(Predictor):
    """Reuse the residual of blocks ``start`` .. depth - ``back`` - 1: at a full step store (stream
    after the last replaced block) - (stream entering block ``start``); at a cached step add it to
    the stream entering block ``start``. TeaCache replaces every block (start 0), First-Block Cache
    all but block 0 (start 1), DBCache all but its front and its ``back`` blocks. The residual is
    kept in the stream's dtype. As a ``Predictor`` its one "site" is the run of replaced blocks and
    its input the stream entering it."""

    def __init__(self, start: int = 0, back: int = 0) -> None:
        for key, value in (("start", start), ("back", back)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"ResidualReuse {key} must be an integer >= 0, got {value!r}")
        self.start, self.back = start, back
        self.residual: torch.Tensor | None = None

    def stop(self, depth: int) -> int:
        """The first block after the replaced ones, in a model of ``depth`` blocks."""
        return depth - self.back

    def reset(self) -> None:
        self.residual = None

    @property
    def ready(self) -> bool:
        """Whether a full step has stored a residual to reuse."""
        return self.residual is not None

    def store(self, entering: torch.Tensor, out: torch.Tensor) -> None:
        self.residual = out - entering

    def store_rows(self, entering: torch.Tensor, out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """A masked full step: the rows ``rows`` (B,) bool take ``out`` and store their residual, the
        others keep theirs and take ``apply``; the stream after the replaced blocks."""
        mask = rows.view(-1, 1, 1)
        x = torch.where(mask, out, self.apply(entering))
        self.residual = torch.where(mask, x - entering, self.residual)
        return x

    def apply(self, entering: torch.Tensor) -> torch.Tensor:
        if self.residual is None:
            raise RuntimeError("no residual to reuse: the schedule cached a step before any full step")
        return entering + self.residual

    def record(self, site: object, inp: torch.Tensor, out: torch.Tensor, index: int) -> None:
        self.store(inp, out)

    def predict(self, site: object, inp: torch.Tensor, index: int, module: nn.Module | None = None) -> torch.Tensor:
        return self.apply(inp)

    def tensors(self) -> Iterable[torch.Tensor]:
        return () if self.residual is None else (self.residual,)

    def params(self) -> dict[str, object]:
        return {}


def relative_l1(current: torch.Tensor, previous: torch.Tensor) -> float:
    """mean |current - previous| / mean |previous| over the whole tensor (every row of the batch),
    as a Python float: the change measure both First-Block Cache and TeaCache threshold. One value
    per batch, so a batch makes one decision, as the official code does (schedule_scope=sample hands
    each sample's schedule that sample's rows only)."""
    return ((current - previous).abs().mean() / previous.abs().mean()).item()


class BlockCacheMethod(CacheMethod):
    """A schedule and a ResidualReuse composed into a method that works at the block level.

    Per forward: (Signal.INPUT) block 0's modulated attention input is computed; blocks before
    ``predictor.start`` run (Signal.RESIDUAL: block 0's residual is taken); the schedule decides;
    then either blocks ``start``.. run in full and the predictor stores their residual, or the
    predictor adds the stored residual. There are no step programs (``fused`` stays False)."""

    name = "blocks"

    def __init__(self, schedule: BlockSchedule, predictor: ResidualReuse, name: str | None = None,
                 scope: str = "batch") -> None:
        super().__init__()
        self.scope = check_scope(scope)
        try:
            self.signal = Signal(schedule.signal)
        except ValueError:
            raise ValueError(
                f"a block schedule's signal must be one of {[s.value for s in Signal]}, got {schedule.signal!r}"
            ) from None
        if self.signal is Signal.RESIDUAL and predictor.start < 1:
            raise ValueError(
                "a schedule that reads block 0's residual decides after block 0 ran: "
                "its predictor must start at block 1 or later"
            )
        self.schedule = schedule
        self.predictor = predictor
        if name is not None:
            self.name = name

    def attach(self, model: nn.Module) -> None:
        stop = self.predictor.stop(len(model.blocks))
        if self.predictor.start >= stop:
            raise ValueError(
                f"{self.name}: the predictor replaces blocks {self.predictor.start} to {stop - 1} but the model "
                f"has {len(model.blocks)} blocks: nothing would be cached"
            )
        super().attach(model)

    def reset(self) -> None:
        super().reset()
        self.schedule.reset()
        self.predictor.reset()
        self.sample_schedules: list[BlockSchedule] = []  # sample scope: one copy of the schedule per sample

    def begin_step(self, step: StepInfo) -> None:
        """The decision needs this step's tensors: it is made (and counted) in ``run_blocks``."""
        self.step = step
        self.full = True

    def run_blocks(self, model: nn.Module, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        blocks = model.blocks
        T = tokens.shape[1]
        if self.step is None:  # a forward outside a sampler: plain compute, no schedule state touched
            for block in blocks:
                tokens = block.run(tokens, c, plain_branch)
            self._stats.count_full_forward(len(blocks), T, kinds=self.site_kinds)
            return tokens
        kind, start, where = self.signal, self.predictor.start, image_slice(model)
        stop = self.predictor.stop(len(blocks))
        signal = self._block0_input(blocks[0], tokens, c, where) if kind is Signal.INPUT else None
        x = tokens
        for i in range(start):
            x = blocks[i].run(x, c, plain_branch)
        if kind is Signal.RESIDUAL:  # what the front blocks added, on the measured tokens
            signal = _tokens(x, where) - _tokens(tokens, where)
        self._stats.count_full_forward(start, T, kinds=self.kinds_of(0, start))
        decisions = self._decide(signal, x.shape[0])
        if not all(decisions) and not self.predictor.ready:
            raise RuntimeError(
                f"{self.name}: the schedule chose a cached step (index {self.step.index}) before any "
                "full step; a block schedule must compute first"
            )
        if self.scope == "sample":
            self.count_sample_steps(self.step, decisions)
        else:
            self.full = decisions[0]
            self.count_step(self.step, self.full)
        replaced = self.kinds_of(start, stop)
        if self.full:
            entering = x
            for block in blocks[start:stop]:
                x = block.run(x, c, plain_branch)
            if all(decisions):
                self.predictor.store(entering, x)
            else:  # sample scope: a masked full step
                rows = torch.tensor(decisions, device=x.device).repeat(x.shape[0] // len(decisions))
                x = self.predictor.store_rows(entering, x, rows)
            self._stats.count_full_forward(stop - start, T, kinds=replaced)
        else:
            x = self.predictor.apply(x)
            self._stats.cached_sites += len(replaced)
        for block in blocks[stop:]:  # back blocks: computed at every step
            x = block.run(x, c, plain_branch)
        self._stats.count_full_forward(len(blocks) - stop, T, kinds=self.kinds_of(stop, len(blocks)))
        return x

    def _decide(self, signal: torch.Tensor | None, rows: int) -> list[bool]:
        """The step's decisions: the schedule's one for the batch, or (schedule_scope=sample) each
        sample's own copy's on that sample's rows of the signal (its guidance halves together),
        exactly as the schedule decides a batch of that one sample. When some samples compute,
        ``run_blocks`` runs a masked full step: the replaced blocks on every row, as a full step
        runs them (no sample's values depend on which others compute), taken by those samples only."""
        if self.scope == "batch":
            return [bool(self.schedule.decide(self.step, signal))]
        samples = self.batch_samples(rows)
        if not self.sample_schedules:
            self.sample_schedules = [copy.deepcopy(self.schedule) for _ in range(samples)]
        decisions = []
        for i, schedule in enumerate(self.sample_schedules):
            # the sample's rows, contiguous: its schedule reduces over them as over a batch of it alone
            mine = None if signal is None else signal[i::samples].contiguous()
            decisions.append(bool(schedule.decide(self.step, mine)))
        return decisions

    def _block0_input(self, block: nn.Module, x: torch.Tensor, c: torch.Tensor, where: slice) -> torch.Tensor:
        """modulate(norm(x), shift, scale) of block 0's attention branch on the measured tokens,
        computed for the schedule only (block 0 recomputes it when it runs): one more modulation
        and one more layer norm of those tokens."""
        self._stats.block_calls += 1
        mod = block.modulation(c)[0]
        shift, scale = mod.shift, mod.scale
        if shift.dim() == 3:  # per-token modulation (a FLUX double-stream block): the measured tokens' own
            shift, scale = _tokens(shift, where), _tokens(scale, where)
        x = _tokens(x, where)
        self._stats.norm_tokens += x.shape[1]
        return modulate(block.norms[0](x), shift, scale)

    def cache_tensors(self) -> Iterable[torch.Tensor]:
        schedules = self.sample_schedules or [self.schedule]
        return (*self.predictor.tensors(), *(t for sched in schedules for t in sched.tensors()))

    def params(self) -> dict[str, object]:
        return {**self.schedule.params(), **self.predictor.params(), **scope_params(self.scope)}


def _tokens(x: torch.Tensor, where: slice) -> torch.Tensor:
    """x (B, T, C) restricted to the token positions ``where`` (x itself for every token)."""
    return x if where == slice(None) else x[:, where]
