"""The native attention-reuse methods against their peer and their official code.

- Pyramid Attention Broadcast (``method=pab``, from VideoSys's PAB manager) equals diffusers'
  PyramidAttentionBroadcast hook on FLUX's own forward (``method=diffusers/pyramid_attention_broadcast``):
  the same steps, the same latents and the same accounting, bit for bit, at several ranges and
  windows; on DiT its window reads the model's integer timestep.
- FasterCache (``method=fastercache``, from Vchitect/FasterCache's Latte script): its attention
  reuse at weight 0 equals diffusers' FasterCache hook (whose cache also keeps extrapolated outputs,
  so the two differ at other weights); at weight 0.5 it equals the official block rule written out
  below as hooks on FLUX's own attention modules; its CFG-Cache equals the official model-forward
  rule written out below around DiT-tiny (both bit for bit), and charges the conditional-only
  forwards for half the rows.
"""

from __future__ import annotations

import functools

import pytest
import torch
from test_cache import sample_with
from test_cache import tiny as tiny  # noqa: F401 - the DiT-tiny fixture
from test_flux import sample
from test_peers import counts
from test_peers import flux as flux  # noqa: F401 - the flux-tiny fixture

from baselines.diffusers_hooks import FasterCache as DiffusersFasterCache
from baselines.diffusers_hooks import PyramidAttentionBroadcast as DiffusersPAB
from baselines.fastercache import FasterCache
from baselines.pab import PyramidAttentionBroadcast
from rfc.cache import NoCache
from rfc.samplers.sampling import DDIMSampler, StepInfo

STEPS = 28


class ForwardBy(NoCache):
    """Full compute with the model's forward replaced by ``forward`` (an official rule written around
    the model), nothing else changed."""

    def __init__(self, forward) -> None:
        super().__init__()
        self.forward = forward

    def attach(self, model):
        super().attach(model)
        model.forward = self.forward

    def detach(self):
        vars(self.model).pop("forward", None)
        super().detach()


@pytest.mark.parametrize(("skip", "window"), [(2, [100, 800]), (3, [100, 900]), (2, [-1, 2000])])
def test_pab_equals_diffusers_pyramid_attention_broadcast(flux, skip, window):
    model, x, y = flux
    ours, ours_stats = sample(model, x, y, PyramidAttentionBroadcast(skip, window), steps=STEPS)
    theirs, their_stats = sample(model, x, y, DiffusersPAB(skip, window), steps=STEPS)
    assert 0 < ours_stats.cached_steps < STEPS
    assert their_stats.full_indices == ours_stats.full_indices
    assert torch.equal(theirs, ours)
    assert counts(their_stats) == counts(ours_stats)
    assert ours_stats.partial_total_tokens  # single-stream blocks: attention reused, MLP computed


def test_pab_window_reads_the_truncated_model_timestep():
    pab = PyramidAttentionBroadcast(2, [100, 800])
    # DiT's integer timesteps; flow matching's are truncated as int(timestep[0]) is
    assert [pab.decide(StepInfo(i, t, 10)) for i, t in ((1, 799), (1, 800), (3, 101), (3, 100), (2, 500))] == \
        [False, True, False, True, True]
    assert pab.decide(StepInfo(1, 101, 10, value=100.7)) is True  # int(100.7) = 100 is not inside (100, 800)


def _timesteps(model, x, y) -> list[float]:
    seen: list[float] = []

    class Watch(NoCache):
        def begin_step(self, step: StepInfo) -> None:
            seen.append(step.value)
            super().begin_step(step)

    sample(model, x, y, Watch(), steps=STEPS)
    return seen


def test_fastercache_attention_at_weight_0_equals_diffusers_faster_cache(flux):
    """diffusers' window ends between the 15th and the 16th forward, where the script's reuse starts."""
    model, x, y = flux
    ts = _timesteps(model, x, y)
    ours, ours_stats = sample(model, x, y, FasterCache(attention_weight=0.0), steps=STEPS)
    theirs, their_stats = sample(model, x, y, DiffusersFasterCache(2, [-1, (ts[14] + ts[15]) / 2], 0.0), steps=STEPS)
    assert ours_stats.full_indices == list(range(15)) + list(range(16, STEPS, 2))
    assert their_stats.full_indices == ours_stats.full_indices
    assert torch.equal(theirs, ours)
    assert counts(their_stats) == counts(ours_stats)


