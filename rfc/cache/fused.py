"""Fast cached steps: the whole forward of a cached step as one function over contiguous buffers.

On a cached step of FORA or TaylorSeer every branch output is a prediction that does not depend
on the residual stream, so the 2 x depth sequential residual updates collapse into one sum:

    x_out = x_in + sum_{i, s} (c_i g_s) * F[i, s],      c_i = k^i / i!

over Taylor orders i and sites s (attention and MLP of every block), with the gates g_s of all
blocks taken from one matmul of stacked adaLN weights. No norm, modulation or per-site Python
runs; the stored factors are read once. RFC's relational magnitude needs each branch's current
input, so its cached step walks the blocks in order, but each site is one layer norm, two
per-sample norms and one weighted sum; ||T_m(k)|| comes from the Gram matrix of the factors,
computed once per full step, so the factors are read once per cached step there too.

``FactorBank`` keeps every site's Taylor factors in one (order+1, sites, B, T, C) buffer, which
both the per-site path (full steps, and ``fused=false``) and the fused path read, so the two differ
only in summation order (tests bound the difference). Under ``compile=true`` the step functions
go through torch.compile, which fuses the weighted sums and residual updates into a few kernels.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from rfc.cache.base import BranchInput, CacheMethod, Site
from rfc.cache.predictors import taylor_expand


class FactorBank:
    """Taylor factors of all sites in one buffer: buf[i, s] is factor i of site s.

    Update rule per site (TaylorSeer's): new[0] = value, new[i + 1] = (new[i] - old[i]) / d, with d
    the steps between the last two full steps; ``valid`` factors exist (fewer than order + 1 until
    enough full steps have been seen). All sites are updated at the same full steps. With
    ``gram=True`` the bank also keeps, per site and sample, the Gram matrix of factors 1..order
    (fp32), from which RFC's ||T_m(k)|| follows without reading the factors again."""

    def __init__(self, order: int, sites: int, dtype: torch.dtype | None = torch.float32, gram: bool = False) -> None:
        self.order, self.sites, self.dtype, self.with_gram = order, sites, dtype, gram
        self.reset()

    def reset(self) -> None:
        self.buf: torch.Tensor | None = None
        self.gram: torch.Tensor | None = None  # (sites, B, order, order)
        self.valid = 0
        self.last_index: int | None = None
        self._step: int | None = None  # index of the full step being stored
        self._spacing: int | None = None

    def update(self, site: int, value: torch.Tensor, index: int) -> None:
        """Record site ``site``'s full output at step ``index``."""
        if self.buf is None:
            dtype = self.dtype or value.dtype
            self.buf = torch.zeros((self.order + 1, self.sites, *value.shape), dtype=dtype, device=value.device)
            if self.with_gram:
                self.gram = torch.zeros((self.sites, value.shape[0], self.order, self.order), device=value.device)
        if index != self._step:  # the first site of a new full step
            self._spacing = None if self.last_index is None else index - self.last_index
            self.valid = 1 if self.last_index is None else min(self.order + 1, self.valid + 1)
            self._step, self.last_index = index, index
        cur = value
        for i in range(self.valid - 1):
            nxt = (cur - self.buf[i, site]) / self._spacing
            self.buf[i, site] = cur
            cur = nxt
        self.buf[self.valid - 1, site] = cur
        if self.gram is not None and self.valid > 1:
            flat = self.buf[1 : self.valid, site].float().flatten(2).transpose(0, 1)  # (B, n, T*C)
            self.gram[site, :, : self.valid - 1, : self.valid - 1] = flat @ flat.transpose(1, 2)

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
        return taylor_expand([self.buf[i, site] for i in range(self.valid)], index - self.last_index, out_dtype)

    def factors(self) -> torch.Tensor:
        """All factor slots of every site, (order + 1, sites, B, T, C), the buffer itself. Slots
        beyond ``valid`` are zero (a bank is fresh per batch and fills in order), so with
        ``coefficients(padded=True)`` one fixed shape serves every cached step: a compiled step
        function is traced once per batch size, not once per factor count."""
        return self.buf

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.buf, self.gram) if t is not None]


class StackedModulation(nn.Module):
    """adaLN modulations of every block from one matmul: the selected chunks (0..5 = shift_msa,
    scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp) of all blocks' weights, stacked once
    when a method attaches. Returns (B, depth, len(chunks), C)."""

    def __init__(self, blocks: nn.ModuleList, chunks: tuple[int, ...]) -> None:
        super().__init__()
        self.depth, self.chunks = len(blocks), chunks
        lin = [b.adaLN_modulation[1] for b in blocks]
        C = lin[0].in_features
        with torch.no_grad():
            w = torch.cat([l.weight.view(6, C, C)[list(chunks)] for l in lin]).reshape(-1, C)
            b = torch.cat([l.bias.view(6, C)[list(chunks)] for l in lin]).reshape(-1)
        self.register_buffer("weight", w.clone(), persistent=False)
        self.register_buffer("bias", b.clone(), persistent=False)
        self.hidden = C

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(c), self.weight, self.bias).view(c.shape[0], self.depth, len(self.chunks), self.hidden)


