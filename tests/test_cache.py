"""The caching protocol and the baselines: equivalence at degenerate settings, official schedules,
accounting, predictors, validation."""

from __future__ import annotations

import csv
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from baselines.fora import FORA
from baselines.taylorseer import TaylorSeer
from baselines.toca import ToCa, spatial_bonus
from rfc.cache import CacheMethod, NoCache
from rfc.cache.predictors import TaylorFactors
from rfc.models.dit import DiT, DiTConfig, dit_config
from rfc.models.flops import attention_flops, dit_cost, mlp_flops
from rfc.models.load import build_dit
from rfc.run.build import plan_run
from rfc.samplers.sampling import CFGDenoiser, DDIMSampler, DDPMSampler, Sampler, StepInfo
from rfc.utils.seeding import SampleStreams

ROOT = Path(__file__).resolve().parents[1]
TINY = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=128, depth=6, num_heads=4, num_classes=10)


def sample_with(model: DiT, method: CacheMethod, sampler: Sampler, n: int = 4, seed: int = 0,
                guided: int = 1, ids: list[int] | None = None) -> torch.Tensor:
    """Final x of n paired samples (or of the samples ``ids``) with ``method`` attached (detached
    afterwards)."""
    cfg = model.config
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    streams = SampleStreams(seed, range(n) if ids is None else ids, device=model.pos_embed.device)
    y, x = streams.labels(cfg.num_classes), streams.randn(shape)
    den = CFGDenoiser(model, 1.5, null_class=cfg.num_classes, guided_channels=guided)
    method.attach(model)
    try:
        with torch.no_grad():
            return sampler.sample(den, x, y, noise=streams.noise_source(shape), listener=method)
    finally:
        method.detach()


def degenerate_methods() -> list[CacheMethod]:
    return [FORA(interval=1), *(TaylorSeer(interval=1, order=m) for m in range(5)),
            ToCa(interval=1, fresh_ratio=0.0)]


@pytest.fixture(scope="module")
def tiny() -> DiT:
    return build_dit(TINY, ROOT / "checkpoints" / "dit-tiny-digits.pt")


@pytest.mark.parametrize("sampler", [DDIMSampler(num_steps=20), DDPMSampler(num_steps=10)], ids=["ddim", "ddpm"])
def test_degenerate_settings_equal_full_compute_on_the_tiny_model(tiny, sampler):
    reference = sample_with(tiny, NoCache(), sampler, n=6)
    for method in degenerate_methods():
        out = sample_with(tiny, method, sampler, n=6)
        assert torch.equal(out, reference), method.params()
        assert method.stats().full_steps == sampler.num_steps and method.stats().cached_sites == 0


def test_degenerate_settings_equal_full_compute_on_random_dit_s2():
    model = build_dit(dit_config("DiT-S/2", input_size=32), init="dense", seed=0)
    sampler = DDIMSampler(num_steps=3)
    reference = sample_with(model, NoCache(), sampler, n=2, guided=3)
    for method in degenerate_methods():
        assert torch.equal(sample_with(model, method, sampler, n=2, guided=3), reference), method.params()


def test_attach_detach_leave_model_unchanged(tiny):
    before = {k: v.clone() for k, v in tiny.state_dict().items()}
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([999, 500, 3]), torch.tensor([1, 2, 10])
    with torch.no_grad():
        out_before = tiny(x, t, y)
    method = TaylorSeer(interval=3, order=2)
    method.attach(tiny)
    assert list(tiny.state_dict()) == list(before)
    with pytest.raises(RuntimeError, match="already"):
        FORA(2).attach(tiny)
    method.detach()
    assert all("forward" not in vars(b) for b in tiny.blocks)
    after = tiny.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], before[k]) for k in before)
    with torch.no_grad():
        assert torch.equal(tiny(x, t, y), out_before)


def test_cached_methods_change_samples_but_stay_close(tiny):
    sampler = DDIMSampler(num_steps=50)
    reference = sample_with(tiny, NoCache(), sampler)
    for method in (FORA(3), TaylorSeer(4, 2), ToCa(3, 0.07)):
        out = sample_with(tiny, method, sampler)
        assert not torch.equal(out, reference)
        rel = ((out - reference).norm() / reference.norm()).item()
        assert rel < 0.5, (method.name, rel)  # a loose sanity bound: still a digit, not noise
        assert method.stats().cached_sites + method.stats().partial_sites > 0


