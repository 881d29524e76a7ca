"""The step programs on FLUX (flux-tiny's shapes, random weights): the same RFC, FORA and
TaylorSeer functions that run DiT's fused path, read through the model protocol (double-stream
blocks with text and image token groups, single-stream blocks with one site).

Checked against the per-site path with the DiT tolerances of tests/test_fused.py (one cached step
1e-5, 50-step trajectories 1e-4), the degenerate settings against full compute bit for bit, and
the compiled programs (a tracing backend, each program one graph for every step) against eager
code within tests/test_compiled.py's tolerance.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch._dynamo as dynamo
from test_compiled import COMPILED_RTOL, forbid_recompiles
from test_flux import TINY, tiny_flux
from test_fused import STEP_ATOL, TRAJECTORY_ATOL

from baselines.fora import FORA
from baselines.taylorseer import TaylorSeer
from rfc.cache import CacheMethod, NoCache
from rfc.cache.base import WarmedUp
from rfc.method import RFC
from rfc.models.flux import FluxModel
from rfc.samplers.flow import FlowMatchEulerSampler
from rfc.samplers.sampling import CFGDenoiser


@pytest.fixture(scope="module")
def tiny():
    return tiny_flux(("a red car", "a cat on a mat", "a bowl of fruit"))


def inputs(n: int = 3, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.randn(n, 16, 8, 8, generator=torch.Generator().manual_seed(seed))
    return x, torch.arange(n) % 3


def sample(model: FluxModel, method: CacheMethod, steps: int = 50, listener: object = None) -> torch.Tensor:
    x, y = inputs()
    method.attach(model)
    try:
        with torch.no_grad():
            return FlowMatchEulerSampler(num_steps=steps).sample(
                CFGDenoiser(model, 1.0, 0, 16), x.clone(), y, listener=listener or method
            )
    finally:
        method.detach()


def fusable() -> list[CacheMethod]:
    return [
        FORA(interval=4),
        TaylorSeer(interval=4, order=2),
        TaylorSeer(interval=5, order=4),
        RFC(tau=0.1),
        RFC(tau=0.3, order=3),
        RFC(rcs=False, interval=5),
        RFC(rfe=False, tau=0.1),
    ]


def pair(method: CacheMethod) -> tuple[CacheMethod, CacheMethod]:
    fused, per_site = method, copy.deepcopy(method)
    fused.fused, per_site.fused = True, False
    return fused, per_site


@pytest.mark.parametrize("index", range(7))
def test_fused_trajectories_equal_the_per_site_path_on_flux(tiny, index):
    fused, per_site = pair(fusable()[index])
    a = sample(tiny, fused)
    assert fused.programs  # FLUX runs the step programs, no escape to the per-site path
    b = sample(tiny, per_site)
    assert not per_site.programs
    err = (a - b).abs().max().item()
    assert err <= TRAJECTORY_ATOL, (fused.name, fused.params(), err)
    assert fused.stats() == per_site.stats(), fused.params()  # same schedule, same accounting
    assert fused.stats().cached_steps > 0


@pytest.mark.parametrize("index", range(7))
def test_one_fused_cached_step_equals_the_per_site_step_on_flux(tiny, index):
    """Both paths through the same full steps; the first cached step's model output compared."""
    fused, per_site = pair(fusable()[index])
    x, y = inputs()
    outs = {}
    for name, method in (("fused", fused), ("per_site", per_site)):
        seen = {}

        class Catch:
            def begin_step(self, step, method=method):
                method.begin_step(step)

            def end_step(self, step, method=method, seen=seen):
                method.end_step(step)

        def model_call(xt, t, yy, method=method, seen=seen):
            out = tiny(xt, t, yy)
            if not method.full and "out" not in seen:
                seen["out"] = (method.step.index, out.clone())
            return out

        method.attach(tiny)
        try:
            with torch.no_grad():
                den = CFGDenoiser(model_call, 1.0, 0, 16)
                FlowMatchEulerSampler(num_steps=50).sample(den, x.clone(), y, listener=Catch())
        finally:
            method.detach()
        outs[name] = seen["out"]
    assert outs["fused"][0] == outs["per_site"][0]
    err = (outs["fused"][1] - outs["per_site"][1]).abs().max().item()
    assert err <= STEP_ATOL, (fused.params(), err)


@pytest.mark.parametrize(
    "make",
    [lambda: FORA(interval=1), lambda: TaylorSeer(interval=1, order=2), lambda: RFC(tau=0.0)],
    ids=["fora", "taylorseer", "rfc"],
)
def test_degenerate_settings_equal_full_compute_bit_for_bit_on_flux(tiny, make):
    reference = sample(tiny, NoCache())
    method = make()
    got = sample(tiny, method)
    assert method.programs and method.stats().cached_steps == 0
    assert torch.equal(got, reference)


PROGRAMS = {
    "fora": (lambda: FORA(interval=4), 2),
    "taylorseer": (lambda: TaylorSeer(interval=4, order=2), 2),
    "rfc": (lambda: RFC(tau=0.3), 3),
}  # full step + cached step (+ RFC's RCS probe)


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_step_programs_compile_whole_once_and_match_eager_on_flux(tiny, name):
    make, programs = PROGRAMS[name]
    eager = make()
    expected = sample(tiny, eager)
    graphs = []

    def counting(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    dynamo.reset()
    method = make()
    method.compile, method.compile_backend = True, counting
    try:
        got = sample(tiny, method, listener=WarmedUp(method, forbid_recompiles))
    finally:
        dynamo.config.error_on_recompile = False
    assert len(graphs) == programs  # each program one graph, traced once for all 50 steps
    assert method.stats() == eager.stats()
    assert 0 < method.stats().cached_steps and method.stats().full_steps < 50
    err = (got - expected).abs().max().item()
    assert err <= COMPILED_RTOL * expected.abs().max().item(), err


def test_grouped_modulation_equals_each_blocks_own(tiny):
    """One matmul gives every site's text and image vectors as each FLUX block computes them."""
    x, y = inputs()
    tokens, c = tiny.embed(x, torch.full((3,), 0.5), y)
    kinds = ("shift", "scale", "gate")
    mods = tiny.grouped_modulation(kinds)(c)  # (B, sites, kinds, groups, C)
    n_txt, n_img = tiny.token_groups
    assert (n_txt, n_img) == (TINY.text_tokens, TINY.image_tokens)
    s = 0
    for block in tiny.blocks:
        for own in block.modulation(c):
            for j, kind in enumerate(kinds):
                vec = getattr(own, kind)
                if vec.dim() == 2:  # single-stream: one vector for every token
                    vec = vec.unsqueeze(1).expand(-1, n_txt + n_img, -1)
                torch.testing.assert_close(
                    mods[:, s, j, 0].unsqueeze(1).expand(-1, n_txt, -1), vec[:, :n_txt], rtol=1e-5, atol=1e-6
                )
                torch.testing.assert_close(
                    mods[:, s, j, 1].unsqueeze(1).expand(-1, n_img, -1), vec[:, n_txt:], rtol=1e-5, atol=1e-6
                )
            s += 1
    assert s == mods.shape[1]
