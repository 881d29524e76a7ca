"""The field's implementations beside the harness's, on flux-tiny: diffusers' cache hooks run as methods
(baselines/diffusers_hooks.py) and conformance of the native block-level methods with them and with
the official code.

- First-Block Cache (``method=fbcache``) equals diffusers' FirstBlockCache hook on FLUX's own forward
  (``method=diffusers/first_block_cache``): the same steps computed and the same latents, bit for
  bit, at several thresholds; and the peer's counts, observed from the modules that ran, equal the
  native method's own accounting (so their FLOPs are the same numbers).
- TeaCache (``method=teacache`` with TeaCache4FLUX's coefficients) equals the official
  ``teacache_forward`` of ali-vilab/TeaCache (TeaCache4FLUX/teacache_flux.py), written out below
  with only the block calls adapted to diffusers 0.42's signatures (its single-stream blocks take
  and return the two streams apart), bit for bit at several thresholds.
- cache-dit's DBCache with one front block, no back block and no warm-up (its "F1B0") is First-Block
  Cache: it equals ``method=fbcache`` the same way; and the native ``method=dbcache`` (written from
  cache-dit's code) equals cache-dit's own at front and back blocks, warm-up intervals and step limits;
  the native ``method=magcache`` (written from the official MagCache4FLUX code) equals diffusers'
  MagCache hook once the official code's protected step is switched off.
- The other hooks record what they skipped as the harness counts it (diffusers' TaylorSeer: its own
  schedule, attention only; Pyramid Attention Broadcast: only inside its timestep window; MagCache's
  calibration pass: every step), and a model that is not a diffusers transformer is refused.
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np
import pytest
import torch
from test_flux import sample, tiny_flux

from baselines.cachedit_dbcache import DBCache
from baselines.dbcache import DBCache as NativeDBCache
from baselines.diffusers_hooks import (
    FasterCache,
    FirstBlockCache,
    MagCache,
    PyramidAttentionBroadcast,
    SeaCache,
    TaylorSeerCache,
)
from baselines.fbcache import FBCache
from baselines.magcache import MagCache as NativeMagCache
from baselines.teacache import TeaCache
from rfc.cache import NoCache
from rfc.cache.base import MethodStats
from rfc.models.flux import image_ids, pack, unpack
from rfc.samplers.flow import FlowMatchEulerSampler

STEPS = 28  # MagCache's FLUX ratios are for 28 steps (diffusers interpolates others)
TEACACHE_FLUX = [4.98651651e02, -2.83781631e02, 5.58554382e01, -3.82021401e00, 2.64230861e-01]  # TeaCache4FLUX


@pytest.fixture(scope="module")
def flux():
    model = tiny_flux()
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    return model, x, torch.tensor([0, 1])


def counts(stats: MethodStats) -> dict:
    """Every accounting field but the cache's memory (the implementations keep different tensors)."""
    return {f.name: getattr(stats, f.name) for f in fields(MethodStats) if f.name != "cache_bytes_peak"}


@pytest.mark.parametrize("threshold", [0.1, 0.25, 0.35])
def test_first_block_cache_equals_diffusers_first_block_cache(flux, threshold):
    model, x, y = flux
    ours, ours_stats = sample(model, x, y, FBCache(threshold=threshold), steps=STEPS)
    theirs, their_stats = sample(model, x, y, FirstBlockCache(threshold=threshold), steps=STEPS)
    assert 1 < ours_stats.full_steps < STEPS or threshold == 0.1  # 0.1: every step on this model
    assert their_stats.full_indices == ours_stats.full_indices
    assert torch.equal(theirs, ours)
    assert counts(their_stats) == counts(ours_stats)


