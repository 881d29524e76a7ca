"""The one predictor interface (``Predictor``: what a cached step uses instead of computing), the
one store of Taylor factors (FactorBank) every extrapolating method uses (FORA: order 0,
TaylorSeer: order m, RFC's output factors and its RCS forecast), its update rule written twice
for two kinds of code (eager per site, compiled for all sites at once), and TaylorSeer's
expansion. ``TaylorFactors`` is one site's view of a bank; ``TaylorPredictor`` is FORA's and
TaylorSeer's predictor over a bank."""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rfc.cache.base import BranchInput, Site, input_dtype


class Predictor:
    """What a cached site (or a cached run of blocks) uses instead of being computed.

    A method is a ``Schedule`` (rfc.cache.schedules: when to compute) plus a predictor. On a full
    step the method computes and hands each result to ``record(site, inp, out, index)``; on a
    cached step it asks ``predict(site, inp, index, module)``. ``inp`` is what the site would
    read (a lazy ``BranchInput`` for a branch, computed only if the predictor asks for it; the
    stream entering the replaced blocks for block-level reuse); ``module`` is the site's module,
    for predictors that recompute part of it (ToCa's fresh tokens). ``index`` is the sampler's
    forward-order step. ``reset()`` forgets everything before each batch."""

    def reset(self) -> None:
        """Forget every stored value (a new batch starts)."""

    def record(self, site: Site, inp: BranchInput | torch.Tensor, out: torch.Tensor, index: int) -> None:
        """Remember what a full computation of ``site`` produced at step ``index``."""
        raise NotImplementedError(f"{type(self).__name__} records nothing")

    def predict(self, site: Site, inp: BranchInput | torch.Tensor, index: int,
                module: nn.Module | None = None) -> torch.Tensor:
        """The value ``site`` takes at the cached step ``index``."""
        raise NotImplementedError(f"{type(self).__name__} predicts nothing")

    def tensors(self) -> Iterable[torch.Tensor]:
        """Every tensor kept (for the cache-memory column)."""
        return ()

    def params(self) -> dict[str, object]:
        """The predictor's settings, recorded in the result row."""
        return {}

STORAGE_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_storage_dtype(name: str, key: str = "method.storage_dtype") -> torch.dtype:
    if name not in STORAGE_DTYPES:
        raise ValueError(f"{key} must be one of {sorted(STORAGE_DTYPES)}, got {name!r}")
    return STORAGE_DTYPES[name]


def taylor_expand(factors: Sequence[torch.Tensor], k: int, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """sum_i factors[i] * k^i / i!, evaluated term by term as the official TaylorSeer code does,
    ``(1 / i!) * F_i * k^i`` in that order and summed from i = 0 up. For orders >= 3 the rounding
    of 1/i! and of the two products depends on that order (F_i * (k^i / i!) is a few ulps away),
    so this is the one place the expansion is written."""
    out = factors[0].to(out_dtype)
    for i in range(1, len(factors)):
        out = out + (1 / math.factorial(i)) * factors[i].to(out_dtype) * (k**i)
    return out


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
        self.restart_below = 0  # full steps with a smaller index start the factors afresh (TaylorSeer's warm-up)
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
        first = self.last_index is None or index < self.restart_below
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
                  spacing: int, valid: int, diff: torch.Tensor | None = None) -> None:
    """Shift ``value`` into site s's factors in place (the update rule of FactorBank), over the
    valid slots, as TaylorSeer's code runs it: eager code, one site at a time. ``diff``: value -
    F_0 when the caller has already taken it (RFC measures its norm); it becomes F_1's buffer."""
    cur = value
    for i in range(valid - 1):
        last = slots[i + 1][s] if i == valid - 2 and cur.dtype == slots[i].dtype else None
        if i == 0 and diff is not None:
            delta = diff
        elif last is not None:  # the last difference straight into its slot (the old value there is never read)
            delta = torch.sub(cur, slots[i][s], out=last)
        else:
            delta = torch.sub(cur, slots[i][s])
        nxt = delta.div_(spacing)  # (cur - F_i) / d, the same two roundings, one buffer
        slots[i][s].copy_(cur)
        cur = nxt
    if cur.data_ptr() != slots[valid - 1][s].data_ptr():  # not already written in place
        slots[valid - 1][s].copy_(cur)
    if gram is not None and valid > 1:
        flat = torch.stack([slots[i][s] for i in range(1, valid)]).float().flatten(2).transpose(0, 1)  # (B, n, T*C)
        gram[s, :, : valid - 1, : valid - 1] = flat @ flat.transpose(1, 2)


