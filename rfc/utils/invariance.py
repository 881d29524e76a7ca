"""Batch-invariant numerics: a sample's numbers that do not depend on how many samples share its batch.

Why: a matmul kernel is picked by the shape it is called with, and kernels for different shapes
sum in different orders. On this project's reference CPU a one- or two-row matmul (the timestep
embedder and the adaLN projections at batch 1) takes another kernel than a 32-row one, so full
compute at batch 1 differs from the same sample in a batch of 16 by about 1e-6; a GPU picks its
GEMM, attention and convolution kernels by shape too. With ``schedule_scope=sample`` (rfc.cache)
a sample's decisions do not depend on its neighbours, but its image still does through these
kernels, so regenerating one sample alone would not reproduce it.

``FixedShapes(rows)`` removes that dependence by construction: while it is active, every operation
whose kernel is chosen by the batch's size is called on tiles of one fixed shape, the last tile
padded with zeros, and the padding dropped afterwards. A linear layer (``F.linear``, a matmul by a
matrix) runs on tiles of exactly ``rows`` rows (rows = every index but the last, flattened). A
batched matmul, attention (``scaled_dot_product_attention``) and a convolution run on tiles of a
fixed number of batch entries along dim 0: ``max(1, rows // r)`` with ``r`` the rows one entry holds
(its elements over its last dimension; for a convolution, its spatial positions). The tile shape
depends on ``rows`` and on the model's shapes only, never on the batch, so a row meets the same
kernel and the same summation order in a batch of 1 as in a batch of 250 (the kernel's output for a
row does not depend on the values of the other rows of its tile). A group normalisation (on the
build machine's CPU a VAE's GroupNorm gives a sample other bits, 5e-7 apart, at batch 1 than in a
batch of 4) runs on dim-0 tiles the same way. Every other operation the models use is elementwise
or reduces within one row.

It costs time: a small batch is padded up to a tile (batch 1 computes ``rows`` rows), a large one
runs as several calls, and the two results differ from the untiled ones by rounding: a run with it
is a different setting (rfc.run.setting), compared only with runs of the same ``rows``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

_LINEAR = {F.linear}
_MATMUL = {torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm, torch.Tensor.bmm}
_ATTENTION = {F.scaled_dot_product_attention}
_CONVOLUTION = {F.conv1d, F.conv2d, F.conv3d}
_PER_SAMPLE_NORM = {F.group_norm}  # statistics over one sample's channels and positions (a VAE's GroupNorm)


def _pad_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` with zero rows appended along dim 0 up to ``rows``."""
    missing = rows - x.shape[0]
    return x if missing == 0 else torch.cat([x, x.new_zeros((missing, *x.shape[1:]))])


def _tiled(call: Callable[..., torch.Tensor], tensors: list[torch.Tensor], tile: int) -> torch.Tensor:
    """``call(*tensors)`` computed on dim-0 tiles of exactly ``tile`` entries (the last padded with
    zeros), the padding's output dropped: every call sees the same dim-0 size."""
    n = tensors[0].shape[0]
    outs = []
    for start in range(0, n, tile):
        outs.append(call(*(_pad_rows(t[start:start + tile], tile) for t in tensors))[: min(tile, n - start)])
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _rows_per_entry(x: torch.Tensor) -> int:
    """The rows one dim-0 entry of ``x`` holds: its elements over its last dimension."""
    return max(1, math.prod(x.shape[1:-1]))


