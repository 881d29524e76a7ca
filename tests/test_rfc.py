"""RFC: degenerate equivalences, Proposition 1, RCS behaviour, calibration, memory, configs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from test_cache import TINY, sample_with

from baselines.taylorseer import TaylorSeer
from rfc.cache import NoCache
from rfc.cache.predictors import TaylorFactors
from rfc.method import RFC, RelationalState, relational_prediction
from rfc.models.load import build_dit
from rfc.run.build import plan_run
from rfc.run.runner import run
from rfc.samplers.sampling import DDIMSampler, DDPMSampler
from rfc.tools.calibration import bisect_tau, calibrate

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny():
    return build_dit(TINY, ROOT / "checkpoints" / "dit-tiny-digits.pt")


@pytest.mark.parametrize("sampler", [DDIMSampler(num_steps=20), DDPMSampler(num_steps=10)], ids=["ddim", "ddpm"])
def test_tau_zero_is_full_compute_bit_for_bit(tiny, sampler):
    reference = sample_with(tiny, NoCache(), sampler, n=6)
    for kwargs in ({}, {"rcs_modules": "all"}, {"norm_reduction": "batch"}, {"magnitude": "linear"}):
        method = RFC(tau=0.0, **kwargs)
        assert torch.equal(sample_with(tiny, method, sampler, n=6), reference), kwargs
        assert method.stats().full_steps == sampler.num_steps


@pytest.mark.parametrize("interval, order", [(3, 1), (4, 2), (5, 4)])
def test_rcs_off_rfe_off_is_taylorseer_bit_for_bit(tiny, interval, order):
    sampler = DDIMSampler(num_steps=50)
    rfc = RFC(rcs=False, rfe=False, interval=interval, order=order)
    ts = TaylorSeer(interval=interval, order=order)
    assert torch.equal(sample_with(tiny, rfc, sampler, n=4), sample_with(tiny, ts, sampler, n=4))
    assert rfc.stats().full_indices == ts.stats().full_indices


def test_proposition_1_linear_module_moving_along_one_direction():
    """O = A I + b with I(t) = I0 + f(t) v (fixed direction v, non-linear f): RFE predicts the cached
    outputs exactly (fp32, 1e-5 relative) while the order-2 Taylor prediction does not."""
    gen = torch.Generator().manual_seed(0)
    A, b = torch.randn(24, 24, generator=gen) / 5, torch.randn(24, generator=gen)
    I0, v = torch.randn(2, 10, 24, generator=gen), torch.randn(2, 10, 24, generator=gen)

    def f(t: int) -> float:
        return 0.05 * t**2 + 0.3 * t  # increasing, curved: Taylor over full steps is off

    def inp(t):
        return I0 + f(t) * v

    def out(t):
        return inp(t) @ A.T + b

    state = RelationalState(TaylorFactors(2))
    for t in (0, 1, 5, 9):  # full steps (uneven spacing, as after a warm-up)
        state.update(out(t), inp(t), t, "sample", torch.float32)
    for t in (10, 11, 12):
        truth = out(t)
        rfe = relational_prediction(state, t, "relational", "sample", inp(t))
        taylor = state.out.predict(t)
        torch.testing.assert_close(rfe, truth, rtol=1e-5, atol=1e-5)
        assert (taylor - truth).abs().max() > 1e-2


def test_relational_prediction_falls_back_to_reuse_before_two_full_steps():
    state = RelationalState(TaylorFactors(2))
    state.update(torch.ones(1, 2, 3), torch.zeros(1, 2, 3), 0, "sample", torch.float32)
    assert torch.equal(relational_prediction(state, 1, "relational", "sample", torch.ones(1, 2, 3)),
                       torch.ones(1, 2, 3))


def test_rcs_nfc_never_increases_with_tau(tiny):
    sampler = DDIMSampler(num_steps=50)
    nfcs = []
    for tau in (0.0, 0.003, 0.01, 0.02, 0.03, 0.05, 0.1, 0.2, 0.4, 0.8):
        method = RFC(tau=tau)
        sample_with(tiny, method, sampler, n=8)
        nfcs.append(method.stats().full_steps)
    assert nfcs[0] == 50 and nfcs[-1] < 10
    assert all(a >= b for a, b in zip(nfcs, nfcs[1:], strict=False)), nfcs


def test_rcs_decides_from_block_0_before_other_blocks(tiny):
    """At a cached step only block 0's attention input is normalised (the decision) besides what
    RFE needs; with rfe off a cached step reads no other input."""
    method = RFC(tau=0.05, rfe=False)
    sample_with(tiny, method, DDIMSampler(num_steps=50), n=2)
    s = method.stats()
    tokens = 16
    assert s.norm_tokens == (s.full_steps * 12 + s.cached_steps * 1) * tokens


def test_calibration_reaches_nfc_14(make_cfg, tmp_path):
    cfg = make_cfg("method=rfc", f"paths.results={tmp_path}")
    result = calibrate(cfg, 14, num_samples=32, batch_size=32, seed=1000, out_dir=tmp_path / "cal")
    assert result.within_tolerance and abs(result.nfc - 14) <= 0.5, result.trials
    assert len(result.trials) <= 15


def test_bisection_on_a_synthetic_staircase():
    def nfc_of(tau: float) -> float:
        return max(5.0, 50.0 - 10 * (tau * 100) ** 0.5)  # decreasing in tau

    res = bisect_tau(nfc_of, 14.0, 0.5, tau0=1e-4)
    assert res.within_tolerance and abs(nfc_of(res.tau) - 14) <= 0.5


def test_run_records_schedules_and_memory(make_cfg, tmp_path):
    rec = run(make_cfg("method=rfc", "method.tau=0.03", "eval.num_samples=6", "eval.batch_size=3"),
              tmp_path / "out", progress=False)
    schedules = json.loads((tmp_path / "out" / "schedules.json").read_text())
    assert [s["batch"] for s in schedules] == [0, 1] and all(s["full_steps"][:2] == [0, 1] for s in schedules)
    assert rec.nfc == sum(len(s["full_steps"]) for s in schedules) / 2
    # per site: 3 output factors (m = 2) + its input at the last full step; plus block 0's input
    # forecast (3 factors). Rows = 3 samples x 2 (guidance), 16 tokens x 128 channels, fp32.
    # Per site and row also s(t) and the 2 x 2 Gram matrix of the factors (for ||T_m(k)||).
    tensor = 3 * 2 * 16 * 128 * 4
    assert rec.cache_bytes == (12 * (3 + 1) + 3) * tensor + 12 * 6 * (1 + 2 * 2) * 4


@pytest.mark.parametrize("preset, params", [
    ("rfc", {"rfe": True, "rcs": True, "magnitude": "relational", "rcs_modules": "first", "order": 2}),
    ("rfc_rfe_only", {"rcs": False, "magnitude": "relational"}),
    ("rfc_rcs_only", {"rfe": False, "magnitude": "taylor"}),
    ("rfc_linear", {"magnitude": "linear"}),
    ("rfc_constant", {"magnitude": "constant", "constant_w": 1.2}),
    ("rfc_rcs_all", {"rcs_modules": "all"}),
])
def test_presets_and_ablations_run(make_cfg, tmp_path, preset, params):
    rec = run(make_cfg(f"method={preset}", "method.tau=0.03", "eval=smoke", "eval.num_samples=2"),
              tmp_path / "out", progress=False)
    got = json.loads(rec.method_params)
    assert rec.method == "rfc" and {k: got[k] for k in params} == params
    assert 5 <= rec.nfc < 50


@pytest.mark.parametrize("override, key", [
    ("method.tau=-1", "method.tau"), ("method.order=-2", "method.order"),
    ("method.magnitude=cubic", "method.magnitude"),
    ("method.rcs_modules=some", "method.rcs_modules"), ("method.norm_reduction=token", "method.norm_reduction"),
    ("method.interval=0", "method.interval"), ("method.storage_dtype=int4", "method.storage_dtype"),
])
def test_invalid_rfc_settings_fail_at_config_time(make_cfg, tmp_path, override, key):
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        plan_run(make_cfg("method=rfc", override), tmp_path / "out")


def test_missing_calibration_is_a_clear_error(make_cfg, tmp_path):
    cfg = make_cfg("method=rfc", "method.tau=${calibrated_tau:14}", f"paths.results={tmp_path}")
    with pytest.raises(ValueError, match="calibrate_tau.py"):
        plan_run(cfg, tmp_path / "out")


def test_diagnostics_command_writes_csvs_and_plots(tmp_path):
    import subprocess
    import sys

    out = tmp_path / "diag"
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "diagnostics.py"), "target_nfc=14",
                           "diagnostics.num_samples=4", "diagnostics.batch_size=4",
                           "diagnostics.calibration_samples=8", f"diagnostics.out_dir={out}",
                           f"paths.outputs={tmp_path}/outputs"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("module_errors", "ratio", "error_curves"):
        assert (out / f"{name}.csv").stat().st_size > 100 and (out / f"{name}.png").stat().st_size > 1000
    summary = json.loads((out / "summary.json").read_text())
    labels = list(summary["methods"])
    assert [label.split()[0] for label in labels] == ["fora", "taylorseer", "rfc"]
    assert all(abs(v["nfc"] - 14) <= 1 for v in summary["methods"].values())
    import csv

    rows = list(csv.DictReader((out / "module_errors.csv").open()))
    assert len(rows) == 3 * 12 and {r["module"] for r in rows} == {str(i) for i in range(12)}
