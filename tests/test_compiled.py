"""Step programs under torch.compile and CUDA-graph replay (rfc/cache/fused.py), on the CPU.

Compilation is traced with a counting backend (dynamo's graph, run as is): what is checked is that
every program is one whole graph (``fullgraph=True`` raises on any graph break), that a 50-step
DDIM trajectory compiles each program once, and that the compiled trajectory agrees with the
eager one. Tolerance: the compiled cached step sums every (order, site) term in one reduction
where eager code adds them one by one, so 50-step trajectories agree within COMPILED_RTOL of
their largest value (measured: at most 2e-5 of it on this model). The CUDA-graph bookkeeping
(copy-in of per-step inputs, the bank at a fixed address, one capture per batch shape) runs in
"emulate" mode: the same code as on a GPU with the replay replaced by a call on the graph's buffers.
"""

from __future__ import annotations

import pytest
import torch
import torch._dynamo as dynamo

from baselines.fora import FORA
from baselines.taylorseer import TaylorSeer
from rfc.cache import CacheMethod
from rfc.cache import fused as fused_mod
from rfc.cache.base import WarmedUp
from rfc.method import RFC
from rfc.models.dit import DiTConfig
from rfc.models.load import build_dit
from rfc.samplers.sampling import CFGDenoiser, DDIMSampler

COMPILED_RTOL = 1e-3
SMALL = DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=2, num_heads=4, num_classes=10)


@pytest.fixture(scope="module")
def small():
    return build_dit(SMALL, None, init="dense", seed=0).eval()


def trajectory(model, method: CacheMethod, listener=None, n: int = 2, seed: int = 0, steps: int = 50) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 8, 8, generator=gen)
    y = torch.randint(10, (n,), generator=gen)
    den = CFGDenoiser(model, 1.5, null_class=10, guided_channels=3)
    with torch.no_grad():
        return DDIMSampler(num_steps=steps).sample(den, x, y, listener=listener or method)


def forbid_recompiles() -> None:
    """Once a full and a cached step have run, any further compilation raises."""
    dynamo.config.error_on_recompile = True


PROGRAMS = {"fora": (lambda: FORA(interval=4), 2), "taylorseer": (lambda: TaylorSeer(interval=4, order=2), 2),
            "rfc": (lambda: RFC(tau=0.3), 3)}  # full step + cached step (+ RFC's RCS probe)


@pytest.mark.parametrize("name", sorted(PROGRAMS))
def test_step_programs_compile_whole_once_and_match_eager(small, name):
    make, programs = PROGRAMS[name]
    eager = make()
    eager.attach(small)
    try:
        expected = trajectory(small, eager)
    finally:
        eager.detach()
    graphs = []

    def counting(gm: torch.fx.GraphModule, example_inputs: list) -> object:
        graphs.append(gm)
        return gm.forward

    dynamo.reset()
    method = make()
    method.compile, method.compile_backend = True, counting
    method.attach(small)
    try:
        got = trajectory(small, method, WarmedUp(method, forbid_recompiles))
    finally:
        dynamo.config.error_on_recompile = False
        method.detach()
    assert len(graphs) == programs  # each program traced once for all 50 steps
    assert method.stats() == eager.stats()  # same schedule, same accounting
    assert 0 < method.stats().cached_steps and method.stats().full_steps < 50
    err = (got - expected).abs().max().item()
    assert err <= COMPILED_RTOL * expected.abs().max().item(), err


def test_full_step_program_stores_what_the_per_site_path_stores(small):
    """After the same full steps, the bank, RFC's inputs, s(t), Gram matrices and RCS's forecast
    written by the program equal the per-site path's (eager: bit for bit)."""
    states = {}
    for fused in (True, False):
        method = RFC(tau=1e9, order=2, warmup=3)  # steps 0-2 full, then cached
        method.fused = fused
        method.attach(small)
        try:
            trajectory(small, method, steps=4)
            states[fused] = [t.clone() for t in (*method.bank.slots, method.bank.gram, method.inputs, method.ratios,
                                                 *method.schedule.bank.slots)]
        finally:
            method.detach()
    for a, b in zip(states[True], states[False], strict=True):
        assert torch.equal(a, b)


def test_compiled_factor_update_equals_the_eager_rule():
    """store_all (every site and slot at once, the step's scalars as tensors) leaves the valid
    slots as the eager per-site rule does and zeros in the others, through the first full steps
    and uneven spacings."""
    bank_e, bank_c = fused_mod.FactorBank(3, 2, gram=True), fused_mod.FactorBank(3, 2, gram=True)
    gen = torch.Generator().manual_seed(0)
    for index in (0, 1, 5, 9, 10):
        values = torch.randn(2, 2, 4, 6, generator=gen)
        for bank in (bank_e, bank_c):
            bank.allocate(values[0].shape, torch.float32, torch.device("cpu"))
            bank.begin(index, torch.device("cpu"))
        step = bank_c.current
        for s in range(2):
            bank_e.update(s, values[s], index)
        fused_mod.store_all(bank_c.slots, bank_c.gram, values, step.spacing_t, step.keep)
        for a, b in zip(bank_c.slots, bank_e.slots, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        assert not any(slot.any() for slot in bank_c.slots[bank_c.valid:])
        torch.testing.assert_close(bank_c.gram, bank_e.gram, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("make", [lambda: TaylorSeer(interval=4, order=2), lambda: RFC(tau=0.3, warmup=2)],
                         ids=["taylorseer", "rfc"])
def test_graphed_cached_steps_replay_what_direct_calls_compute(small, monkeypatch, make):
    """With CUDA-graph bookkeeping (emulated), cached steps equal direct calls bit for bit, and the
    graph is captured once for all batches of one shape (the bank keeps its memory across
    ``reset``), again for a new batch size."""
    direct = make()
    direct.attach(small)
    try:
        expected = []
        for s in (0, 1):
            direct.reset()
            expected.append(trajectory(small, direct, seed=s, steps=12))
    finally:
        direct.detach()
    monkeypatch.setattr("rfc.method.graph_mode", lambda device, compiled: "emulate")
    monkeypatch.setattr(fused_mod, "graph_mode", lambda device, compiled: "emulate")
    method = make()
    method.attach(small)
    try:
        got = []
        for s in (0, 1):
            method.reset()  # what the runner does before each batch
            got.append(trajectory(small, method, seed=s, steps=12))
        assert method.cached_fn.captures == 1
        method.reset()
        trajectory(small, method, n=3, steps=12)
        assert method.cached_fn.captures == 2
    finally:
        method.detach()
    for a, b in zip(got, expected, strict=True):
        assert torch.equal(a, b)