# ---- schedules -----------------------------------------------------------------------------


def full_down_indices(method: CacheMethod, num_steps: int) -> list[int]:
    """Down-counting indices of the steps the method computes in full (49 = first of 50)."""
    method.reset()
    chosen = []
    for i in range(num_steps):
        step = StepInfo(index=i, timestep=0, num_steps=num_steps)
        method.begin_step(step)
        if method.full:
            chosen.append(step.down_index)
    return chosen


@pytest.mark.parametrize("interval, nfc", [(3, 18), (4, 14), (5, 11), (6, 10), (7, 8), (9, 7)])
def test_taylorseer_full_step_counts_on_ddim50(interval, nfc):
    assert len(full_down_indices(TaylorSeer(interval=interval, order=2), 50)) == nfc


def test_taylorseer_exact_sets():
    assert full_down_indices(TaylorSeer(4, 2), 50) == [49, 48, *range(44, -1, -4)]
    assert full_down_indices(TaylorSeer(5, 2), 50) == [49, 48, *range(43, 2, -5)]
    assert full_down_indices(TaylorSeer(7, 2), 50) == [49, 48, 41, 34, 27, 20, 13, 6]
    assert full_down_indices(TaylorSeer(9, 2), 50) == [49, 48, 39, 30, 21, 12, 3]


@pytest.mark.parametrize("steps, interval, nfc", [(50, 3, 18), (50, 5, 11), (250, 3, 84), (250, 5, 51), (250, 7, 37)])
def test_fora_full_step_counts(steps, interval, nfc):
    chosen = full_down_indices(FORA(interval), steps)
    assert len(chosen) == nfc and chosen[0] == steps - 1


def test_fora_n3_equals_taylorseer_n3_set():
    assert full_down_indices(FORA(3), 50) == full_down_indices(TaylorSeer(3, 2), 50)


def toca_blocks(method: ToCa, num_steps: int, depth: int = 28) -> tuple[list[int], list[int]]:
    """Down indices where block 0 is full, and where every block is full (the official code
    decides per block; block 0's full computation may re-schedule the later blocks' interval)."""
    method.reset()
    block0, every = [], []
    for i in range(num_steps):
        step = StepInfo(index=i, timestep=0, num_steps=num_steps)
        method.begin_step(step)
        if method.block_full(0):
            block0.append(step.down_index)
        if all(method.block_full(b) for b in range(depth)):
            every.append(step.down_index)
    return block0, every


def test_toca_official_per_block_schedule_ddim50_n3():
    """The official README recipe: every block full at 18 steps, block 0 alone also at 45 and 32
    (measured on the official code: the golden fixture's case)."""
    every = [49, 44, 40, 36, 30, 27, 24, 21, 18, 16, 14, 12, 10, 8, 6, 4, 2, 0]
    block0, all_blocks = toca_blocks(ToCa(3, 0.07, "ddim50"), 50)
    assert all_blocks == every
    assert block0 == sorted([*every, 45, 32], reverse=True)
    assert full_down_indices(ToCa(3, 0.07, "ddim50"), 50) == block0  # the step count (NFC) is block 0's


def test_toca_official_per_block_schedule_ddim50_n4_gives_the_papers_nfc_17():
    """RFC's Table 1 lists ToCa N=4 with NFC 17: the steps at which block 0 is full; every block
    is full at 14 of them."""
    block0, every = toca_blocks(ToCa(4, 0.07, "ddim50"), 50)
    assert every == [49, 48, 40, 35, 28, 24, 20, 16, 14, 12, 10, 6, 3, 0]
    assert block0 == sorted([*every, 42, 30, 8], reverse=True) and len(block0) == 17


def test_toca_official_per_block_schedule_ddpm250_recipe():
    """The DDPM-250 recipe (N=4, R=0.07, ddpm250 ratios): 74 block-0 full steps, 72 with every
    block; block 0 alone at 245 and 155."""
    block0, every = toca_blocks(ToCa(4, 0.07, "ddpm250"), 250)
    assert every == [249, 240, 234, 228, 222, 216, 210, *range(205, 164, -5), 160, *range(152, 94, -4),
                     *range(94, 47, -2), *range(45, -1, -3)]
    assert block0 == sorted([*every, 245, 155], reverse=True)