class TeaCache4Flux:
    """ali-vilab/TeaCache's ``teacache_forward`` for FLUX (the official method), on a diffusers 0.42
    FluxTransformer2DModel: block 0's ``norm1`` output on the image stream, its relative L1 change
    rescaled by np.poly1d(coefficients) and accumulated, compute when the sum reaches the threshold
    and at the first and last step, otherwise add the residual of the last computed step to the
    image stream."""

    def __init__(self, transformer: torch.nn.Module, threshold: float, coefficients: list[float], steps: int) -> None:
        self.tr, self.threshold, self.steps = transformer, threshold, steps
        self.rescale = np.poly1d(coefficients)
        self.cnt, self.accumulated = 0, 0.0
        self.previous_modulated_input: torch.Tensor | None = None
        self.previous_residual: torch.Tensor | None = None
        self.computed: list[int] = []

    def forward(self, hidden_states, encoder_hidden_states, pooled_projections, timestep, img_ids, txt_ids,
                guidance) -> torch.Tensor:
        tr = self.tr
        hidden_states = tr.x_embedder(hidden_states)
        timestep = timestep.to(hidden_states.dtype) * 1000
        guidance = guidance.to(hidden_states.dtype) * 1000
        temb = tr.time_text_embed(timestep, guidance, pooled_projections)
        encoder_hidden_states = tr.context_embedder(encoder_hidden_states)
        image_rotary_emb = tr.pos_embed(torch.cat((txt_ids, img_ids), dim=0))

        inp = hidden_states.clone()
        temb_ = temb.clone()
        modulated_inp, _gate_msa, _shift_mlp, _scale_mlp, _gate_mlp = tr.transformer_blocks[0].norm1(inp, emb=temb_)
        if self.cnt == 0 or self.cnt == self.steps - 1:
            should_calc = True
            self.accumulated = 0.0
        else:
            prev = self.previous_modulated_input
            self.accumulated += self.rescale(((modulated_inp - prev).abs().mean() / prev.abs().mean()).cpu().item())
            if self.accumulated < self.threshold:
                should_calc = False
            else:
                should_calc = True
                self.accumulated = 0.0
        self.previous_modulated_input = modulated_inp
        if should_calc:
            self.computed.append(self.cnt)
        self.cnt += 1
        if self.cnt == self.steps:
            self.cnt = 0

        if not should_calc:
            hidden_states += self.previous_residual
        else:
            ori_hidden_states = hidden_states.clone()
            for block in tr.transformer_blocks:
                encoder_hidden_states, hidden_states = block(hidden_states=hidden_states,
                                                             encoder_hidden_states=encoder_hidden_states,
                                                             temb=temb, image_rotary_emb=image_rotary_emb)
            for block in tr.single_transformer_blocks:  # diffusers 0.42: the two streams apart
                encoder_hidden_states, hidden_states = block(hidden_states=hidden_states,
                                                             encoder_hidden_states=encoder_hidden_states,
                                                             temb=temb, image_rotary_emb=image_rotary_emb)
            self.previous_residual = hidden_states - ori_hidden_states
        hidden_states = tr.norm_out(hidden_states, temb)
        return tr.proj_out(hidden_states)


def teacache4flux(model, x, y, threshold: float, coefficients: list[float]) -> tuple[torch.Tensor, list[int]]:
    """FluxPipeline's Euler loop (the harness's sampler, which equals it bit for bit) around the
    official forward above; the final latents and the steps it computed."""
    official = TeaCache4Flux(model.transformer, threshold, coefficients, STEPS)
    h, w = x.shape[-2:]
    table = model.prompt_table

    class Denoiser:
        batch_multiplier = 1

        def __call__(self, latents, t, labels):
            img = image_ids(h, w, latents.device, torch.float32)
            out = official.forward(pack(latents), table.embeds[labels], table.pooled[labels], t, img,
                                   torch.zeros(table.embeds.shape[1], 3), torch.full((latents.shape[0],), 3.5))
            return unpack(out, h, w).float()

    with torch.no_grad():
        out = FlowMatchEulerSampler(num_steps=STEPS).sample(Denoiser(), x.clone(), y)
    return out, official.computed


