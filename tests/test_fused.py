"""Fused cached steps (rfc/cache/fused.py) against the per-site path, and the precision modes.

Tolerances: the fused step sums the same fp32 terms in another order, so a single cached step
agrees to 1e-5 (absolute, on outputs of order 1) and whole 50-step trajectories to 1e-4 (with bf16
factor storage 1e-3 of max(1, max |x|): a bf16 factor carries 2^-8 relative rounding, so the gap
scales with the latents, which DDPM on the tiny model leaves at about 32).
"""

from __future__ import annotations

import copy

import pytest
import torch
from test_cache import ROOT, TINY, sample_with

from baselines.fora import FORA
from baselines.taylorseer import TaylorSeer
from rfc.cache import CacheMethod
from rfc.cache.fused import FactorBank
from rfc.cache.predictors import taylor_expand
from rfc.method import RFC
from rfc.models.dit import DiTConfig
from rfc.models.load import build_dit
from rfc.run.build import precision_mode
from rfc.samplers.sampling import DDIMSampler, DDPMSampler, StepInfo

STEP_ATOL = 1e-5
TRAJECTORY_ATOL = 1e-4
TRAJECTORY_RTOL_BF16_STORAGE = 1e-3  # factors rounded to bf16, then scaled by k^4 / 4! and summed


@pytest.fixture(scope="module")
def tiny():
    return build_dit(TINY, ROOT / "checkpoints" / "dit-tiny-digits.pt")


def fusable() -> list[CacheMethod]:
    return [FORA(interval=4), TaylorSeer(interval=4, order=2), TaylorSeer(interval=5, order=4, storage_dtype="bf16"),
            RFC(tau=0.1), RFC(tau=0.3, order=3), RFC(rcs=False, interval=5), RFC(rfe=False, tau=0.1)]


def pair(method: CacheMethod) -> tuple[CacheMethod, CacheMethod]:
    fused, unfused = method, copy.deepcopy(method)
    fused.fused, unfused.fused = True, False
    return fused, unfused


@pytest.mark.parametrize("index", range(7))
@pytest.mark.parametrize("sampler", [DDIMSampler(num_steps=50), DDPMSampler(num_steps=50)], ids=["ddim", "ddpm"])
def test_fused_trajectories_equal_the_per_site_path(tiny, sampler, index):
    fused, unfused = pair(fusable()[index])
    a = sample_with(tiny, fused, sampler, n=4)
    stats_fused = fused.stats()
    b = sample_with(tiny, unfused, sampler, n=4)
    err = (a - b).abs().max().item()
    tol = TRAJECTORY_ATOL
    if fused.params().get("storage_dtype") == "bf16":
        tol = TRAJECTORY_RTOL_BF16_STORAGE * max(1.0, b.abs().max().item())
    assert err <= tol, (fused.name, fused.params(), err)
    # same schedule and the same accounting: the fused path does (and counts) what the per-site path does
    assert stats_fused == unfused.stats(), fused.params()
    assert stats_fused.cached_steps > 0


@pytest.mark.parametrize("index", range(7))
def test_one_fused_cached_step_equals_the_per_site_step(tiny, index):
    """Drive both paths through the same full steps, then compare the first cached step's output."""
    fused, unfused = pair(fusable()[index])
    sampler = DDIMSampler(num_steps=50)
    torch.manual_seed(0)
    x = torch.randn(6, 1, 8, 8)
    y = torch.tensor([0, 1, 2, 10, 10, 10])
    outs = {}
    for name, method in (("fused", fused), ("unfused", unfused)):
        method.attach(tiny)
        try:
            with torch.no_grad():
                d = sampler.diffusion
                for index, k in enumerate(reversed(range(d.num_timesteps))):
                    info = StepInfo(index=index, timestep=int(d.timestep_map[k]), num_steps=d.num_timesteps)
                    method.begin_step(info)
                    out = tiny(x, d.model_timesteps(torch.full((6,), k)), y)
                    method.end_step(info)
                    if not method.full:
                        outs[name] = (info.index, out)
                        break
        finally:
            method.detach()
    assert outs["fused"][0] == outs["unfused"][0]
    err = (outs["fused"][1] - outs["unfused"][1]).abs().max().item()
    assert err <= STEP_ATOL, (fused.params(), err)


def test_fused_cached_step_runs_no_block_module(tiny):
    calls = []
    hooks = [m.register_forward_hook(lambda *_: calls.append(1)) for b in tiny.blocks for m in (b.attn, b.mlp)]
    try:
        method = TaylorSeer(interval=50, order=2, warmup=3)  # steps 0-2 full, the rest cached
        sample_with(tiny, method, DDIMSampler(num_steps=10), n=2)
    finally:
        for h in hooks:
            h.remove()
    assert len(calls) == 3 * 2 * len(tiny.blocks)  # only the full steps ran attention and MLP
    assert "forward" not in vars(tiny)  # detached


