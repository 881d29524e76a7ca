"""ToCa's token-wise caching on FLUX as the official FLUX ToCa code behaves (baselines/toca.py), on a
tiny random FLUX transformer (offline, CPU, seconds).

The schedule (full at steps 0, 1, 2, then every N), the fresh-token counts of the 'ToCa' ratio
schedule (hand-computed at FLUX.1-dev's token counts), the explicit attention against diffusers'
fused one, the degenerate settings bit for bit, what a partial step recomputes and how it is
counted, and the error against full compute.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from baselines.toca import ToCa, flux_fresh_tokens, flux_full_steps
from rfc.cache import NoCache
from rfc.models.flops import flux_flops
from rfc.models.flux import (
    FluxConfig,
    FluxModel,
    joint_attention_with_received,
    random_prompt_table,
    random_transformer,
    single_total_with_attention,
)
from rfc.samplers.flow import FlowMatchEulerSampler
from rfc.samplers.sampling import CFGDenoiser

TINY = FluxConfig(image_size=64, hidden_size=32, num_heads=2, depth_double=2, depth_single=3, text_tokens=8,
                  text_dim=32, pooled_dim=16)
N_TXT, N_IMG = TINY.text_tokens, TINY.image_tokens  # 8, 16
T = N_TXT + N_IMG


@pytest.fixture(scope="module")
def tiny():
    transformer = random_transformer(TINY, [4, 6, 6], seed=0)
    table = random_prompt_table(["a red car", "a cat on a mat"], TINY.text_tokens, TINY.text_dim, TINY.pooled_dim)
    model = FluxModel(transformer, table, TINY, guidance=3.5)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(1))
    return model, x, torch.tensor([0, 1])


class Watch:
    """A listener that forwards to the method and calls ``after(step)`` at the end of every step."""

    def __init__(self, method, after):
        self.method, self.after = method, after

    def begin_step(self, step):
        self.method.begin_step(step)

    def end_step(self, step):
        self.method.end_step(step)
        self.after(step)


def sample(model, x, y, method, steps=50, after=None):
    method.attach(model)
    try:
        with torch.no_grad():
            listener = Watch(method, after) if after else method
            out = FlowMatchEulerSampler(num_steps=steps).sample(CFGDenoiser(model, 1.0, 0, 16), x.clone(), y,
                                                                listener=listener)
    finally:
        method.detach()
    return out, method.stats()


@pytest.fixture(scope="module")
def reference(tiny):
    model, x, y = tiny
    return sample(model, x, y, NoCache())[0]


def official_cal_type(num_steps, interval, fresh_ratio):
    """The official cal_type transcribed independently: its cache_counter, first steps 0..2 (R > 0) or
    step 0 (R = 0), cal_threshold = round(N / 1.0)."""
    counter, full = 0, []
    for step in range(num_steps):
        first = step <= 2 if fresh_ratio != 0 else step == 0
        threshold = interval if first else round(interval / 1.0)
        if first or counter == threshold - 1:
            counter = 0
            full.append(step)
        else:
            counter += 1
    return full


@pytest.mark.parametrize("interval,fresh_ratio,expected", [
    (5, 0.1, [0, 1, 2, *range(7, 50, 5)]),  # RFC Table 2's ToCa N=5: NFC 12
    (12, 0.1, [0, 1, 2, 14, 26, 38]),  # ToCa N=12: NFC 6
    (4, 0.1, [0, 1, 2, *range(6, 50, 4)]),  # the official default N = 4: NFC 14
    (1, 0.1, list(range(50))),
    (5, 0.0, list(range(0, 50, 5))),  # R = 0: the official FORA switch
])
def test_official_flux_schedule(interval, fresh_ratio, expected):
    full = flux_full_steps(50, interval, fresh_ratio)
    assert [i for i, f in enumerate(full) if f] == expected == official_cal_type(50, interval, fresh_ratio)


def test_the_sampler_follows_the_schedule_and_counts_full_steps_as_nfc(tiny):
    model, x, y = tiny
    _, stats = sample(model, x, y, ToCa(interval=5, fresh_ratio=0.1))
    assert stats.full_indices == [0, 1, 2, *range(7, 50, 5)] and stats.full_steps == 12
    assert stats.cached_steps == 38


def test_fresh_token_counts_by_hand_at_flux_dev_sizes():
    """k = int(R (1.5 - layer / 27) l_stream * tokens), l_stream 0.4 (double) / 1.6 (single), layer
    within its stream; FLUX.1-dev at 1024 px: 4096 image and 512 text tokens."""
    # double layer 0: 0.1 * 1.5 * 0.4 = 0.06 -> 245.76 image, 30.72 text
    assert flux_fresh_tokens(0.1, 0, True, 4096) == 245
    assert flux_fresh_tokens(0.1, 0, True, 512) == 30
    # double layer 18: 0.1 * (1.5 - 18/27) * 0.4 = 0.0333... -> 136.53, 17.07
    assert flux_fresh_tokens(0.1, 18, True, 4096) == 136
    assert flux_fresh_tokens(0.1, 18, True, 512) == 17
    # single layer 0: 0.1 * 1.5 * 1.6 = 0.24 -> 1105.92 of 4608; layer 37: 0.1 * (1.5 - 37/27) * 1.6 -> 95.57
    assert flux_fresh_tokens(0.1, 0, False, 4608) == 1105
    assert flux_fresh_tokens(0.1, 37, False, 4608) == 95
    # the method's default R = 0.07, double layer 5: 0.07 * (1.5 - 5/27) * 0.4 -> 150.79
    assert flux_fresh_tokens(0.07, 5, True, 4096) == 150
    # the step factor is 1 (weight 0): any step gives the same k; the ratio is clamped to 1
    assert flux_fresh_tokens(0.1, 0, False, 4608, step=40, num_steps=50) == 1105
    assert flux_fresh_tokens(1.0, 0, False, 4608) == 4608


def test_explicit_attention_equals_the_fused_attention(tiny):
    """Explicit softmax (map kept) vs diffusers' scaled_dot_product_attention, every block, within
    1e-5 of the output's largest entry; received attention is a distribution over the T tokens."""
    model, x, y = tiny
    with torch.no_grad():
        tokens, _ = model.embed(x, torch.tensor([0.7, 0.7]), y)
        h = torch.randn(tokens.shape, generator=torch.Generator().manual_seed(3))
        for block in model.blocks:
            if hasattr(block, "attn"):
                ours, received = joint_attention_with_received(block.attn, h)
                fused = block.attn(h)
            else:
                ours, attn, received = single_total_with_attention(block.total, h)
                fused = block.total(h)
                b = block.total.block
                fused_attn = b.attn(hidden_states=h, image_rotary_emb=model.ctx.rope)
                assert (attn - fused_attn).abs().max() <= 1e-5 * fused_attn.abs().max()
            assert ours.shape == fused.shape == (2, T, TINY.hidden_size)
            assert (ours - fused).abs().max() <= 1e-5 * fused.abs().max()
            assert received.shape == (2, T) and (received >= 0).all()
            torch.testing.assert_close(received.sum(dim=1), torch.ones(2), rtol=0, atol=1e-6)


