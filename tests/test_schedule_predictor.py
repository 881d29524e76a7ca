"""One schedule interface (rfc.cache.schedules.Schedule) and one predictor interface
(rfc.cache.predictors.Predictor): every caching method is a schedule plus a predictor, each
usable alone, and a new method composes them without touching the model or the step programs."""

from __future__ import annotations

import inspect

import pytest
import torch

import baselines.toca as toca_module
from baselines.fbcache import FBCache
from baselines.fora import FORA
from baselines.taylorseer import TaylorSeer
from baselines.teacache import TeaCache
from baselines.toca import ToCa, ToCaDitSchedule, ToCaFluxSchedule
from rfc.cache.base import Site
from rfc.cache.blocks import ResidualReuse
from rfc.cache.fused import TaylorBankMethod
from rfc.cache.predictors import FactorBank, Predictor, TaylorPredictor, taylor_expand
from rfc.cache.schedules import EveryN, Schedule, Signal, WarmupInterval
from rfc.method import RFC, RelationalPredictor, RelationalSchedule, RelationalState, relational_prediction
from rfc.models.dit import DiTConfig
from rfc.models.load import build_dit
from rfc.samplers.sampling import CFGDenoiser, DDIMSampler, StepInfo

SMALL = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


def steps(n: int) -> list[StepInfo]:
    return [StepInfo(index=i, timestep=0, num_steps=n) for i in range(n)]


@pytest.fixture(scope="module")
def small():
    return build_dit(SMALL, None, init="dense", seed=0).eval()


def trajectory(model, method, steps: int = 20) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(2, 4, 8, 8, generator=gen), torch.tensor([1, 2])
    method.attach(model)
    try:
        with torch.no_grad():
            return DDIMSampler(num_steps=steps).sample(CFGDenoiser(model, 1.5, 10, 3), x, y, listener=method)
    finally:
        method.detach()


@pytest.mark.parametrize(
    "make",
    [FORA, TaylorSeer, RFC, ToCa, FBCache, TeaCache],
    ids=["fora", "taylorseer", "rfc", "toca", "fbcache", "teacache"],
)
def test_every_method_is_a_schedule_plus_a_predictor(make):
    method = make()
    assert isinstance(method.schedule, Schedule)
    assert isinstance(method.predictor, Predictor)
    assert isinstance(method.schedule.signal, Signal)


def test_every_n_counts_down_as_dit_and_up_as_flux():
    down = [s.index for s in steps(50) if EveryN(3).decide(s)]
    assert down == [0, *(s.index for s in steps(50) if s.index and s.down_index % 3 == 0)]
    up = [s.index for s in steps(50) if EveryN(3, counting="up").decide(s)]
    assert up == list(range(0, 50, 3))
    with pytest.raises(ValueError, match="method.interval"):
        EveryN(0)


def test_fora_reads_its_schedule_and_the_models_counting():
    fora = FORA(interval=4)
    assert isinstance(fora.schedule, EveryN) and fora.schedule.counting == "down"
    assert [fora.decide(s) for s in steps(8)] == [EveryN(4).decide(s) for s in steps(8)]


def test_warmup_interval_is_called_or_asked_alike():
    a, b = WarmupInterval(4, 3), WarmupInterval(4, 3)
    assert [a(s) for s in steps(20)] == [b.decide(s) for s in steps(20)]
    one = WarmupInterval(4, 3)
    assert [s.index for s in steps(20) if one.decide(s)] == [0, 1, 2, 6, 10, 14, 18]
    assert a.params() == {"interval": 4, "warmup": 3}


def test_relational_schedule_reads_block_0_input_through_the_interface():
    schedule = RelationalSchedule(tau=0.0, warmup=0, order=1, modules="first", dtype=torch.float32)
    assert schedule.signal is Signal.INPUT
    assert all(schedule.decide(s, torch.ones(1, 2, 3)) for s in steps(5))  # tau = 0: every step full


def test_taylor_predictor_records_and_predicts_as_the_bank():
    predictor = TaylorPredictor(order=2, dtype=torch.float32)
    predictor.setup(sites=2)
    bank = FactorBank(2, 2)
    gen = torch.Generator().manual_seed(0)
    site = Site(0, "mlp", 1)
    values = []
    for index in (0, 3, 6):
        v = torch.randn(2, 4, 8, generator=gen)
        values.append(v)
        predictor.record(site, v, v, index)
        bank.update(1, v, index)
    got = predictor.predict(site, values[-1], 8)
    assert torch.equal(got, bank.predict(1, 8))
    d1 = (values[2] - values[1]) / 3
    d2 = (d1 - (values[1] - values[0]) / 3) / 3
    torch.testing.assert_close(got, taylor_expand([values[2], d1, d2], 2))
    predictor.reset()
    assert predictor.bank.last_index is None and not any(t.any() for t in predictor.tensors())


