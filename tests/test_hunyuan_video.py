"""HunyuanVideo through diffusers, on a tiny random configuration (offline, CPU).

The model view (embed / blocks / head over diffusers' HunyuanVideoTransformer3DModel) equals the
transformer's own forward bit for bit; the harness's loop equals HunyuanVideoPipeline's on the same
weights, prompt embeddings and noise; every method at its degenerate setting equals full compute.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from baselines.fbcache import FBCache
from baselines.fora import FORA
from baselines.taylorseer import TaylorSeer
from baselines.teacache import TeaCache
from baselines.toca import ToCa
from rfc.cache import NoCache
from rfc.method import RFC
from rfc.models.hunyuan_video import HunyuanVideoConfig, HunyuanVideoModel, random_prompt_table, random_transformer
from rfc.samplers.flow import FlowMatchEulerSampler
from rfc.samplers.sampling import CFGDenoiser

ROOT = Path(__file__).resolve().parents[1]
# 9 frames of 64x64 pixels: 3 x 8 x 8 latents, 48 image tokens; 8 text tokens, 2 + 2 blocks
TINY = HunyuanVideoConfig(height=64, width=64, frames=9, hidden_size=32, num_heads=2, depth_double=2,
                          depth_single=2, refiner_depth=1, text_tokens=8, text_dim=32, pooled_dim=16,
                          rope_axes=(4, 6, 6))
SHIFT = 7.0  # hunyuanvideo-community/HunyuanVideo's scheduler
GUIDANCE = 6.0  # HunyuanVideoPipeline's default embedded guidance
PROMPTS = ("a cat on grass", "waves")  # 6 and 3 of the 8 text tokens: padding on both
STEPS = 6  # FORA N=3, TaylorSeer N=3 and RFC reach cached steps


def tiny_hunyuan() -> HunyuanVideoModel:
    table = random_prompt_table(list(PROMPTS), TINY.text_tokens, TINY.text_dim, TINY.pooled_dim)
    return HunyuanVideoModel(random_transformer(TINY, seed=0), table, TINY, guidance=GUIDANCE)


@pytest.fixture(scope="module")
def tiny():
    model = tiny_hunyuan()
    x = torch.randn(2, 16, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    return model, x, torch.tensor([0, 1])


def sampler(steps: int) -> FlowMatchEulerSampler:
    return FlowMatchEulerSampler(num_steps=steps, dynamic_shift=False, shift=SHIFT, sigma_grid="hunyuan",
                                 timestep_input="train")


def sample(model, x, y, method, steps=STEPS):
    method.attach(model)
    try:
        with torch.no_grad():
            out = sampler(steps).sample(CFGDenoiser(model, 1.0, 0, 16), x.clone(), y, listener=method)
    finally:
        method.detach()
    return out, method.stats()


def test_model_view_equals_the_transformers_own_forward(tiny):
    """embed / blocks (double-stream attn + mlp, single-stream total) / head reproduce
    HunyuanVideoTransformer3DModel.forward bit for bit, padding mask and all."""
    model, x, y = tiny
    t = torch.tensor([700.0, 700.0])
    table = model.prompt_table
    with torch.no_grad():
        ours = model(x, t, y)
        theirs = model.transformer(hidden_states=x, timestep=t, encoder_hidden_states=table.embeds[y],
                                   encoder_attention_mask=table.mask[y], pooled_projections=table.pooled[y],
                                   guidance=torch.full((2,), GUIDANCE) * 1000, return_dict=False)[0]
        native = model.native_forward(x, t, y)  # the call peer methods' hooks wrap
    assert ours.shape == x.shape and torch.equal(ours, theirs) and torch.equal(native, ours)
    assert table.mask.sum(dim=1).tolist() == [6.0, 3.0]


@pytest.fixture(scope="module")
def reference(tiny):
    """Full compute on the tiny model, STEPS steps: what every method is compared with."""
    model, x, y = tiny
    return sample(model, x, y, NoCache())[0]


@pytest.mark.parametrize("steps", [1, STEPS])
def test_harness_steps_equal_hunyuan_video_pipeline(tiny, steps):
    """The harness's loop (its sampler with the pipeline's sigma grid, shift and timestep) equals
    HunyuanVideoPipeline's on the same tiny weights, prompt embeddings and initial latents
    (output_type latent), within 1e-5 of max |latent| (0 on the build machine, for 1, 6 and 50 steps:
    the schedule is the scheduler's own, the timestep the pipeline's, the update the same fp32 step)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline

    model, x, y = tiny
    pipe = HunyuanVideoPipeline(text_encoder=None, tokenizer=None, transformer=model.transformer, vae=None,
                                scheduler=FlowMatchEulerDiscreteScheduler(shift=SHIFT), text_encoder_2=None,
                                tokenizer_2=None)
    pipe.set_progress_bar_config(disable=True)
    table = model.prompt_table
    theirs = pipe(prompt_embeds=table.embeds[y], pooled_prompt_embeds=table.pooled[y],
                  prompt_attention_mask=table.mask[y], height=64, width=64, num_frames=9, num_inference_steps=steps,
                  guidance_scale=GUIDANCE, latents=x.clone(), output_type="latent", return_dict=False)[0]
    ours, stats = sample(model, x, y, NoCache(), steps)
    assert stats.full_steps == steps
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()


