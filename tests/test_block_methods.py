"""Block-level caching (rfc.cache.blocks) and the methods on it, First-Block Cache and TeaCache:
full compute at threshold 0, NFC falling as the threshold rises, the official decision rules, the
accounting, and a method added from this file alone and run end to end."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from test_cache import TINY, sample_with

from baselines.fbcache import FBCache, FirstBlockResidualChange
from baselines.teacache import AccumulatedInputChange, TeaCache
from rfc.cache import NoCache
from rfc.cache.blocks import BlockCacheMethod, BlockSchedule, ResidualReuse, Signal
from rfc.cache.registry import register_method
from rfc.models.load import build_dit
from rfc.run.build import plan_run
from rfc.run.runner import run
from rfc.samplers.sampling import DDIMSampler, DDPMSampler, StepInfo

ROOT = Path(__file__).resolve().parents[1]
TOKENS, HIDDEN, DEPTH = 16, 128, 6  # TINY: 8 px, patch 2 -> 16 tokens


@pytest.fixture(scope="module")
def tiny():
    return build_dit(TINY, ROOT / "checkpoints" / "dit-tiny-digits.pt")


def steps(n: int) -> list[StepInfo]:
    return [StepInfo(index=i, timestep=999 - i, num_steps=n) for i in range(n)]


# ---- equivalence and monotonicity on the tiny model --------------------------------------------

@pytest.mark.parametrize("sampler", [DDIMSampler(num_steps=20), DDPMSampler(num_steps=10)], ids=["ddim", "ddpm"])
def test_threshold_zero_is_full_compute_bit_for_bit(tiny, sampler):
    reference = sample_with(tiny, NoCache(), sampler, n=6)
    for method in (FBCache(threshold=0.0), TeaCache(threshold=0.0), TeaCache(threshold=0.0, coefficients=[3.0, 0.5])):
        assert torch.equal(sample_with(tiny, method, sampler, n=6), reference), method.params()
        s = method.stats()
        assert s.full_steps == sampler.num_steps and s.cached_steps == 0 and s.cached_sites == 0
        assert s.full_blocks == DEPTH * sampler.num_steps


@pytest.mark.parametrize("method_cls", [FBCache, TeaCache])
def test_nfc_falls_as_the_threshold_rises(tiny, method_cls):
    sampler = DDIMSampler(num_steps=50)
    nfc = []
    for threshold in (0.0, 0.01, 0.03, 0.06, 0.1, 0.2):
        method = method_cls(threshold=threshold)
        sample_with(tiny, method, sampler, n=4)
        nfc.append(method.stats().full_steps)
    assert nfc[0] == 50 and all(a >= b for a, b in zip(nfc, nfc[1:], strict=False)), nfc
    assert nfc[-1] < nfc[0] and nfc[-1] >= 2, nfc


def _second_step_at_the_same_input_is_cached_and_full(model, x, t, y) -> None:
    """Two steps at the same x and t under each block-level method: the first is full and equals
    the model's output, the second is cached and gives it back up to rounding."""
    with torch.no_grad():
        full = model(x, t, y)
        for method in (FBCache(threshold=0.01), TeaCache(threshold=0.01)):
            method.attach(model)
            try:
                outs = []
                for step in steps(3)[:2]:
                    method.begin_step(step)
                    outs.append(model(x, t, y))
                    method.end_step(step)
            finally:
                method.detach()
            assert method.stats().full_indices == [0] and method.stats().cached_steps == 1
            assert torch.equal(outs[0], full)
            torch.testing.assert_close(outs[1], full, rtol=1e-5, atol=1e-5)


def test_cached_step_at_unchanged_inputs_reproduces_the_full_output(tiny):
    """Two steps at the same x and t: the second is cached (no change in block 0's residual or
    input) and adds the stored residual, which gives the full output back up to rounding."""
    x, t, y = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.full((3,), 500), \
        torch.tensor([1, 2, 10])
    _second_step_at_the_same_input_is_cached_and_full(tiny, x, t, y)


# ---- the official decision rules ---------------------------------------------------------------