class FixedShapes(TorchFunctionMode):
    """While active, linear layers, batched matmuls, attention, convolutions and group norms run on
    tiles of one fixed shape (module docstring): their results for a sample do not depend on its
    batch."""

    def __init__(self, rows: int) -> None:
        super().__init__()
        if isinstance(rows, bool) or not isinstance(rows, int) or rows < 1:
            raise ValueError(f"FixedShapes needs a positive number of rows per tile, got {rows!r}")
        self.rows = rows
        self.handlers: dict[Callable[..., Any], Callable[..., Any]] = {  # one lookup per torch call
            func: handler for funcs, handler in ((_LINEAR, self._linear), (_MATMUL, self._matmul),
                                                 (_ATTENTION, self._attention), (_CONVOLUTION, self._convolution),
                                                 (_PER_SAMPLE_NORM, self._per_sample_norm))
            for func in funcs}

    def entries(self, x: torch.Tensor) -> int:
        """Dim-0 entries per tile for a batched operation on ``x``."""
        return max(1, self.rows // _rows_per_entry(x))

    def __torch_function__(self, func: Callable[..., Any], types: Any, args: tuple = (), kwargs: dict | None = None
                           ) -> Any:
        handler = self.handlers.get(func)
        if handler is None:
            return func(*args, **(kwargs or {}))
        return handler(func, *args, **(kwargs or {}))

    def _row_tiles(self, x: torch.Tensor, apply: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``apply`` to the rows of ``x`` (every index but the last, flattened) in tiles of ``rows``."""
        flat = x.reshape(-1, x.shape[-1])
        if flat.shape[0] == 0:
            return apply(x)
        out = _tiled(apply, [flat], self.rows)
        return out.reshape(*x.shape[:-1], out.shape[-1])

    def _linear(self, func: Callable[..., torch.Tensor], x: torch.Tensor, weight: torch.Tensor,
                bias: torch.Tensor | None = None) -> torch.Tensor:
        return self._row_tiles(x, lambda rows: func(rows, weight, bias))

    def _matmul(self, func: Callable[..., torch.Tensor], a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        if b.dim() == 2 and a.dim() >= 2:  # rows times one matrix: a linear layer
            return self._row_tiles(a, lambda rows: func(rows, b))
        if a.dim() >= 3 and b.dim() == a.dim() and a.shape[0] == b.shape[0] and a.shape[0] > 0:
            return _tiled(func, [a, b], self.entries(a))
        return func(a, b)  # a vector, or a batch broadcast against one operand: no batch to tile

    def _attention(self, func: Callable[..., torch.Tensor], query: torch.Tensor, key: torch.Tensor,
                   value: torch.Tensor, attn_mask: torch.Tensor | None = None, *args: Any, **kwargs: Any
                   ) -> torch.Tensor:
        n = query.shape[0]
        if query.dim() < 3 or n == 0 or key.shape[0] != n or value.shape[0] != n:
            return func(query, key, value, attn_mask, *args, **kwargs)
        if attn_mask is not None and attn_mask.dim() == query.dim() and attn_mask.shape[0] == n:
            return _tiled(lambda q, k, v, m: func(q, k, v, m, *args, **kwargs),
                          [query, key, value, attn_mask], self.entries(query))
        return _tiled(lambda q, k, v: func(q, k, v, attn_mask, *args, **kwargs), [query, key, value],
                      self.entries(query))

    def _convolution(self, func: Callable[..., torch.Tensor], x: torch.Tensor, *args: Any, **kwargs: Any
                     ) -> torch.Tensor:
        weight = args[0] if args else kwargs["weight"]
        if x.dim() != weight.dim() or x.shape[0] == 0:  # an unbatched input: no batch to tile
            return func(x, *args, **kwargs)
        spatial = max(1, math.prod(x.shape[2:]))  # output positions per entry, at stride 1
        return _tiled(lambda rows: func(rows, *args, **kwargs), [x], max(1, self.rows // spatial))

    def _per_sample_norm(self, func: Callable[..., torch.Tensor], x: torch.Tensor, *args: Any, **kwargs: Any
                         ) -> torch.Tensor:
        """A normalisation whose statistics reduce over each entry (GroupNorm): its kernel, too, gives
        an entry other bits at another batch size (measured at batch 1 on a CPU), so it sees one shape."""
        if x.dim() < 2 or x.shape[0] == 0:
            return func(x, *args, **kwargs)
        return _tiled(lambda rows: func(rows, *args, **kwargs), [x], self.entries(x))


def batch_invariance(rows: int) -> contextlib.AbstractContextManager:
    """``FixedShapes(rows)``, or nothing for ``rows=0`` (the default numerics)."""
    return FixedShapes(rows) if rows else contextlib.nullcontext()