class OfficialAttentionReuse:
    """Vchitect/FasterCache's Latte block rule on each attention module of a diffusers transformer:
    its own forward counter; the outputs of computed forwards kept from forward ``cache_start`` on
    (``sacache``); from ``start`` on, at even counters, ``last + (last - previous) * weight`` instead
    of the computed output (per tensor of a tuple output)."""

    def __init__(self, transformer: torch.nn.Module, cache_start: int, start: int, weight: float) -> None:
        self.cache_start, self.start, self.weight = cache_start, start, weight
        blocks = [*transformer.transformer_blocks, *transformer.single_transformer_blocks]
        self.state = {id(b.attn): {"counter": 0, "cache": None} for b in blocks}
        self.handles = [b.attn.register_forward_hook(self.hook) for b in blocks]

    def hook(self, module, _args, output):
        st = self.state[id(module)]
        st["counter"] += 1
        counter = st["counter"]
        outs = output if isinstance(output, tuple) else (output,)
        if counter >= self.start and counter % 2 == 0:
            outs = tuple(last + (last - prev) * self.weight for prev, last in zip(*st["cache"], strict=True))
        elif counter == self.cache_start:
            st["cache"] = [outs, outs]
        elif counter > self.cache_start:
            st["cache"] = [st["cache"][-1], outs]
        return outs if isinstance(output, tuple) else outs[0]

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def test_fastercache_attention_equals_the_official_block_rule(flux):
    model, x, y = flux
    ours, stats = sample(model, x, y, FasterCache(attention_weight=0.5), steps=STEPS)
    official = OfficialAttentionReuse(model.transformer, cache_start=13, start=16, weight=0.5)
    try:  # FLUX's own forward, with the official rule on its attention modules
        theirs, _ = sample(model, x, y, ForwardBy(model.native_forward), steps=STEPS)
    finally:
        official.remove()
    assert stats.cached_steps == len(range(16, STEPS + 1, 2))
    assert torch.equal(theirs, ours)
    weight0, _ = sample(model, x, y, FasterCache(attention_weight=0.0), steps=STEPS)
    assert not torch.equal(weight0, ours)  # the extrapolation is not a reuse


def band_split(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The official ``fft``: fft2, fftshift over every axis, a disc of radius min(H, W) // 5 as the
    low band (meshgrid's default ij indexing: Y rows, X columns)."""
    shifted = torch.fft.fftshift(torch.fft.fft2(t))
    _, _, H, W = t.shape
    Y, X = torch.meshgrid(torch.arange(H), torch.arange(W), indexing="ij")
    mask = ((X - W // 2) ** 2 + (Y - H // 2) ** 2 <= (min(H, W) // 5) ** 2)[None, None]
    return shifted * mask, shifted * ~mask


class OfficialCFGCache(torch.nn.Module):
    """Vchitect/FasterCache's Latte model forward around a model that receives the guided batch
    (conditional rows first in the harness): from forward 18 on, except at multiples of 5, the
    conditional rows alone, the unconditional estimate from the stored deltas (low band scaled by
    1.1 below forward 45, else the high band above 35); full forwards from 16 on store the deltas."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model, self.counter = functools.partial(type(model).forward, model), 0  # the class's own forward

    def forward(self, x, t, y):
        self.counter += 1
        B = x.shape[0] // 2
        if self.counter >= 18 and self.counter % 5 != 0:
            cond = self.model(x[:B], t[:B], y[:B])
            lf_c, hf_c = band_split(cond.float())
            if self.counter < 45:
                self.delta_lf = self.delta_lf * 1.1
            elif self.counter > 35:
                self.delta_hf = self.delta_hf * 1.1
            uncond = torch.fft.ifft2(torch.fft.ifftshift((self.delta_lf + lf_c) + (self.delta_hf + hf_c))).real
            return torch.cat([cond, uncond.to(cond.dtype)])
        out = self.model(x, t, y)
        if self.counter >= 16:
            lf_c, hf_c = band_split(out[:B].float())
            lf_uc, hf_uc = band_split(out[B:].float())
            self.delta_hf, self.delta_lf = hf_uc - hf_c, lf_uc - lf_c
        return out


def test_fastercache_cfg_cache_equals_the_official_model_forward(tiny):  # noqa: F811 - the fixture
    sampler = DDIMSampler(num_steps=50)
    method = FasterCache(attention_start=None)
    ours = sample_with(tiny, method, sampler, guided=1)
    stats = method.stats()
    theirs = sample_with(tiny, ForwardBy(OfficialCFGCache(tiny).forward), sampler, guided=1)
    conditional_only = [c for c in range(18, 51) if c % 5 != 0]
    assert stats.cached_steps == len(conditional_only) and stats.full_steps == 50 - len(conditional_only)
    assert list(stats.reduced_rows) == [0.5]  # those forwards are charged half the guided rows
    assert torch.equal(theirs, ours)
    both = FasterCache()  # and with the attention reuse on top, DiT's attention sites extrapolate
    sample_with(tiny, both, sampler, guided=1)
    assert both.stats().cached_sites > 0 and both.stats().cached_steps > stats.cached_steps


def test_fastercache_settings_are_checked():
    with pytest.raises(ValueError, match="method.attention_start"):
        FasterCache(cache_start=13, attention_start=13)
    with pytest.raises(ValueError, match="method.cfg_start"):
        FasterCache(delta_start=16, cfg_start=16)
    with pytest.raises(ValueError, match="method.spatial_range"):
        PyramidAttentionBroadcast(0)