def test_relational_predictor_equals_the_equations():
    predictor = RelationalPredictor(
        order=2, magnitude="relational", reduction="sample", dtype=torch.float32, constant_w=1.2
    )
    predictor.setup(sites=1)
    reference = RelationalState(toca_free_factors())
    site = Site(0, "attn", 0)
    gen = torch.Generator().manual_seed(1)
    for index in (0, 2, 4):
        out, inp = torch.randn(2, 4, 8, generator=gen), torch.randn(2, 4, 8, generator=gen)
        predictor.record(site, inp, out, index)
        reference.update(out, inp, index, "sample", torch.float32)
    now = torch.randn(2, 4, 8, generator=gen)
    expected = relational_prediction(reference, 5, "relational", "sample", now)
    assert torch.equal(predictor.predict(site, now, 5), expected)


def toca_free_factors():
    from rfc.cache.predictors import TaylorFactors

    return TaylorFactors(2)


def test_residual_reuse_through_the_predictor_interface():
    reuse = ResidualReuse(start=1)
    entering, out = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    reuse.record(Site(1, "attn"), entering, out, 0)
    later = torch.randn(2, 4, 8)
    assert torch.equal(reuse.predict(Site(1, "attn"), later, 3), later + (out - entering))


class EveryOther(Schedule):
    """A schedule written here: full at even steps."""

    def decide(self, step: StepInfo, signal: torch.Tensor | None = None) -> bool:
        return step.index % 2 == 0


class Composed(TaylorBankMethod):
    """A method made of a schedule and a predictor and nothing else: the step programs come with it."""

    name = "composed"

    def __init__(self, fused: bool) -> None:
        super().__init__()
        self.schedule, self.fused = EveryOther(), fused

    def reset(self) -> None:
        super().reset()
        self.make_bank(1, torch.float32)


def test_a_new_schedule_with_a_taylor_predictor_runs_fused_and_per_site(small):
    fused, per_site = Composed(fused=True), Composed(fused=False)
    a, b = trajectory(small, fused), trajectory(small, per_site)
    assert fused.programs and not per_site.programs
    assert fused.stats() == per_site.stats()
    assert fused.stats().full_indices == list(range(0, 20, 2))
    assert (a - b).abs().max().item() <= 1e-4 * max(1.0, b.abs().max().item())  # summation order only


def test_toca_recipes_are_settings():
    assert "rfc.models" not in inspect.getsource(toca_module)  # methods never import a concrete model
    toca = ToCa()
    assert "recipe" not in toca.params() and toca.used_recipe == "dit" and isinstance(toca.schedule, ToCaDitSchedule)
    assert ToCa(recipe="dit").params()["recipe"] == "dit"
    assert isinstance(ToCa(recipe="flux").schedule, ToCaFluxSchedule)
    assert ToCa(recipe="flux").params()["recipe"] == "flux"
    with pytest.raises(ValueError, match="method.recipe"):
        ToCa(recipe="sdxl")
    with pytest.raises(ValueError, match="method.recipe"):
        ToCa(recipe="flux").check_model_family("dit")
    ToCa(recipe="auto").check_model_family("flux")


def test_toca_flux_recipe_refuses_a_dit_model(small):
    with pytest.raises(ValueError, match="method.recipe"):
        ToCa(recipe="flux").attach(small)
    assert "forward" not in vars(small)


def test_toca_auto_recipe_follows_the_model(small):
    from test_flux import tiny_flux

    flux = tiny_flux(("a",))
    toca = ToCa(interval=4, fresh_ratio=0.1)
    toca.attach(flux)
    try:
        assert toca.flux and isinstance(toca.schedule, ToCaFluxSchedule) and toca.used_recipe == "flux"
    finally:
        toca.detach()
    toca.attach(small)
    try:
        assert not toca.flux and isinstance(toca.schedule, ToCaDitSchedule) and toca.used_recipe == "dit"
    finally:
        toca.detach()
