"""FLUX.1 through diffusers, on a tiny random configuration (offline, CPU).

The backbone: one step of the harness (model view + sampler) equals diffusers' FluxPipeline step
on the same weights, prompt embeddings and noise; every method at its degenerate setting equals
full compute bit for bit; the official FLUX schedules give the papers' NFC.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from baselines.fora import FORA
from baselines.taylorseer import TaylorSeer
from baselines.toca import ToCa
from rfc.cache import NoCache
from rfc.method import RFC
from rfc.models.flux import FluxConfig, FluxModel, image_ids, pack, random_prompt_table, random_transformer, unpack
from rfc.run.build import plan_run
from rfc.run.runner import run
from rfc.samplers.flow import FlowMatchEulerSampler
from rfc.samplers.sampling import CFGDenoiser

ROOT = Path(__file__).resolve().parents[1]
TINY = FluxConfig(image_size=64, hidden_size=32, num_heads=2, depth_double=2, depth_single=3, text_tokens=8,
                  text_dim=32, pooled_dim=16)


def tiny_flux(prompts: tuple[str, ...] = ("a red car", "a cat on a mat")) -> FluxModel:
    """flux-tiny (configs/model/flux-tiny.yaml) with random weights (seed 0) and random embeddings
    of ``prompts``: the FLUX model the tests of several files share."""
    table = random_prompt_table(list(prompts), TINY.text_tokens, TINY.text_dim, TINY.pooled_dim)
    return FluxModel(random_transformer(TINY, [4, 6, 6], seed=0), table, TINY, guidance=3.5)


@pytest.fixture(scope="module")
def tiny():
    model = tiny_flux()
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    return model, x, torch.tensor([0, 1])


def sample(model, x, y, method, steps=50):
    sampler = FlowMatchEulerSampler(num_steps=steps)
    method.attach(model)
    try:
        with torch.no_grad():
            out = sampler.sample(CFGDenoiser(model, 1.0, 0, 16), x.clone(), y, listener=method)
    finally:
        method.detach()
    return out, method.stats()


def test_model_view_equals_the_transformers_own_forward(tiny):
    """embed / blocks (double-stream sites attn + mlp, single-stream total) / head reproduce
    FluxTransformer2DModel.forward bit for bit (same elementwise arithmetic, per-token modulation)."""
    model, x, y = tiny
    t = torch.tensor([0.7, 0.7])
    with torch.no_grad():
        ours = model(x, t, y)
        theirs = model.transformer(hidden_states=pack(x), encoder_hidden_states=model.prompt_table.embeds[y],
                                   pooled_projections=model.prompt_table.pooled[y], timestep=t,
                                   img_ids=image_ids(8, 8, x.device, torch.float32), txt_ids=torch.zeros(8, 3),
                                   guidance=torch.full((2,), 3.5), return_dict=False)[0]
        native = model.native_forward(x, t, y)  # the call peer methods' hooks wrap
    assert torch.equal(ours, unpack(theirs, 8, 8)) and torch.equal(native, ours)


@pytest.mark.parametrize("steps", [1, 50])
def test_harness_steps_equal_flux_pipeline(tiny, steps):
    """One step (and all 50) of the harness's loop equal FluxPipeline's on the same tiny weights,
    prompt embeddings and initial latents, within 1e-5 of max |latent| (0 on this build machine:
    the schedule is the scheduler's own and the update the same fp32 arithmetic)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from rfc.models.flux import random_flux_vae

    model, x, y = tiny
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=random_flux_vae(0).vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=model.transformer)
    pipe.set_progress_bar_config(disable=True)
    theirs = pipe(prompt_embeds=model.prompt_table.embeds[y], pooled_prompt_embeds=model.prompt_table.pooled[y],
                  height=64, width=64, num_inference_steps=steps, guidance_scale=3.5, latents=pack(x),
                  output_type="latent", return_dict=False)[0]
    ours, stats = sample(model, x, y, NoCache(), steps)
    assert stats.full_steps == steps
    assert (pack(ours) - theirs).abs().max() <= 1e-5 * theirs.abs().max()


DEGENERATE = [("fora N=1", lambda: FORA(interval=1)), ("taylorseer N=1", lambda: TaylorSeer(interval=1, order=2,
                                                                                             warmup=3)),
              ("toca N=1 R=0", lambda: ToCa(interval=1, fresh_ratio=0.0)), ("rfc tau=0", lambda: RFC(tau=0.0)),
              ("rfc per-site", lambda: RFC(tau=0.0, fused=False))]


@pytest.mark.parametrize("name,make", DEGENERATE, ids=[d[0] for d in DEGENERATE])
def test_degenerate_settings_equal_full_compute_bit_for_bit(tiny, name, make):
    model, x, y = tiny
    ref, _ = sample(model, x, y, NoCache())
    out, stats = sample(model, x, y, make())
    assert stats.full_steps == 50
    assert torch.equal(out, ref), name


def test_full_compute_counts_every_site(tiny):
    """Full compute on flux-tiny: 2 double-stream blocks x (attn, mlp) + 3 single-stream totals per step."""
    model, x, y = tiny
    _, stats = sample(model, x, y, NoCache())
    assert (stats.full_attn, stats.full_mlp, stats.full_total, stats.full_sites) == (100, 100, 150, 350)


@pytest.mark.parametrize("interval,nfc", [(4, 14), (9, 8)])
def test_taylorseer_official_flux_schedule(tiny, interval, nfc):
    """Warm-up of 3 full steps, then one every N: N = 4 / 9 give NFC 14 / 8 on 50 steps."""
    model, x, y = tiny
    out, stats = sample(model, x, y, TaylorSeer(interval=interval, order=2, warmup=3))
    assert stats.full_steps == nfc
    assert stats.full_indices[:4] == [0, 1, 2, 2 + interval]
    assert torch.isfinite(out).all()