def test_first_block_cache_compares_with_the_residual_of_the_last_full_step():
    """ParaAttention / diffusers keep block 0's residual of the last step that computed the other
    blocks: a slow drift is caught once it adds up, which comparing with every step's residual
    would miss."""
    schedule = FirstBlockResidualChange(threshold=0.08)
    base = torch.linspace(0.5, 1.5, 64).reshape(2, 4, 8)
    residuals = [base * (1 + 0.05 * k) for k in range(4)]  # + 0.05 base at every step
    decisions = [schedule.decide(s, r) for s, r in zip(steps(4), residuals, strict=True)]
    # step 1: 0.05 from step 0 -> cached; step 2: 0.10 from step 0 (only 0.048 from step 1) -> full;
    # step 3: 0.05 / 1.10 from step 2 -> cached
    assert decisions == [True, False, True, False]
    assert schedule.last_change == pytest.approx(0.05 / 1.10, rel=1e-5)
    assert torch.equal(schedule.reference, residuals[2])


def test_first_block_cache_warmup_and_zero_threshold():
    same = torch.ones(2, 3, 4)
    warm = FirstBlockResidualChange(threshold=0.5, warmup=3)
    assert [warm.decide(s, same) for s in steps(5)] == [True, True, True, False, False]
    zero = FirstBlockResidualChange(threshold=0.0)
    assert all(zero.decide(s, same) for s in steps(5))  # ParaAttention: threshold <= 0 never reuses


def test_teacache_accumulates_the_rescaled_change_and_forces_first_and_last_steps():
    """rel_l1 of consecutive inputs (prev_inp replaced at every step) is rescaled by np.poly1d,
    accumulated, and the step computes once the sum reaches the threshold (the sum restarts)."""
    base = torch.linspace(0.5, 1.5, 64).reshape(2, 4, 8)
    inputs = [base * 1.03**k for k in range(10)]  # 3 % change at every step
    schedule = AccumulatedInputChange(threshold=0.1, coefficients=[1.0, 0.0])
    decisions = [schedule.decide(s, x) for s, x in zip(steps(10), inputs, strict=True)]
    # 0 forced; 0.03, 0.06, 0.09 cached; 0.12 -> full at 4, restart; 0.03.. cached; 8: 0.12 full; 9 last
    assert decisions == [True, False, False, False, True, False, False, False, True, True]
    assert torch.equal(schedule.previous, inputs[-1])
    doubled = AccumulatedInputChange(threshold=0.1, coefficients=[2.0, 0.0])  # 0.06 per step
    assert [doubled.decide(s, x) for s, x in zip(steps(10), inputs, strict=True)] == \
        [True, False, True, False, True, False, True, False, True, True]
    still = AccumulatedInputChange(threshold=0.1, coefficients=[1.0, 0.0])
    assert [still.decide(s, inputs[0]) for s in steps(4)] == [True, False, False, True]  # last step forced


# ---- accounting --------------------------------------------------------------------------------

def test_accounting_counts_what_ran(tiny):
    sampler = DDIMSampler(num_steps=50)
    n, rows = 2, 4  # guidance doubles the rows
    tensor = rows * TOKENS * HIDDEN * 4
    fb = FBCache(threshold=0.08)
    sample_with(tiny, fb, sampler, n=n)
    s = fb.stats()
    assert 0 < s.cached_steps and s.full_steps + s.cached_steps == 50
    assert s.full_blocks == 50 + (DEPTH - 1) * s.full_steps  # block 0 at every step
    assert s.block_calls == s.full_blocks and s.full_sites == 2 * s.full_blocks
    assert s.cached_sites == 2 * (DEPTH - 1) * s.cached_steps
    assert s.norm_tokens == 2 * TOKENS * s.full_blocks
    assert s.cache_bytes_peak == 2 * tensor  # residual of blocks 1.. and block 0's reference residual
    tea = TeaCache(threshold=0.045)
    sample_with(tiny, tea, sampler, n=n)
    s = tea.stats()
    assert 0 < s.cached_steps and s.full_steps + s.cached_steps == 50
    assert s.full_blocks == DEPTH * s.full_steps and s.cached_sites == 2 * DEPTH * s.cached_steps
    assert s.block_calls == s.full_blocks + 50  # block 0's extra modulation, at every step
    assert s.norm_tokens == 2 * TOKENS * s.full_blocks + TOKENS * 50  # and its extra layer norm
    assert s.cache_bytes_peak == 2 * tensor  # residual of all blocks and the previous modulated input
    assert 0 in s.full_indices and 49 in s.full_indices