@pytest.mark.parametrize(("threshold", "coefficients"), [(0.25, TEACACHE_FLUX), (0.6, TEACACHE_FLUX),
                                                         (1.0, TEACACHE_FLUX), (0.1, [1.0, 0.0])])
def test_teacache_equals_teacache4flux(flux, threshold, coefficients):
    model, x, y = flux
    ours, stats = sample(model, x, y, TeaCache(threshold=threshold, coefficients=coefficients), steps=STEPS)
    theirs, computed = teacache4flux(model, x, y, threshold, coefficients)
    assert stats.full_indices == computed and len(computed) < STEPS
    assert torch.equal(ours, theirs)


def test_diffusers_taylorseer_follows_its_own_schedule_on_attention_only(flux):
    """diffusers' TaylorSeer computes the attention at its calls 0-2 (before step 3) and every 5th
    from call 4 (4, 9, ...), and predicts it between: a predicted step has the double-stream
    attention sites cached, their MLPs and the single-stream MLP + output projections computed
    (partial sites on every token)."""
    model, x, y = flux
    out, stats = sample(model, x, y, TaylorSeerCache(), steps=STEPS)
    assert stats.full_indices == [c for c in range(STEPS) if c < 3 or (c - 3 - 1) % 5 == 0]
    cached = STEPS - stats.full_steps
    assert stats.cached_sites == 2 * cached and stats.full_mlp == 2 * STEPS  # 2 double-stream blocks
    assert stats.partial_total_tokens == [16 + 8] * (3 * cached)  # 3 single-stream blocks, text + image
    assert torch.isfinite(out).all()
    full, _ = sample(model, x, y, TaylorSeerCache(cache_interval=1), steps=STEPS)
    reference, ref_stats = sample(model, x, y, NoCache(), steps=STEPS)
    assert torch.equal(full, reference)


def test_pyramid_attention_broadcast_reads_the_pipeline_timestep(flux):
    """PAB skips attention only while the pipeline's current timestep is inside its window: a
    window no timestep reaches is full compute; diffusers' default window (100, 800) skips some."""
    model, x, y = flux
    reference, _ = sample(model, x, y, NoCache(), steps=STEPS)
    outside, stats = sample(model, x, y, PyramidAttentionBroadcast(spatial_attention_timestep_skip_range=[2000, 3000]),
                            steps=STEPS)
    assert stats.full_steps == STEPS and torch.equal(outside, reference)
    _, stats = sample(model, x, y, PyramidAttentionBroadcast(), steps=STEPS)
    t = FlowMatchEulerSampler(num_steps=STEPS).schedule(16)[0]
    inside = [i for i, v in enumerate(t.tolist()) if 100 < v < 800]
    assert stats.full_steps < STEPS and all(i in stats.full_indices for i in range(STEPS) if i not in inside)


def test_faster_cache_skips_attention_only_below_its_timestep_and_restarts_per_batch(flux):
    """FasterCache (guidance-distilled: its CFG reuse off) computes every attention while the
    pipeline's timestep is at or above 681 and every other one below; a second batch starts afresh."""
    model, x, y = flux
    out, stats = sample(model, x, y, FasterCache(), steps=STEPS)
    t = FlowMatchEulerSampler(num_steps=STEPS).schedule(16)[0].tolist()
    above = [i for i, v in enumerate(t) if v >= 681]
    assert all(i in stats.full_indices for i in above) and stats.full_steps < STEPS
    assert stats.cached_sites == 2 * (STEPS - stats.full_steps)  # double-stream attention predicted
    again, _ = sample(model, x, y, FasterCache(), steps=STEPS)
    assert torch.equal(again, out)