def test_taylorseer_derivatives_start_at_the_last_warmup_step(tiny):
    """The official FLUX code computes derivatives only from step first_enhance - 1 = 2 on: after
    the full steps 0 and 1 a site holds its output alone, after step 2 a first difference."""
    model, x, y = tiny
    method = TaylorSeer(interval=4, order=2, warmup=3)
    valid = []

    class Watch:
        def begin_step(self, step):
            method.begin_step(step)

        def end_step(self, step):
            method.end_step(step)
            if step.index < 7:
                valid.append(method.bank.valid)

    method.attach(model)
    try:
        with torch.no_grad():
            FlowMatchEulerSampler(num_steps=50).sample(CFGDenoiser(model, 1.0, 0, 16), x.clone(), y, listener=Watch())
    finally:
        method.detach()
    assert valid == [1, 1, 2, 2, 2, 2, 3]  # full at 0, 1, 2, then 6


@pytest.mark.parametrize("make,expected", [(lambda: FORA(interval=3), list(range(0, 50, 3))),
                                           (lambda: ToCa(interval=5, fresh_ratio=0.0), list(range(0, 50, 5)))])
def test_fora_and_toca_count_steps_up_on_flux(tiny, make, expected):
    """The official FLUX code: full at step 0 and every N steps after it (DiT's code counts down)."""
    model, x, y = tiny
    _, stats = sample(model, x, y, make())
    assert stats.full_indices == expected


def test_rfc_runs_on_flux_and_its_schedule_reacts_to_tau(tiny):
    model, x, y = tiny
    ref, _ = sample(model, x, y, NoCache())
    nfcs = []
    for tau in (0.05, 0.3, 1.0):
        out, stats = sample(model, x, y, RFC(tau=tau))
        nfcs.append(stats.full_steps)
        assert torch.isfinite(out).all()
        assert (out - ref).abs().mean() < 0.1 * ref.abs().mean()
    assert nfcs == sorted(nfcs, reverse=True) and nfcs[0] > nfcs[-1]


def test_toca_with_its_default_settings_runs_on_flux_tiny(make_cfg, tmp_path):
    """python run.py model=flux-tiny method=toca: token-wise recompute as the official FLUX code
    (N = 3, R = 0.07: full at steps 0, 1, 2 and every 3rd after, NFC 18; single-stream blocks
    recompute some tokens at every partial step), a row with fewer FLOPs than full compute."""
    from rfc.models.flops import flux_full_step_flops

    cfg = make_cfg("model=flux-tiny", "method=toca", "eval.num_samples=2", "eval.batch_size=2", "eval.score=false")
    plan_run(cfg, tmp_path / "plan")  # planned without a refusal
    rec = run(cfg, tmp_path / "toca", progress=False)
    assert rec.method == "toca" and rec.nfc == 18 and '"fresh_ratio": 0.07' in rec.method_params
    assert rec.partial_sites > 0 and rec.partial_blocks > 0
    full = 50 * flux_full_step_flops(1, 16, 8, 32, 2, 2, 3) / 1e12  # flux-tiny: 16 image, 8 text tokens
    assert rec.nfc / 50 * full < rec.tflops < full
    images = np.load(tmp_path / "toca" / "samples.npz")["arr_0"]
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8


def test_flux_tiny_runs_write_rows_and_grids(make_cfg, tmp_path):
    """python run.py model=flux-tiny method=X for each method: a row (FLUX FLOPs, the prompt set,
    paired PSNR/SSIM against the full-compute set of the same noise) and a grid."""
    rows = {}
    for method in ("none", "fora", "taylorseer", "toca", "rfc"):
        cfg = make_cfg("model=flux-tiny", f"method={method}", "eval.num_samples=4", "eval.batch_size=2",
                       "eval.missing_metrics=skip")
        out = tmp_path / method
        rec = run(cfg, out, progress=False)
        rows[method] = rec
        assert (out / "grid.png").exists() and (out / "samples.npz").exists()
        images = np.load(out / "samples.npz")["arr_0"]
        assert images.shape == (4, 64, 64, 3) and images.dtype == np.uint8
        assert rec.prompts.startswith("drawbench:") and rec.model == "flux-tiny"
        assert rec.tflops > 0
        if method == "none":  # the reference of the paired metrics: not scored against itself
            assert rec.psnr is None and rec.ssim is None and "their reference" in rec.notes
        else:
            assert rec.psnr is not None and rec.ssim is not None
    assert rows["none"].nfc == 50 and rows["fora"].nfc == 17
    assert rows["taylorseer"].nfc == 14 and '"warmup": 3' in rows["taylorseer"].method_params  # FLUX's official warm-up
    assert rows["toca"].nfc == 18 and rows["toca"].partial_sites > 0  # flux-ToCa: steps 0-2, then every 3rd
    assert rows["fora"].tflops < rows["none"].tflops
    assert 0 < rows["fora"].ssim <= 1
    with (tmp_path / "runs.csv").open() as f:
        assert [r["method"] for r in csv.DictReader(f)] == ["none", "fora", "taylorseer", "toca", "rfc"]


def test_flux_dev_without_weights_exits_fast_naming_the_fetch_command(tmp_path):
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf"), "HF_HUB_OFFLINE": "1"}
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, str(ROOT / "run.py"), "model=flux-dev", f"paths.outputs={tmp_path}/o",
                           f"paths.runs_csv={tmp_path}/runs.csv"], capture_output=True, text=True, timeout=120,
                          cwd=tmp_path, env=env)
    assert proc.returncode != 0
    assert "scripts/fetch_assets.py flux-dev" in proc.stderr, proc.stderr[-2000:]
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path / "runs.csv").exists()