class ListFactors:
    """TaylorSeer's recursion written independently of the bank: a list of factors per site."""

    def __init__(self, order: int) -> None:
        self.order, self.factors, self.last = order, [], None

    def update(self, value: torch.Tensor, index: int) -> None:
        new = [value]
        if self.last is not None:
            for i in range(min(self.order, len(self.factors))):
                new.append((new[i] - self.factors[i]) / (index - self.last))
        self.factors, self.last = new, index

    def predict(self, index: int) -> torch.Tensor:
        return taylor_expand(self.factors, index - self.last)


def test_factor_bank_matches_the_per_site_recursion():
    bank, ref = FactorBank(3, 2, gram=True), [ListFactors(3), ListFactors(3)]
    torch.manual_seed(1)
    for index in (0, 2, 3, 7, 9):
        for s in range(2):
            value = torch.randn(2, 4, 5)
            bank.update(s, value, index)
            ref[s].update(value, index)
    for s in range(2):
        assert all(torch.equal(bank.slots[i][s], f) for i, f in enumerate(ref[s].factors))
        assert torch.equal(bank.predict(s, 12), ref[s].predict(12))
        hi = torch.stack(bank.slots[1:])[:, s].flatten(2).transpose(0, 1)  # (B, 3, 20)
        torch.testing.assert_close(bank.gram[s], hi @ hi.transpose(1, 2), rtol=1e-6, atol=1e-6)


def test_stacked_modulation_equals_each_blocks_own():
    model = build_dit(DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=3, num_heads=4,
                                num_classes=10), None, init="dense", seed=0)
    c = torch.randn(5, 64)
    kinds = ("shift", "gate")
    mods = model.stacked_modulation(kinds)(c)  # (B, sites, kinds, C)
    for i, block in enumerate(model.blocks):
        for b, own in enumerate(block.modulation(c)):
            for j, kind in enumerate(kinds):
                torch.testing.assert_close(mods[:, 2 * i + b, j], getattr(own, kind), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="modulation kinds"):
        model.stacked_modulation(("gate_msa",))


def test_precision_modes_restore_settings_and_bf16_runs_on_cpu(tiny):
    before = torch.backends.cuda.matmul.allow_tf32
    with precision_mode("tf32", torch.device("cpu")):
        assert torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cuda.matmul.allow_tf32 == before
    fp32 = sample_with(tiny, TaylorSeer(interval=4, order=2), DDIMSampler(num_steps=20), n=2)
    with precision_mode("bf16-autocast", torch.device("cpu")):  # fp32 weights, bf16 autocast
        bf16 = sample_with(tiny, TaylorSeer(interval=4, order=2), DDIMSampler(num_steps=20), n=2)
    err = (bf16.float() - fp32).abs().max().item()
    assert 0 < err < 0.5, err  # bf16 differs, but stays a close approximation
    with pytest.raises(ValueError, match="precision"):
        with precision_mode("fp8", torch.device("cpu")):
            pass


def test_precision_key_is_validated_before_work(make_cfg, tmp_path):
    from rfc.run.build import plan_run

    with pytest.raises(ValueError, match="precision"):
        plan_run(make_cfg("precision=fp16"), tmp_path / "out")


def test_compiled_weighted_sum_is_one_reduction_equal_to_the_eager_loop():
    from rfc.cache.fused import weighted_site_sum

    gen = torch.Generator().manual_seed(3)
    factors = torch.randn(3, 4, 2, 16, 32, generator=gen)
    weights, out = torch.randn(3, 4, 2, 32, generator=gen), torch.randn(2, 16, 32, generator=gen)
    eager = weighted_site_sum(factors, weights, out)
    compiled = torch.compile(weighted_site_sum, dynamic=False, backend="aot_eager")(factors, weights, out)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=1e-5)


def test_compile_option_compiles_the_right_parts(tiny, monkeypatch):
    from torch import nn

    from rfc.cache import NoCache
    from rfc.run.build import compile_for

    compiled = []
    monkeypatch.setattr(nn.Module, "compile", lambda self, **kw: compiled.append(type(self).__name__))
    compile_for(tiny, NoCache())
    assert compiled == ["DiT"]  # full compute: the whole forward
    compiled.clear()
    method = TaylorSeer(interval=4, order=2)
    compile_for(tiny, method)
    assert compiled == [] and method.compile  # its step programs, each step one graph
    per_site = RFC(tau=0.1, magnitude="linear")
    compile_for(tiny, per_site)
    assert sorted(set(compiled)) == ["Attention", "Mlp"] and len(compiled) == 2 * len(tiny.blocks)