def test_mag_cache_skips_with_flux_ratios_and_calibrates_at_full_compute(flux):
    model, x, y = flux
    reference, ref_stats = sample(model, x, y, NoCache(), steps=STEPS)
    _, stats = sample(model, x, y, MagCache(), steps=STEPS)
    assert 1 < stats.full_steps < STEPS and stats.full_indices[: int(0.2 * STEPS + 0.5)] == list(range(6))
    calibrated, stats = sample(model, x, y, MagCache(mag_ratios="calibrate"), steps=STEPS)
    assert stats.full_steps == STEPS and torch.equal(calibrated, reference)
    assert counts(stats) == counts(ref_stats)  # every module observed, as full compute counts them


class PackedSeaCache(SeaCache):
    """SeaCache whose adapter reads the latents from the transformer's own packed input, as an adapter
    written for FLUX.1's pipeline would: the harness's adapter must give the same frames."""

    def _raw_vision(self, module, args, kwargs):
        h = w = 2 * int(kwargs["hidden_states"].shape[1] ** 0.5)
        return [v.unsqueeze(1) for v in unpack(kwargs["hidden_states"], h, w).unbind(0)]


@pytest.mark.parametrize("order", [0, 1])
def test_sea_cache_gets_the_pipelines_metadata_and_never_fails_open(flux, order, caplog):
    model, x, y = flux
    with caplog.at_level("WARNING"):
        ours, stats = sample(model, x, y, SeaCache(threshold=0.25, residual_order=order), steps=STEPS)
        packed, packed_stats = sample(model, x, y, PackedSeaCache(threshold=0.25, residual_order=order), steps=STEPS)
    assert "fail-open" not in caplog.text  # diffusers runs every step when the metadata is missing
    full = stats.full_indices
    assert 1 < len(full) < STEPS - 4 and full[0] == 0 and full[-1] == STEPS - 1  # retention and end steps
    assert all(b - a <= 3 for a, b in zip(full, full[1:], strict=False))  # at most 2 reused in a row
    assert packed_stats.full_indices == full and torch.equal(packed, ours)
    reference, _ = sample(model, x, y, NoCache(), steps=STEPS)
    computed, _ = sample(model, x, y, SeaCache(threshold=0.0, residual_order=order), steps=STEPS)
    assert torch.equal(computed, reference)


def test_peer_methods_are_refused_on_models_that_are_not_diffusers_transformers(make_cfg, tmp_path):
    from rfc.run.runner import run
    from rfc.utils.errors import ConfigError

    cfg = make_cfg("model=dit-tiny", "method=diffusers/first_block_cache", "eval=smoke", "eval.num_samples=2")
    why = "method=diffusers/first_block_cache runs diffusers' cache hook on the model's own diffusers transformer"
    with pytest.raises(ConfigError, match=why):
        run(cfg, tmp_path / "dit", progress=False)
    assert not (tmp_path / "dit" / "samples.npz").exists()


@pytest.mark.parametrize("threshold", [0.25, 0.35])
def test_cachedit_dbcache_f1b0_equals_first_block_cache(flux, threshold):
    model, x, y = flux
    tr = model.transformer
    before = ([vars(m).get("forward") for m in tr.modules()], [n for n, _ in tr.named_modules()])
    ours, ours_stats = sample(model, x, y, FBCache(threshold=threshold), steps=STEPS)
    dbcache = DBCache(Fn_compute_blocks=1, Bn_compute_blocks=0, residual_diff_threshold=threshold, max_warmup_steps=0)
    theirs, their_stats = sample(model, x, y, dbcache, steps=STEPS)
    assert 1 < ours_stats.full_steps < STEPS and their_stats.full_indices == ours_stats.full_indices
    assert torch.equal(theirs, ours) and counts(their_stats) == counts(ours_stats)
    again, _ = sample(model, x, y, dbcache, steps=STEPS)  # a new batch starts from a fresh context
    assert torch.equal(again, ours)
    # detached, cache-dit leaves the transformer as it found it (its instance forwards, the order of its
    # children, which diffusers' hooks read to find the first and last block), for whoever runs next
    after = ([vars(m).get("forward") for m in tr.modules()], [n for n, _ in tr.named_modules()])
    assert after == before and not hasattr(tr, "_is_patched")