def test_toca_fixed_interval_and_whole_step_options():
    assert full_down_indices(ToCa(3, 0.0), 50) == [49, *range(48, -1, -3)]  # R = 0: fixed interval
    block0, every = toca_blocks(ToCa(3, 0.07, "ddim50", schedule="step"), 50)
    assert block0 == every and len(every) == 20 and {45, 32} <= set(every)


# ---- accounting ----------------------------------------------------------------------------


def _tflops_per_image(method: CacheMethod, model: DiT, rows: int = 2) -> float:
    sample_with(model, method, DDIMSampler(num_steps=50), n=1, guided=model.config.in_channels)
    return dit_cost(256, 1152, 16).flops(method.stats(), rows) / 1e12


def test_dit_xl2_tflops_match_the_papers():
    """A narrow model with XL/2's depth and token count: the counts of what ran depend on depth,
    tokens and schedule only, and the FLOPs are evaluated at XL/2's width (1152, 16 heads)."""
    xl = dit_config("DiT-XL/2", input_size=32)
    assert (xl.depth, xl.num_tokens, xl.hidden_size, xl.num_heads) == (28, 256, 1152, 16)
    narrow = build_dit(DiTConfig(input_size=32, patch_size=2, in_channels=4, hidden_size=32, depth=28, num_heads=2))
    for interval, expected in [(4, 6.662), (5, 5.239), (7, 3.816), (9, 3.342)]:
        assert _tflops_per_image(TaylorSeer(interval, 2), narrow) == pytest.approx(expected, abs=0.001)
    assert _tflops_per_image(NoCache(), narrow) == pytest.approx(23.735, abs=0.01)
    # RFC's Table 1: ToCa N=4 (R = 0.07, DDIM-50 recipe) at NFC 17 and 8.73 TFLOPs, reached only
    # with the official per-block schedule (whole steps would give 9.95)
    toca = ToCa(4, 0.07, "ddim50")
    assert _tflops_per_image(toca, narrow) == pytest.approx(8.73, abs=0.005)
    assert toca.stats().full_steps == 17 and toca.stats().full_blocks == 14 * 28 + 3