DEGENERATE = [("fora N=1", lambda: FORA(interval=1)),
              ("taylorseer N=1", lambda: TaylorSeer(interval=1, order=1, warmup=1)),
              ("toca N=1 R=0", lambda: ToCa(interval=1, fresh_ratio=0.0)),
              ("rfc tau=0", lambda: RFC(tau=0.0)), ("rfc per-site", lambda: RFC(tau=0.0, fused=False)),
              ("fbcache 0", lambda: FBCache(threshold=0.0)), ("teacache 0", lambda: TeaCache(threshold=0.0))]


@pytest.mark.parametrize("name,make", DEGENERATE, ids=[d[0] for d in DEGENERATE])
def test_degenerate_settings_equal_full_compute_bit_for_bit(tiny, reference, name, make):
    model, x, y = tiny
    out, stats = sample(model, x, y, make())
    assert stats.full_steps == STEPS
    assert torch.equal(out, reference), name


@pytest.mark.parametrize("make", [lambda: FORA(interval=3), lambda: TaylorSeer(interval=3, order=1, warmup=1),
                                  lambda: RFC(tau=0.3), lambda: ToCa(interval=3, fresh_ratio=0.1)],
                         ids=["fora N=3", "taylorseer N=3", "rfc tau=0.3", "toca N=3 R=0.1"])
def test_cached_methods_run_on_video_tokens(tiny, reference, make):
    """At usual settings FORA, TaylorSeer, RFC and ToCa skip steps and stay near full compute (the tiny
    random model's outputs: a sanity bound, 20 % of the mean |latent|, not a quality claim)."""
    model, x, y = tiny
    out, stats = sample(model, x, y, make())
    assert stats.full_steps < STEPS and torch.isfinite(out).all()
    assert (out - reference).abs().mean() < 0.2 * reference.abs().mean()


def test_attention_with_an_explicit_softmax_equals_the_modules(tiny):
    """What ToCa scores tokens by: the joint and single-stream attention recomputed with the softmax
    written out (padding mask, rotary embedding on the image tokens) equal the fused modules to 1e-5,
    and no padding token receives attention."""
    model, x, y = tiny
    with torch.no_grad():
        tokens, c = model.embed(x, torch.tensor([700.0, 700.0]), y)
        double, single = model.blocks[0], model.blocks[-1]
        fused, (explicit, received) = double.attn(tokens), double.attn.with_received(tokens)
        assert (explicit - fused).abs().max() <= 1e-5 * fused.abs().max()
        total, attn, received_single = single.total.with_attention(tokens)
        assert (total - single.total(tokens)).abs().max() <= 1e-5 * total.abs().max()
    n_img = TINY.image_tokens
    assert attn.shape == tokens.shape and received.shape == tokens.shape[:2]
    assert received[0, n_img + 6:].abs().max() == 0 and received[1, n_img + 3:].abs().max() == 0
    assert torch.allclose(received.sum(dim=1), torch.ones(2)) and torch.allclose(received_single.sum(dim=1),
                                                                                  torch.ones(2))


@pytest.mark.parametrize("interval,nfc", [(5, 10), (6, 9), (8, 7)])
def test_taylorseer_official_hunyuan_video_schedule(tiny, interval, nfc):
    """TaylorSeer-HunyuanVideo: one warm-up step, then a full step every N: N = 5 / 6 / 8 give
    NFC 10 / 9 / 7 on 50 steps (the paper's Table 3 rows)."""
    model, x, y = tiny
    out, stats = sample(model, x[:1], y[:1], TaylorSeer(interval=interval, order=1, warmup=1), steps=50)
    assert stats.full_steps == nfc and stats.full_indices[:3] == [0, interval, 2 * interval]
    assert torch.isfinite(out).all()


def test_toca_recomputes_fresh_tokens_of_both_streams(tiny):
    """ToCa's partial steps (the FLUX recipe: step counting up) recompute some image and text tokens
    of the double-stream MLPs and some tokens of every single-stream block."""
    model, x, y = tiny
    _, stats = sample(model, x, y, ToCa(interval=3, fresh_ratio=0.3))
    assert stats.partial_sites > 0 and sum(stats.partial_mlp_tokens) > 0 and sum(stats.partial_total_tokens) > 0