def test_cachedit_dbcache_back_blocks_taylorseer_and_its_refusals(flux, monkeypatch):
    """Back blocks run at every step (a cached step computes the last Bn blocks: a partial step);
    the TaylorSeer calibrator forecasts instead of reusing (other latents, the same schedule here);
    more front and back blocks than the model has, or no cache-dit, are refused in one line."""
    model, x, y = flux
    settings = {"residual_diff_threshold": 0.35, "max_warmup_steps": 0}
    reuse, stats = sample(model, x, y, DBCache(Bn_compute_blocks=1, **settings), steps=STEPS)
    cached = STEPS - stats.full_steps
    assert cached > 0 and stats.full_total == 3 * stats.full_steps + cached  # the last single-stream block
    forecast, ts_stats = sample(model, x, y, DBCache(Bn_compute_blocks=1, taylorseer_order=1, **settings), steps=STEPS)
    assert ts_stats.full_steps < STEPS and not torch.equal(forecast, reuse) and torch.isfinite(forecast).all()
    with pytest.raises(ValueError, match="Fn_compute_blocks \\+ method.Bn_compute_blocks = 6 exceeds the model's 5"):
        DBCache(Fn_compute_blocks=4, Bn_compute_blocks=2).attach(model)
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "cache_dit" else real(name, *a))
    with pytest.raises(ValueError, match="needs the cache-dit package, which is not installed: pip install -e"):
        DBCache()


def test_a_threshold_is_calibrated_like_tau_and_found_by_its_own_key(make_cfg, tmp_path):
    """calibration.knob: any method's threshold is bisected to a target NFC and recorded under a key
    of its own (method and knob named; a list setting such as TeaCache's coefficients is part of it),
    where ``${calibrated:<knob>,N}`` finds it; RFC's tau keeps its key."""
    from omegaconf import OmegaConf

    from rfc.run.config import calibrated, tau_key
    from rfc.tools.calibration import calibrate, save_calibration

    overrides = ("model=flux-tiny", "sampler.num_steps=12", f"paths.results={tmp_path}")
    cfg = make_cfg(*overrides, "method=teacache")
    result = calibrate(cfg, 6, num_samples=2, batch_size=2, seed=1000, tolerance=1, out_dir=tmp_path / "cal",
                       knob="threshold")
    assert abs(result.nfc - 6) <= 1 and result.within_tolerance
    save_calibration(cfg, result, 2, 1000, knob="threshold")
    used = make_cfg(*overrides, "method=teacache", "method.threshold=${calibrated:threshold,6}")
    assert used.method.threshold == result.tau
    key = tau_key(cfg, 6, "threshold")
    assert "baselines.teacache.TeaCache.threshold" in key and '"coefficients": [1.0, 0.0]' in key
    other = make_cfg(*overrides, "method=diffusers/first_block_cache")
    assert tau_key(other, 6, "threshold") != key
    with pytest.raises(ValueError, match="no calibrated threshold for NFC 6 .* calibration.knob=threshold"):
        calibrated("threshold", 6, OmegaConf.merge(other, {}))
    assert "|nfc6.0" in tau_key(make_cfg(*overrides, "method=rfc"), 6) and ".tau|" not in tau_key(
        make_cfg(*overrides, "method=rfc"), 6)