def test_params_and_validation(make_cfg, tmp_path):
    assert FBCache().params() == {"threshold": 0.08, "warmup": 0}
    assert TeaCache().params() == {"threshold": 0.045, "coefficients": [1.0, 0.0]}
    plan = plan_run(make_cfg("method=teacache", "method.coefficients=[2.5,-1,0.1]"), tmp_path / "a")
    assert plan.method.params()["coefficients"] == [2.5, -1.0, 0.1]
    for method, override, key in (("fbcache", "method.threshold=-0.1", "method.threshold"),
                                  ("fbcache", "method.warmup=-1", "method.warmup"),
                                  ("teacache", "method.threshold=-1", "method.threshold"),
                                  ("teacache", "method.coefficients=[]", "method.coefficients")):
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            plan_run(make_cfg(f"method={method}", override), tmp_path / "b")
    with pytest.raises(Exception, match="threshold"):
        make_cfg("method=fbcache", "method.threshold=abc")  # typed config: refused when composed


def test_a_residual_schedule_needs_block_0_computed_and_a_schedule_must_compute_first(tiny):
    with pytest.raises(ValueError, match="block 1"):
        BlockCacheMethod(FirstBlockResidualChange(0.1), ResidualReuse(start=0))
    with pytest.raises(ValueError, match="start"):
        ResidualReuse(start=-1)
    with pytest.raises(ValueError, match="signal"):
        BlockCacheMethod(type("Odd", (BlockSchedule,), {"signal": "output"})(), ResidualReuse())
    never = BlockCacheMethod(type("Never", (BlockSchedule,), {"decide": lambda self, step, signal: False})(),
                             ResidualReuse())
    with pytest.raises(RuntimeError, match="before any full step"):
        sample_with(tiny, never, DDIMSampler(num_steps=3), n=1)


# ---- a method added from this file alone -------------------------------------------------------

class EveryOther(BlockSchedule):
    """Compute every ``period``-th step (from the first), reuse the residual in between."""

    signal = Signal.STEP

    def __init__(self, period: int) -> None:
        self.period = period

    def decide(self, step: StepInfo, signal: torch.Tensor | None) -> bool:
        assert signal is None
        return step.index % self.period == 0

    def params(self) -> dict[str, object]:
        return {"period": self.period}


def make_every_other(period: int = 2) -> BlockCacheMethod:
    """The method's factory: Hydra's ``_target_`` for ``method=every_other``."""
    return BlockCacheMethod(EveryOther(period), ResidualReuse(start=0), name="every_other")


@dataclass
class EveryOtherConfig:
    _target_: str = "test_block_methods.make_every_other"
    period: int = 2


def test_a_method_defined_in_a_test_runs_end_to_end(make_cfg, tmp_path):
    register_method("every_other", EveryOtherConfig)
    rec = run(make_cfg("method=every_other", "eval=smoke", "eval.num_samples=2", "eval.batch_size=2"),
              tmp_path / "out", progress=False)
    assert rec.method == "every_other" and rec.method_params == '{"period": 2}'
    assert rec.nfc == 25  # DDIM-50: steps 0, 2, ..., 48
    assert rec.full_blocks == 25 * DEPTH and rec.cached_sites == 25 * 2 * DEPTH
    assert (tmp_path / "out" / "record.json").is_file()
    rec3 = run(make_cfg("method=every_other", "method.period=3", "eval=smoke", "eval.num_samples=2",
                        "eval.batch_size=2", "eval.paired=off"), tmp_path / "out3", progress=False)
    assert rec3.nfc == 17  # steps 0, 3, ..., 48
    with pytest.raises(ValueError, match=r"method\.perido is not a setting of test_block_methods\.make_every_other"):
        plan_run(make_cfg("method=every_other", "+method.perido=3"), tmp_path / "bad")


# ---- FLUX: double-stream blocks, then single-stream blocks ------------------------------------


@pytest.fixture(scope="module")
def flux():
    from test_flux import tiny_flux

    model = tiny_flux()
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    return model, x, torch.tensor([0, 1])