# ---------------------------------------------------------------------------------------------------
# The family: python run.py model=hunyuan-video-tiny, videos end to end


def test_a_hunyuan_video_tiny_run_writes_videos_a_preview_and_per_frame_metrics(make_cfg, tmp_path):
    """python run.py model=hunyuan-video-tiny method=rfc eval=smoke, offline on the CPU: samples.npz
    holds (N, F, H, W, 3) uint8 videos, grid.png one strip of frames per video, preview.gif the videos
    playing; the row's PSNR and SSIM are per frame against the full-compute videos of the same
    noise and prompts (drawn into the store by the pairing)."""
    import numpy as np
    from PIL import Image

    from eval.metrics import psnr_ssim
    from rfc.run.runner import run

    cfg = make_cfg("model=hunyuan-video-tiny", "method=rfc", "eval=smoke", "eval.num_samples=2",
                   "eval.batch_size=2", "sampler.num_steps=6", "eval.warmup_batches=0")
    rec = run(cfg, tmp_path / "rfc", progress=False)
    videos = np.load(tmp_path / "rfc" / "samples.npz")["arr_0"]
    assert videos.shape == (2, 9, 64, 64, 3) and videos.dtype == np.uint8
    assert rec.arch == "hunyuan-video-tiny 9x64x64" and rec.model == "hunyuan-video-tiny" and rec.nfc < 6
    with Image.open(tmp_path / "rfc" / "preview.gif") as gif:
        assert gif.n_frames == 9
    assert Image.open(tmp_path / "rfc" / "grid.png").size[0] > 8 * 64
    store = next((tmp_path / "outputs" / "store" / "full_compute").iterdir())
    full = np.load(store / "samples.npz")["arr_0"]
    psnr, ssim = psnr_ssim(videos.reshape(-1, 64, 64, 3), full.reshape(-1, 64, 64, 3), torch.device("cpu"))
    assert rec.psnr == pytest.approx(psnr, rel=1e-9) and rec.ssim == pytest.approx(ssim, rel=1e-9)
    assert rec.image_reward is None and rec.clip_score is None  # images' metrics: not a video row's
    assert rec.frames == 9 and rec.vbench is None and "vbench not scored: VBench's environment" in rec.notes
    # the row's table and its figure of the same samples (each video's middle frame), from the CSV
    from scripts.make_figures import main as make_figures
    from scripts.make_tables import main as make_tables

    assert make_tables(["--csv", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "tables")]) in (0, None)
    assert make_figures(["--runs", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "figures"), "--keep-samples",
                         "--kept", str(tmp_path / "kept")]) in (0, None)
    kept = np.load(tmp_path / "kept" / f"{rec.run_id}.npz")["arr_0"]  # what a fresh clone redraws the figure from
    assert kept.shape == (2, 1, 64, 64, 3) and np.array_equal(kept[:, 0], videos[:, 4])  # the middle frames
    assert len(list((tmp_path / "tables").glob("*.md"))) == 1 and len(list((tmp_path / "figures").glob("*.png"))) == 1
    table = next((tmp_path / "tables").glob("*.md")).read_text()
    assert "| Method | NFC | FLOPs (T) | Latency (s) | Speedup | PSNR | SSIM | LPIPS | VBench (%) |" in table
    assert "64px x 9 frames" in table and "PSNR / SSIM / LPIPS per frame against full compute" in table


def test_hunyuan_video_without_weights_is_refused_before_loading(make_cfg, tmp_path, monkeypatch):
    import huggingface_hub.constants

    from rfc.run.build import plan_run
    from rfc.utils.errors import MissingAssetError

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf"))
    says = r"HunyuanVideo is not complete in the Hugging Face cache .* `python scripts/fetch_assets.py hunyuan-video`"
    with pytest.raises(MissingAssetError, match=says):
        plan_run(make_cfg("model=hunyuan-video"), tmp_path / "out")


@pytest.mark.parametrize("override,says", [
    ("model.frames=19", "model.frames 19 is not 4k \\+ 1 .* 5 latent frames and decode 17; ask for that many"),
    ("model.height=72", "model.height 72 is not a multiple of 16"),
    ("model.rope_axes=[4,4,4]", r"model.rope_axes \[4, 4, 4\] must be 3 sizes .* summing to the head size 16"),
])
def test_video_geometry_is_checked_naming_the_key(make_cfg, tmp_path, override, says):
    from rfc.run.build import plan_run
    from rfc.utils.errors import ConfigError

    with pytest.raises(ConfigError, match=says):
        plan_run(make_cfg("model=hunyuan-video-tiny", override), tmp_path / "out")