def store_all(slots: tuple[torch.Tensor, ...], gram: torch.Tensor | None, values: torch.Tensor,
              spacing: torch.Tensor, keep: torch.Tensor) -> None:
    """The same rule for every site at once, values (sites, B, T, C): compiled code. Every slot
    is rewritten whole, the slots not yet valid zeroed by ``keep`` and the spacing a tensor, so
    the traced graph does not depend on how many full steps came before; the valid slots get
    the values the eager rule gives them. The Gram matrices are sums of products of the new
    factors as they are written (no stacked copy of the factors; inductor fuses each product and
    its sum into the kernels that compute the factors)."""
    cur = values
    new = []
    for i in range(len(slots) - 1):
        nxt = (cur - slots[i]) / spacing
        new.append(torch.where(keep[i], cur, 0))
        slots[i].copy_(new[-1])
        cur = nxt
    new.append(torch.where(keep[-1], cur, 0))
    slots[-1].copy_(new[-1])
    if gram is not None and len(slots) > 1:
        hi = [f.float().flatten(2) for f in new[1:]]  # m tensors (S, B, T*C)
        m = len(hi)
        dots = {(i, j): (hi[i] * hi[j]).sum(-1) for i in range(m) for j in range(i, m)}  # (S, B)
        rows = [torch.stack([dots[min(i, j), max(i, j)] for j in range(m)], dim=-1) for i in range(m)]
        gram.copy_(torch.stack(rows, dim=-2))


class TaylorFactors:
    """One site's Taylor factors with the per-site interface (``factors``, ``last_index``,
    ``update``, ``predict``): a view of site ``site`` of a FactorBank, which is the one store of
    factors every extrapolating method uses (a bank of its own with one site when none is given).

    factors[0] = F(t) (the last full output); factors[i + 1] = (factors[i] - previous factors[i]) / d,
    where d is the number of steps between the last two full steps, up to ``order`` (fewer while
    fewer full steps exist). The prediction k steps after the last full step is
    sum_i factors[i] * k^i / i!. Step indices are forward-order (k > 0 moves towards the data);
    the official code counts down, which gives the same distances.
    """

    def __init__(self, order: int = 0, dtype: torch.dtype | None = torch.float32, bank: FactorBank | None = None,
                 site: int = 0) -> None:
        self.bank = bank if bank is not None else FactorBank(order, 1, dtype)
        self.site = site
        self.last_index: int | None = None

    @property
    def order(self) -> int:
        return self.bank.order

    @property
    def factors(self) -> list[torch.Tensor]:
        if self.last_index is None:
            return []
        return [self.bank.slots[i][self.site] for i in range(self.bank.valid)]

    def update(self, value: torch.Tensor, index: int) -> None:
        self.bank.update(self.site, value, index)
        self.last_index = index

    def predict(self, index: int, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.last_index is None:
            raise RuntimeError("Taylor prediction before any full step")
        return self.bank.predict(self.site, index, out_dtype)

    def tensors(self) -> list[torch.Tensor]:
        """A view of a shared bank holds nothing of its own (the bank is counted once)."""
        return self.bank.tensors() if self.bank.sites == 1 else []


class TaylorPredictor(Predictor):
    """FORA's and TaylorSeer's predictor: every site's Taylor factors in one FactorBank (order 0:
    the last output reused; order m: TaylorSeer's expansion), predicted in the stream's dtype.
    The step programs read the same bank (``bank``)."""

    def __init__(self, order: int, dtype: torch.dtype | None) -> None:
        self.order, self.dtype = order, dtype
        self.bank = FactorBank(order, 0, dtype)

    def setup(self, sites: int) -> None:
        """The bank for a model of ``sites`` sites, kept (zeroed) from batch to batch while the
        count fits, so captured step programs stay valid."""
        if self.bank.sites != sites or self.bank.order != self.order:
            self.bank = FactorBank(self.order, sites, self.dtype)
        else:
            self.bank.reset()

    def reset(self) -> None:
        self.bank.reset()

    def record(self, site: Site, inp: BranchInput | torch.Tensor, out: torch.Tensor, index: int) -> None:
        self.bank.update(site.module_index, out, index)

    def predict(self, site: Site, inp: BranchInput | torch.Tensor, index: int,
                module: nn.Module | None = None) -> torch.Tensor:
        return self.bank.predict(site.module_index, index, input_dtype(inp))

    def tensors(self) -> list[torch.Tensor]:
        return self.bank.tensors()

    def params(self) -> dict[str, object]:
        return {"order": self.order}