FLUX_IMG, FLUX_TXT, FLUX_SITES = 16, 8, 2 * 2 + 3  # flux-tiny: 2 double-stream (attn, mlp), 3 single (total)


def flux_sample(flux, method, steps: int = 8) -> torch.Tensor:
    from rfc.samplers.flow import FlowMatchEulerSampler
    from rfc.samplers.sampling import CFGDenoiser

    model, x, y = flux
    method.attach(model)
    try:
        with torch.no_grad():
            return FlowMatchEulerSampler(num_steps=steps).sample(
                CFGDenoiser(model, 1.0, 0, 16), x.clone(), y, listener=method
            )
    finally:
        method.detach()


def test_flux_threshold_zero_is_full_compute_bit_for_bit(flux):
    """The blocks run through their own ``run`` with the plain branch: the model's forward, bit for bit."""
    none = NoCache()
    reference = flux_sample(flux, none)
    for method in (FBCache(threshold=0.0), TeaCache(threshold=0.0), TeaCache(threshold=0.0, coefficients=[3.0, 0.5])):
        assert torch.equal(flux_sample(flux, method), reference), method.params()
        s, r = method.stats(), none.stats()
        assert s.full_steps == 8 and s.cached_steps == 0 and s.cached_sites == 0
        assert (s.full_attn, s.full_mlp, s.full_total) == (r.full_attn, r.full_mlp, r.full_total) == (16, 16, 24)


def test_teacache_threshold_zero_computes_even_where_the_polynomial_is_negative():
    schedule = AccumulatedInputChange(threshold=0.0, coefficients=[-1.0, -0.5])
    same = torch.ones(2, 3, 4)
    assert all(schedule.decide(s, same) for s in steps(5))


def signal_shapes(method: BlockCacheMethod) -> list[tuple[int, ...]]:
    """The shape of every signal the method's schedule decides on (recorded as it decides)."""
    shapes: list[tuple[int, ...]] = []
    decide = method.schedule.decide

    def recording(step: StepInfo, signal: torch.Tensor | None) -> bool:
        shapes.append(tuple(signal.shape))
        return decide(step, signal)

    method.schedule.decide = recording
    return shapes


def test_flux_signals_cover_the_image_tokens_and_sites_are_counted_per_block_kind(flux):
    """Block 0's residual (First-Block Cache) and modulated input (TeaCache) are measured on the
    16 image tokens, as the official FLUX code measures the image stream; a skipped single-stream
    block is one cached site, a double-stream block two."""
    fb = FBCache(threshold=1e6)  # every step after the first reuses the residual
    shapes = signal_shapes(fb)
    flux_sample(flux, fb)
    s = fb.stats()
    assert s.full_indices == [0] and s.cached_steps == 7
    assert shapes == [(2, FLUX_IMG, 32)] * 8  # rows (CFG off), image tokens, hidden
    assert s.cached_sites == 7 * (FLUX_SITES - 2)  # all but block 0 (a double-stream block)
    assert (s.full_attn, s.full_mlp, s.full_total) == (8 + 1, 8 + 1, 3)  # block 0 at every step
    assert s.full_blocks == s.block_calls == 8 + 4 and s.full_sites == 8 * 2 + 5
    tea = TeaCache(threshold=1e6)  # first and last steps computed
    shapes = signal_shapes(tea)
    flux_sample(flux, tea)
    s = tea.stats()
    assert s.full_indices == [0, 7] and s.cached_sites == 6 * FLUX_SITES
    assert shapes == [(2, FLUX_IMG, 32)] * 8
    assert s.full_total == 2 * 3 and s.block_calls == 2 * 5 + 8  # block 0's extra modulation at every step
    tokens = FLUX_TXT + FLUX_IMG
    assert s.norm_tokens == 2 * FLUX_SITES * tokens + 8 * FLUX_IMG  # its extra norm: the image tokens only


def test_flux_cached_step_at_unchanged_inputs_reproduces_the_full_output(flux):
    """The reused residual covers text and image tokens: the text tokens that blocks after block 0
    read are those of the full step, so a cached step at the same x and t gives the full output."""
    model, x, y = flux
    t = torch.full((2,), 0.5)
    _second_step_at_the_same_input_is_cached_and_full(model, x, t, y)