def test_analytic_formula_matches_torch_flop_counter():
    """The matmul terms of the papers' formula equal torch's counter per attention / MLP module
    (attention under the math backend, which the counter sees); elementwise terms are analytic."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model = build_dit(TINY, init="dense")
    B, N, C, h = 3, 16, 128, 4
    counter = FlopCounterMode(display=False)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), counter:
        model(torch.randn(B, 1, 8, 8), torch.tensor([1, 2, 3]), torch.tensor([0, 1, 2]))
    counts = counter.get_flop_counts()
    d = C / h
    attn_matmuls = attention_flops(B, N, C, h) - B * h * N * d - 5 * B * h * N * N
    mlp_matmuls = mlp_flops(B, N, C) - 6 * B * N * 4 * C
    for i in range(TINY.depth):
        assert sum(counts[f"DiT.blocks.{i}.attn"].values()) == attn_matmuls
        assert sum(counts[f"DiT.blocks.{i}.mlp"].values()) == mlp_matmuls
        # adaLN linear: the formula counts 6BC^2 (a multiply-add as one), the counter 2 * B * C * 6C
        assert sum(counts[f"DiT.blocks.{i}.adaLN_modulation"].values()) == 2 * 6 * B * C * C


def test_cache_memory_is_reported(tiny):
    method = TaylorSeer(4, 2)
    sample_with(tiny, method, DDIMSampler(num_steps=10), n=2)
    # 12 sites x 3 factors (order 2) x (2 samples x 2 CFG rows) x 16 tokens x 128 channels x 4 bytes
    assert method.stats().cache_bytes_peak == 12 * 3 * 4 * 16 * 128 * 4
    half = TaylorSeer(4, 2, storage_dtype="bf16")
    sample_with(tiny, half, DDIMSampler(num_steps=10), n=2)
    assert half.stats().cache_bytes_peak == method.stats().cache_bytes_peak // 2


# ---- predictors ----------------------------------------------------------------------------


@pytest.mark.parametrize("order", [1, 2, 3, 4])
def test_taylor_predictor_is_exact_on_linear_trajectories(order):
    """F(t) = a + b t sampled at full steps 0, 1, 5, 9 (uneven spacing included): every order
    predicts the later steps exactly (fp32, 1e-5 relative); higher factors vanish."""
    a, b = torch.randn(4, 16, 8), torch.randn(4, 16, 8)
    f = TaylorFactors(order)
    for t in (0, 1, 5, 9):
        f.update(a + b * t, t)
    for t in (10, 11, 13):
        torch.testing.assert_close(f.predict(t), a + b * t, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("order", [2, 3])
def test_taylor_predictor_follows_the_official_recursion_on_polynomials(order):
    """On a degree-m polynomial sampled every d steps, the official recursion's factors are backward
    differences divided by d^i, so the prediction is sum_i nabla^i F / (d^i i!) k^i. For F = t^2,
    d = 4: factors (F, 2t - 4, 2) at the last full step t, checked in closed form (1e-5)."""
    d, last = 4, 12
    base = torch.linspace(-1, 1, 10)
    f = TaylorFactors(order)
    for t in range(0, last + 1, d):
        f.update(base * t**2, t)
    for k in (1, 2, 3):
        expected = base * (last**2 + (2 * last - d) * k + k**2)
        torch.testing.assert_close(f.predict(last + k), expected, rtol=1e-5, atol=1e-5)
    assert len(f.factors) == order + 1
    torch.testing.assert_close(f.factors[-1], torch.zeros(10) if order == 3 else 2 * base, rtol=0, atol=1e-5)


def test_order_zero_is_reuse():
    f = TaylorFactors(0)
    f.update(torch.ones(3), 0)
    f.update(torch.full((3,), 5.0), 4)
    assert len(f.factors) == 1 and torch.equal(f.predict(7), torch.full((3,), 5.0))


@pytest.mark.parametrize("divisor", [27, None])
def test_toca_token_counts_follow_the_official_formula(tiny, divisor):
    """k = int(fp32(clamp(R * l_layer * l_step * 2.5, 0, 1)) * tokens) for the MLP of every block on
    the partial path, l_layer = 0.8 + 0.4 layer / X (X = 27 as the official code hard-codes, or
    depth - 1), l_step = 3 - 4 s / T; attention is never recomputed there. Computed independently
    in numpy float32."""
    R, T, D, tokens = 0.2, 50, 6, 16
    method = ToCa(interval=3, fresh_ratio=R, layer_divisor=divisor)
    sample_with(tiny, method, DDIMSampler(num_steps=T), n=2)
    X = 27 if divisor else D - 1
    probe = ToCa(interval=3, fresh_ratio=R)
    expected, full_blocks, partial_blocks = [], 0, 0
    for i in range(T):
        probe.begin_step(StepInfo(index=i, timestep=0, num_steps=T))
        s = T - 1 - i
        for layer in range(D):
            if probe.block_full(layer):
                full_blocks += 1
                continue
            ratio = R * (1 - 0.2 + 2 * 0.2 * layer / X) * (3 - 4 * s / T) * 2.5
            k = int(np.float32(np.clip(np.float32(ratio), 0, 1)) * np.float32(tokens))
            if k > 0:
                expected.append(k)
                partial_blocks += 1
    stats = method.stats()
    assert stats.partial_mlp_tokens == expected and len(expected) > 0
    assert stats.partial_attn_tokens == []
    assert (stats.full_blocks, stats.partial_blocks) == (full_blocks, partial_blocks)
    assert stats.full_steps == len(full_down_indices(ToCa(interval=3, fresh_ratio=R), T))


def test_toca_staleness_counts_every_partial_step(tiny):
    """A token's staleness grows at every partial step of its block, also when the ratio leaves no
    token to recompute (the official counter). DDIM-50, N = 3: s = 49 is full, the interval becomes
    5, so 48..46 are partial; at 45 block 0 is full (interval 4 now) and blocks 1.. stay partial.
    l_step = 3 - 4 s / 50 < 0 there, so no token is recomputed at all."""
    method = ToCa(interval=3, fresh_ratio=0.07)
    method.attach(tiny)
    try:
        x, y = torch.randn(2, 1, 8, 8), torch.tensor([1, 2])
        for i in range(5):
            step = StepInfo(index=i, timestep=999 - 20 * i, num_steps=50)
            method.begin_step(step)
            with torch.no_grad():
                tiny(x, torch.full((2,), step.timestep), y)
            method.end_step(step)
        stale = {site.block: (int(v.min()), int(v.max())) for site, v in method.staleness.items()}
        assert stale == {0: (0, 0), **{b: (4, 4) for b in range(1, 6)}}
        assert method.stats().partial_mlp_tokens == [] and method.stats().partial_blocks == 0
    finally:
        method.detach()


def test_spatial_bonus_marks_one_token_per_2x2_block():
    """In every 2x2 block the best token gets + 0.6 x that block's own maximum."""
    score = torch.arange(16.0).view(1, 16) / 16  # 4x4 grid; the bottom-right token of each block wins
    out = spatial_bonus(score)
    boosted = (out - score).view(4, 4)
    winners = boosted.nonzero().tolist()
    assert winners == [[1, 1], [1, 3], [3, 1], [3, 3]]
    for (r, c), top in zip(winners, (5, 7, 13, 15), strict=True):
        assert boosted[r, c] == pytest.approx(0.6 * top / 16, rel=1e-6)


