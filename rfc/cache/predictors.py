"""Per-site predictors shared by the methods: plain reuse and TaylorSeer's finite-difference
Taylor expansion over the full steps."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

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


class TaylorFactors:
    """Derivative factors of one site's output, updated at every full step.

    factors[0] = F(t) (the last full output); factors[i + 1] = (factors[i] - previous factors[i]) / d,
    where d is the number of steps between the last two full steps, up to ``order`` (fewer while
    fewer full steps exist). The prediction k steps after the last full step is
    sum_i factors[i] * k^i / i!. Step indices are forward-order (k > 0 moves towards the data);
    the official code counts down, which gives the same distances.
    """

    def __init__(self, order: int, dtype: torch.dtype = torch.float32) -> None:
        self.order = order
        self.dtype = dtype
        self.factors: list[torch.Tensor] = []
        self.last_index: int | None = None

    def update(self, value: torch.Tensor, index: int) -> None:
        new = [value]
        if self.last_index is not None:
            d = index - self.last_index
            for i in range(min(self.order, len(self.factors))):
                new.append((new[i] - self.factors[i]) / d)
        self.factors = [f.to(self.dtype) for f in new]
        self.last_index = index

    def predict(self, index: int, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.last_index is None:
            raise RuntimeError("Taylor prediction before any full step")
        return taylor_expand(self.factors, index - self.last_index, out_dtype)

    def tensors(self) -> list[torch.Tensor]:
        return list(self.factors)