@pytest.mark.parametrize("fresh_ratio", [0.0, 0.07, 1.0])
def test_n1_is_full_compute_bit_for_bit(tiny, reference, fresh_ratio):
    """N = 1: every step full; no map is needed, so the fused attention runs and nothing differs."""
    model, x, y = tiny
    method = ToCa(interval=1, fresh_ratio=fresh_ratio)
    out, stats = sample(model, x, y, method)
    assert stats.full_steps == 50 and stats.partial_sites == 0 and stats.cached_sites == 0
    assert torch.equal(out, reference)
    assert method.received == {}


def test_maps_are_taken_only_before_partial_steps(tiny):
    model, x, y = tiny
    method = ToCa(interval=3, fresh_ratio=0.07)
    mapped = []
    sample(model, x, y, method, after=lambda step: mapped.append(method.need_map))
    assert [i for i, m in enumerate(mapped) if m] == [2, *range(5, 48, 3)]  # full, and the next step partial


def partial_counts(fresh_ratio):
    """Hand formula on flux-tiny: per partial step, the double-stream MLP tokens (image + text) per
    block and the single-stream tokens per block."""
    def k(layer, double, n):
        ratio = fresh_ratio * (1 + 0.5 - 2 * 0.5 * layer / 27) * (0.4 if double else 1.6)
        return int(torch.tensor(ratio, dtype=torch.float32).clamp(0, 1) * n)

    mlp = [k(layer, True, N_IMG) + k(layer, True, N_TXT) for layer in range(2)]
    total = [k(layer, False, T) for layer in range(3)]
    return mlp, total