# ---- configuration -------------------------------------------------------------------------


@pytest.mark.parametrize("overrides, key", [
    (["method=fora", "method.interval=0"], "method.interval"),
    (["method=taylorseer", "method.interval=0"], "method.interval"),
    (["method=taylorseer", "method.order=-1"], "method.order"),
    (["method=taylorseer", "method.storage_dtype=int8"], "method.storage_dtype"),
    (["method=toca", "method.fresh_ratio=1.5"], "method.fresh_ratio"),
    (["method=toca", "method.fresh_ratio=-0.1"], "method.fresh_ratio"),
    (["method=toca", "method.ratio_schedule=cosine"], "method.ratio_schedule"),
    (["method=toca", "method.interval=0"], "method.interval"),
    (["method=toca", "method.schedule=whole"], "method.schedule"),
    (["method=toca", "method.layer_divisor=0"], "method.layer_divisor"),
])
def test_invalid_settings_fail_at_config_time(make_cfg, tmp_path, overrides, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        plan_run(make_cfg(*overrides), tmp_path / "out")


def test_presets_build_with_official_defaults(make_cfg, tmp_path):
    expected = {"none": {}, "fora": {"interval": 3},
                "taylorseer": {"interval": 4, "order": 4, "warmup": 2, "storage_dtype": "fp32"},
                "toca": {"interval": 3, "fresh_ratio": 0.07, "ratio_schedule": "ddim50", "schedule": "official",
                         "layer_divisor": 27}}
    for name, params in expected.items():
        method = plan_run(make_cfg(f"method={name}"), tmp_path / name).method
        assert method.name == name and method.params() == params


def test_multirun_of_all_methods_appends_four_rows(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "-m", "method=none,fora,taylorseer,toca", "eval=smoke",
         "eval.num_samples=4", "eval.batch_size=4", "eval.warmup_batches=0", f"paths.outputs={tmp_path}/outputs",
         f"paths.runs_csv={tmp_path}/runs.csv"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = list(csv.DictReader((tmp_path / "runs.csv").open()))
    assert [r["method"] for r in rows] == ["none", "fora", "taylorseer", "toca"]
    assert [float(r["nfc"]) for r in rows] == [50, 18, 14, 20]
    # what ran, per block (6 blocks): ToCa is full in every block at 18 steps, in block 0 alone at 2
    assert [float(r["full_blocks"]) for r in rows] == [300, 108, 84, 110]
    assert [float(r["partial_blocks"]) > 0 for r in rows] == [False, False, False, True]
    tflops = [float(r["tflops"]) for r in rows]
    assert len(set(tflops)) == 4 and tflops[0] == max(tflops)
    assert all(int(r["cache_bytes"]) > 0 for r in rows[1:]) and rows[0]["cache_bytes"] == "0"
    assert math.isclose(float(rows[1]["cached_sites"]), 32 * 12)  # FORA: 32 cached steps x 12 sites