def weighted_site_sum(factors: torch.Tensor, weights: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """out + sum_{i, s} weights[i, s, b, None, c] * factors[i, s, b, t, c].

    factors (I, S, B, T, C), weights (I, S, B, C). Under torch.compile it is one reduction over
    (i, s), which inductor emits as a single kernel that reads every factor once; in eager mode
    the same sum is a loop of in-place multiply-adds, so no (I, S, B, T, C) temporary is built."""
    if torch.compiler.is_compiling():
        return out + (weights.unsqueeze(3) * factors).sum(dim=(0, 1), dtype=out.dtype)
    acc = out.clone()
    for i in range(factors.shape[0]):
        for s in range(factors.shape[1]):
            acc.addcmul_(weights[i, s].unsqueeze(1).to(acc.dtype), factors[i, s].to(acc.dtype))
    return acc


GATE_CHUNKS = (2, 5)  # gate_msa, gate_mlp among the six adaLN chunks


def taylor_cached_forward(model: nn.Module, gates: StackedModulation, factors: torch.Tensor, coeffs: torch.Tensor,
                          tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """A FORA / TaylorSeer cached step after the embedding: all gates at once, one weighted sum,
    the final layer. factors (I, S, B, T, C), S = 2 * depth in execution order; coeffs (I,)."""
    g = gates(c)  # (B, depth, 2, C): gate_msa, gate_mlp
    g = g.permute(1, 2, 0, 3).reshape(-1, g.shape[0], g.shape[-1])  # (S, B, C)
    w = coeffs.view(-1, 1, 1, 1).to(g.dtype) * g.unsqueeze(0)  # (I, S, B, C)
    tokens = weighted_site_sum(factors, w, tokens)
    return model.unpatchify(model.final_layer(tokens, c))


class TaylorStep:
    """The fused cached step of FORA and TaylorSeer, bound to an attached model."""

    def __init__(self, model: nn.Module, compile: bool) -> None:
        self.gates = StackedModulation(model.blocks, GATE_CHUNKS)
        self.fn = maybe_compile(taylor_cached_forward, compile)

    def __call__(self, model: nn.Module, factors: torch.Tensor, coeffs: list[float], x: torch.Tensor,
                 t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tokens, c = model.embed(x, t, y)
        return self.fn(model, self.gates, factors, torch.tensor(coeffs, device=x.device), tokens, c)


def relational_cached_forward(model: nn.Module, mods: StackedModulation, factors: torch.Tensor,
                              inputs: torch.Tensor, ratio: torch.Tensor, grams: torch.Tensor,
                              coeffs: torch.Tensor, tokens: torch.Tensor, c: torch.Tensor,
                              inp0: torch.Tensor | None) -> torch.Tensor:
    """An RFC cached step (relational magnitude, per-sample norms) after the embedding, site by site:

        I = modulate(norm(x), shift, scale);  a = s(t) ||I - I(t)|| / ||T_m(k)||
        x = x + gate * (F0 + a * sum_{i>=1} c_i F_i)

    factors (I, S, B, T, C); inputs (S, B, T, C) = I(t); ratio (S, B) = s(t); grams (S, B, m, m);
    coeffs (I,); inp0 = block 0's attention input when the schedule already computed it. Before
    two full steps the ratios are zero (and the higher factors zero), so the prediction is F0."""
    m = mods(c)  # (B, depth, 6, C)
    n = factors.shape[0]
    c_hi = coeffs[1:].float()
    for blk_i, block in enumerate(model.blocks):
        for branch, norm in ((0, block.norm1), (1, block.norm2)):
            s = 2 * blk_i + branch
            shift, scale, gate = m[:, blk_i, 3 * branch], m[:, blk_i, 3 * branch + 1], m[:, blk_i, 3 * branch + 2]
            pred = factors[0, s].to(tokens.dtype)
            if n > 1:
                if s == 0 and inp0 is not None:
                    inp = inp0
                else:
                    inp = norm(tokens) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)
                d_in = (inp.float() - inputs[s].float()).flatten(1).norm(dim=1)  # (B,)
                t_norm = torch.einsum("i,bij,j->b", c_hi, grams[s, :, : n - 1, : n - 1], c_hi).clamp_min(0).sqrt()
                a = ratio[s] * d_in / t_norm.clamp_min(1e-12)  # (B,)
                for i in range(1, n):
                    pred = pred + (a * c_hi[i - 1]).view(-1, 1, 1).to(tokens.dtype) * factors[i, s].to(tokens.dtype)
            tokens = tokens + gate.unsqueeze(1) * pred
    return model.unpatchify(model.final_layer(tokens, c))


def maybe_compile(fn: Callable, enabled: bool) -> Callable:
    """torch.compile(fn) when asked (fixed shapes: one graph per batch size)."""
    return torch.compile(fn, dynamic=False) if enabled else fn


class TaylorBankMethod(CacheMethod):
    """A method whose cached sites are Taylor predictions from one FactorBank (FORA: order 0;
    TaylorSeer: order m): full steps store into the bank, cached steps predict per site or, fused,
    run TaylorStep. Subclasses set ``self.bank`` in ``reset`` and define ``decide``."""

    bank: FactorBank

    def store(self, site: Site, inp: BranchInput, out: torch.Tensor) -> None:
        self.bank.update(site.module_index, out, self.step.index)

    def predict(self, site: Site, inp: BranchInput) -> torch.Tensor:
        return self.bank.predict(site.module_index, self.step.index, inp.x.dtype)

    def can_fuse(self) -> bool:
        return True

    def prepare_fused(self, model: nn.Module) -> None:
        self.step_fn = TaylorStep(model, self.compile)

    def fast_forward(self, model: nn.Module, x: torch.Tensor, t: torch.Tensor,
                     y: torch.Tensor) -> torch.Tensor | None:
        if self.full:
            return None
        self.count_fused_cached()
        return self.step_fn(model, self.bank.factors(), self.bank.coefficients(self.step.index, padded=True), x, t, y)

    def cache_tensors(self) -> list[torch.Tensor]:
        return self.bank.tensors()