def test_hunyuan_video_default_setting_and_its_flops(make_cfg):
    """model=hunyuan-video: 544x960, 17 frames (TaylorSeer's scripts' 19 as the pipeline samples them),
    10,200 image tokens and 256 text tokens; its blocks counted as FLUX's: 11,137.76 T for 50 full
    steps (docs/hunyuan_video.md), against the paper's 7,520.00 T, which no natural setting gives."""
    from rfc.models.family import family_of
    from rfc.models.flops import flux_full_step_flops

    cfg = make_cfg("model=hunyuan-video")
    family = family_of(cfg.model)
    arch = family.arch(cfg.model)
    assert (arch.latent_frames, arch.image_tokens, arch.text_tokens) == (5, 10200, 256)
    assert family.latent_shape(arch) == (16, 5, 68, 120) and len(family.sites(arch)) == 80
    full = 50 * flux_full_step_flops(1, arch.image_tokens, arch.text_tokens, 3072, 24, 20, 40) / 1e12
    assert full == pytest.approx(11137.76, abs=0.01)


def test_rfc_table3_composes_the_papers_eight_rows(make_cfg):
    """experiment=rfc_table3's variants on hunyuan-video-tiny: the paper's eight rows with their
    settings, RFC's taus from the committed calibration (NFC 9 and 7: results/tau_calibration.json);
    the sweep itself was run into results/ (docs/hunyuan_video.md), the schedules are tested above."""
    import yaml
    from omegaconf import OmegaConf

    variants = yaml.safe_load((ROOT / "configs" / "experiment" / "rfc_table3.yaml").read_text())
    names = variants["hydra"]["sweeper"]["params"]["+variant"].split(",")
    expected = {"Full compute": ("none", {}), "FORA N=6": ("fora", {"interval": 6}),
                "FORA N=8": ("fora", {"interval": 8}),
                **{f"TaylorSeer N={n} m=1": ("taylorseer", {"interval": n, "order": 1, "warmup": 1})
                   for n in (5, 6, 8)},
                **{f"RFC m=1 NFC {n}": ("rfc", {"order": 1}) for n in (9, 7)}}
    seen = {}
    for name in names:
        cfg = make_cfg("model=hunyuan-video-tiny", f"+variant={name}", "+experiment_name=rfc_table3")
        method = OmegaConf.to_container(cfg.method, resolve=True)
        seen[cfg.variant_name] = method
        kind, params = expected[cfg.variant_name]
        assert method["_target_"].rsplit(".", 1)[-1].lower().startswith(kind.replace("none", "nocache")), name
        assert {k: method[k] for k in params} == params, name
    assert set(seen) == set(expected)
    assert seen["RFC m=1 NFC 9"]["tau"] < seen["RFC m=1 NFC 7"]["tau"]  # a looser threshold computes less


def test_prompts_are_encoded_in_batches_through_the_pipelines_encoder(monkeypatch):
    """encode_prompts without real encoders: each family's pipeline loaded from the cached snapshot
    without transformer and VAE, its two text encoders on the device, encode_prompt a batch at a
    time, the outputs joined in prompt order into the prompt table."""
    import diffusers

    from rfc.models import flux, hunyuan_video

    loaded = []

    class Encoder:
        def to(self, device):
            self.device = device

    class Pipeline:
        @classmethod
        def from_pretrained(cls, folder, transformer, vae, torch_dtype):
            loaded.append((folder, transformer, vae, torch_dtype))
            pipe = cls()
            pipe.text_encoder, pipe.text_encoder_2 = Encoder(), Encoder()
            return pipe

        def encode_prompt(self, prompt, prompt_2, device, max_sequence_length):
            assert self.text_encoder.device == self.text_encoder_2.device == device and prompt_2 is None
            size = torch.tensor([float(len(p)) for p in prompt])
            return (size[:, None, None].expand(-1, max_sequence_length, 4), size[:, None].expand(-1, 3),
                    (torch.arange(max_sequence_length) < size[:, None]).float())

    monkeypatch.setattr(flux, "hf_snapshot", lambda repo: f"/cache/{repo}")
    monkeypatch.setattr(diffusers, "HunyuanVideoPipeline", Pipeline)
    monkeypatch.setattr(diffusers, "FluxPipeline", Pipeline)
    prompts = ["a", "bb", "ccc", "dddd", "eeeee"]
    cpu = torch.device("cpu")
    video = hunyuan_video.encode_prompts("org/video", prompts, 6, cpu, torch.float32, batch=2)
    image = flux.encode_prompts("org/image", prompts, 6, cpu, torch.float32, batch=2)
    assert loaded == [("/cache/org/video", None, None, torch.float32), ("/cache/org/image", None, None, torch.float32)]
    assert video.embeds.shape == (5, 6, 4) and video.pooled[:, 0].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert video.mask.sum(dim=1).tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]
    assert torch.equal(image.embeds, video.embeds) and torch.equal(image.pooled, video.pooled)