def test_peers_flux_sweep_composes_every_variant():
    """experiment=peers_flux: 25 rows, full compute first; the papers' methods, the native block
    caches and the peers, adaptive ones through a calibrated threshold of their own key."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from rfc.run.config import register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    root = __import__("pathlib").Path(__file__).resolve().parents[1]
    with initialize_config_dir(config_dir=str(root / "configs"), version_base="1.3"):
        sweep = compose("run", overrides=["experiment=peers_flux"], return_hydra_config=True)
        variants = sweep.hydra.sweeper.params["+variant"].split(",")
        assert len(variants) == 25 and variants[0] == "flux_full"
        methods = {}
        for variant in variants:
            cfg = compose("run", overrides=["experiment=peers_flux", f"+variant={variant}"])
            methods[variant] = cfg.method._target_
            for knob in ("threshold", "residual_diff_threshold"):
                if variant.startswith("peer_") and knob in cfg.method and not variant.startswith("peer_dts"):
                    target = variant.rstrip("0123456789")
                    nfc = variant[len(target):]
                    assert cfg.method._get_node(knob)._value() == f"${{calibrated:{knob},{nfc}}}", variant
    GlobalHydra.instance().clear()
    assert methods["peer_dfbc14"] == "baselines.diffusers_hooks.FirstBlockCache"
    assert methods["peer_dbcache_ts8"] == "baselines.cachedit_dbcache.DBCache"
    assert methods["peer_dts10"] == "baselines.diffusers_hooks.TaylorSeerCache"
    assert methods["peer_pab8"] == "baselines.pab.PyramidAttentionBroadcast"
    assert methods["peer_dpab13"] == "baselines.diffusers_hooks.PyramidAttentionBroadcast"


@pytest.mark.parametrize(("front", "back", "threshold", "warmup", "interval", "max_cached", "max_continuous"), [
    (1, 0, 0.35, 0, 1, -1, -1), (2, 1, 0.3, 3, 1, -1, -1), (2, 2, 0.2, 4, 2, -1, -1), (1, 1, 0.5, 2, 1, 5, -1),
    (3, 0, 0.4, 0, 1, -1, 2), (1, 0, 1.5, 3, 1, -1, -1)])
def test_native_dbcache_equals_cachedit_dbcache(flux, front, back, threshold, warmup, interval, max_cached,
                                                max_continuous):
    """method=dbcache against cache-dit's DBCache on the same transformer: the same steps computed,
    the same latents and the same counts, bit for bit (a threshold >= 1 caches without measuring,
    as cache-dit does)."""
    model, x, y = flux
    ours, ours_stats = sample(model, x, y, NativeDBCache(front=front, back=back, threshold=threshold, warmup=warmup,
                                                         warmup_interval=interval, max_cached_steps=max_cached,
                                                         max_continuous_cached_steps=max_continuous), steps=STEPS)
    peer = DBCache(Fn_compute_blocks=front, Bn_compute_blocks=back, residual_diff_threshold=threshold,
                   max_warmup_steps=warmup, warmup_interval=interval, max_cached_steps=max_cached,
                   max_continuous_cached_steps=max_continuous)
    theirs, their_stats = sample(model, x, y, peer, steps=STEPS)
    assert ours_stats.full_steps < STEPS and their_stats.full_indices == ours_stats.full_indices
    assert torch.equal(theirs, ours) and counts(their_stats) == counts(ours_stats)


@pytest.mark.parametrize(("threshold", "max_skip", "retention"), [(0.06, 3, 0.2), (0.24, 5, 0.1), (0.1, 2, 0.2)])
def test_native_magcache_equals_diffusers_mag_cache_and_keeps_step_11(flux, threshold, max_skip, retention):
    """method=magcache without the official code's protected step makes diffusers' MagCache hook's
    decisions, latents and counts, bit for bit; with it (the default, step 11 of 28) that step is
    computed as well."""
    model, x, y = flux
    settings = {"threshold": threshold, "max_skip_steps": max_skip, "retention_ratio": retention}
    ours, ours_stats = sample(model, x, y, NativeMagCache(**settings, keep_steps=[]), steps=STEPS)
    theirs, their_stats = sample(model, x, y, MagCache(**settings), steps=STEPS)
    assert ours_stats.full_steps < STEPS and their_stats.full_indices == ours_stats.full_indices
    assert torch.equal(theirs, ours) and counts(their_stats) == counts(ours_stats)
    _, official = sample(model, x, y, NativeMagCache(**settings), steps=STEPS)
    assert 11 in official.full_indices and 11 not in ours_stats.full_indices