def test_partial_sites_accounting(tiny):
    """N = 3, R = 0.5 on 50 steps: 18 full steps, 32 partial ones. A partial step reuses both joint
    attentions, recomputes the double-stream MLPs for 4 + 2 tokens (0.5 * 1.5 * 0.4 = 0.3 of 16 image
    and 8 text tokens; layer 1: 0.2926) and the single-stream blocks for all 24 (ratio clamped to 1)."""
    model, x, y = tiny
    _, stats = sample(model, x, y, ToCa(interval=3, fresh_ratio=0.5))
    mlp, total = partial_counts(0.5)
    assert (mlp, total) == ([6, 6], [24, 24, 24])
    full, partial = 18, 32
    assert stats.full_steps == full and stats.cached_steps == partial
    assert stats.partial_mlp_tokens == mlp * partial and stats.partial_total_tokens == total * partial
    assert stats.partial_attn_tokens == []
    assert (stats.full_attn, stats.full_mlp, stats.full_total) == (2 * full, 2 * full, 3 * full)
    assert stats.cached_sites == 2 * partial and stats.partial_sites == 5 * partial
    assert (stats.full_blocks, stats.partial_blocks) == (5 * full, 5 * partial)
    assert stats.block_calls == 5 * 50
    # layer norms: a full step 2 * T per double-stream block + T per single one; a partial step the fresh tokens
    assert stats.norm_tokens == full * (2 * 2 * T + 3 * T) + partial * (sum(mlp) + sum(total))
    none = sample(model, x, y, NoCache())[1]
    args = (1, N_IMG, N_TXT, TINY.hidden_size, TINY.num_heads, 2, 3)
    assert flux_flops(stats, *args) < flux_flops(none, *args)


def test_default_ratio_counts_and_zero_token_sites(tiny):
    """The method's default R = 0.07 on flux-tiny: the double-stream ratio (0.042) leaves no token of
    16 or 8, so those MLPs are reused (cached sites); single-stream blocks recompute 4, 3, 3 of 24."""
    model, x, y = tiny
    _, stats = sample(model, x, y, ToCa())
    mlp, total = partial_counts(0.07)
    assert (mlp, total) == ([0, 0], [4, 3, 3])
    partial = 50 - 18
    assert stats.partial_mlp_tokens == [] and stats.partial_total_tokens == total * partial
    assert stats.cached_sites == 4 * partial  # two attentions and two MLPs per partial step


def test_a_partial_step_recomputes_the_top_scored_tokens_per_stream(tiny):
    """At step 3 (the first partial one, after the mapped full step 2) each double-stream MLP
    recomputes the k highest-scoring tokens of each stream (score = L2-normalised received attention,
    staleness all 0 then) and keeps the others' cached outputs; staleness becomes 1 except there."""
    model, x, y = tiny
    method = ToCa(interval=3, fresh_ratio=0.5)
    seen = {}

    def after(step):
        if step.index in (2, 3):
            seen[step.index] = ({s.block: v.clone() for s, v in method.cache.items() if s.branch == "mlp"},
                                {b: r.clone() for b, r in method.received.items()},
                                {s.block: v.clone() for s, v in method.staleness.items() if s.branch == "mlp"})

    sample(model, x, y, method, steps=6, after=after)
    (cache2, received, stale2), (cache3, _, stale3) = seen[2], seen[3]
    for block in (0, 1):
        assert (stale2[block] == 0).all()
        for lo, hi, k in ((N_TXT, T, 4), (0, N_TXT, 2)):
            top = F.normalize(received[block][:, lo:hi], dim=-1, p=2).argsort(dim=-1, descending=True)[:, :k] + lo
            fresh = torch.zeros(2, T, dtype=torch.bool).scatter_(1, top, True)
            fresh[:, :lo] = False
            fresh[:, hi:] = False
            span = torch.zeros(2, T, dtype=torch.bool)
            span[:, lo:hi] = True
            assert torch.equal(stale3[block][span], (~fresh[span]).int())
            changed = (cache3[block] != cache2[block]).any(dim=-1)
            assert torch.equal(changed[span], fresh[span])


@pytest.mark.parametrize("interval,fresh_ratio,bound", [(3, 0.07, 0.01), (5, 0.1, 0.01), (12, 0.1, 0.02)])
def test_finite_and_close_to_full_compute(tiny, reference, interval, fresh_ratio, bound):
    """Max |ToCa - full| within ``bound`` of max |full| on flux-tiny's 50 steps (measured here:
    0.00085 / 0.0013 / 0.0030), and not zero: partial steps did reuse."""
    model, x, y = tiny
    out, _ = sample(model, x, y, ToCa(interval=interval, fresh_ratio=fresh_ratio))
    assert torch.isfinite(out).all()
    err = (out - reference).abs().max() / reference.abs().max()
    assert 0 < err < bound
