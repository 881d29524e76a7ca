"""FLOPs per site kind, from the model family: a block-level method on FLUX charges each block's
sites at their own kind's cost (a single-stream block is one ``total`` site, not an attention and
an MLP), and guidance-level reuse charges only the rows it computed."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from test_cache import TINY as DIT_TINY
from test_cache import sample_with
from test_flux import TINY as FLUX_TINY
from test_flux import tiny_flux
from test_protocol import GuidanceReuse

from baselines.fbcache import FBCache
from baselines.teacache import TeaCache
from rfc.cache import MethodStats, NoCache
from rfc.models.family import families
from rfc.models.flops import flux_full_step_flops
from rfc.models.flux import FluxModel
from rfc.models.load import build_dit
from rfc.samplers.flow import FlowMatchEulerSampler
from rfc.samplers.sampling import CFGDenoiser, DDIMSampler

ROOT = Path(__file__).resolve().parents[1]
STEPS = 10


@pytest.fixture(scope="module")
def flux():
    return tiny_flux()


def flux_stats(model: FluxModel, method) -> MethodStats:
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    method.attach(model)
    try:
        with torch.no_grad():
            FlowMatchEulerSampler(num_steps=STEPS).sample(
                CFGDenoiser(model, 1.0, 0, 16), x, torch.tensor([0, 1]), listener=method
            )
    finally:
        method.detach()
    return method.stats()


def test_the_families_price_their_own_site_kinds():
    dit, flux = families()["dit"], families()["flux"]
    assert dit.sites(DIT_TINY) == ("attn", "mlp") * DIT_TINY.depth
    assert flux.sites(FLUX_TINY) == ("attn", "mlp") * 2 + ("total",) * 3
    assert set(flux.cost(FLUX_TINY).sites) == {"attn", "mlp", "total"}


@pytest.mark.parametrize(
    "make", [lambda: FBCache(threshold=0.0), lambda: TeaCache(threshold=0.0)], ids=["fbcache", "teacache"]
)
def test_block_level_methods_on_flux_count_single_stream_blocks_as_one_site(flux, make):
    """At threshold 0 every block runs every step: the counts are full compute's, per kind; FBCache's
    FLOPs are full compute's exactly, TeaCache's add only its probe (block 0's modulation and
    norm at every step)."""
    block_method = make()
    none, method = flux_stats(flux, NoCache()), flux_stats(flux, block_method)
    for s in (none, method):
        assert (s.full_attn, s.full_mlp, s.full_total) == (2 * STEPS, 2 * STEPS, 3 * STEPS)
        assert s.full_sites == 7 * STEPS and s.full_blocks == 5 * STEPS and s.cached_sites == 0
    cost = families()["flux"].cost(FLUX_TINY)
    full = STEPS * flux_full_step_flops(1, 16, 8, 32, 2, 2, 3)
    assert cost.flops(none, 1) == pytest.approx(full, rel=1e-12)
    probe = method.block_calls - none.block_calls
    assert probe == (STEPS if isinstance(block_method, TeaCache) else 0)
    assert method.norm_tokens - none.norm_tokens == probe * 16  # the probe normalises the 16 image tokens only
    extra = probe * (cost.step_modulation(1) / cost.blocks) + cost.norm(1, 16 * probe)
    assert cost.flops(method, 1) == pytest.approx(full + extra, rel=1e-12)


def test_a_cached_block_level_step_on_flux_counts_its_sites_not_two_per_block(flux):
    method = FBCache(threshold=10.0)  # after block 0 of step 0, every step reuses the residual
    s = flux_stats(flux, method)
    assert s.full_steps == 1 and s.cached_steps == STEPS - 1
    assert s.cached_sites == (STEPS - 1) * (7 - 2)  # blocks 1..4: one double-stream (2 sites), three single (1 each)
    assert s.full_total == 3 and s.full_attn == STEPS + 1


@pytest.fixture(scope="module")
def dit_tiny():
    return build_dit(DIT_TINY, ROOT / "checkpoints" / "dit-tiny-digits.pt")


def test_guidance_level_reuse_charges_only_the_rows_it_computed(dit_tiny):
    """GuidanceReuse (tests/test_protocol.py) runs both CFG halves every 4th step and the
    conditional rows alone between them: 5 steps of 2 rows and 15 of 1, i.e. (5 + 15/2) / 20 of
    full compute's FLOPs, which charge both halves at every step."""
    sampler = DDIMSampler(num_steps=20)
    none, reuse = NoCache(), GuidanceReuse(interval=4)
    sample_with(dit_tiny, none, sampler, n=3)
    sample_with(dit_tiny, reuse, sampler, n=3)
    assert reuse.rows == [6 if i % 4 == 0 else 3 for i in range(20)]
    cost = families()["dit"].cost(DIT_TINY)
    assert list(reuse.stats().reduced_rows) == [0.5]
    assert cost.flops(reuse.stats(), 2) == pytest.approx((5 + 15 / 2) / 20 * cost.flops(none.stats(), 2), rel=1e-12)
    every = GuidanceReuse(interval=1)  # both halves at every step: full compute's FLOPs
    sample_with(dit_tiny, every, sampler, n=3)
    assert not every.stats().reduced_rows
    assert cost.flops(every.stats(), 2) == pytest.approx(cost.flops(none.stats(), 2), rel=1e-12)


def test_reduced_rows_survive_a_shard(dit_tiny):
    """Shards store a batch's accounting as JSON (rfc.run.shards): the reduced-row work comes back."""
    reuse = GuidanceReuse(interval=2)
    sample_with(dit_tiny, reuse, DDIMSampler(num_steps=6), n=2)
    stats = reuse.stats()
    back = MethodStats(**json.loads(json.dumps(asdict(stats))))
    assert back == stats
    cost = families()["dit"].cost(DIT_TINY)
    assert cost.flops(back, 2) == cost.flops(stats, 2)
