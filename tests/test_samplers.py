"""Respacing, step announcements, one forward per step, and classifier-free guidance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rfc.samplers.diffusion import GaussianDiffusion, linear_betas, space_timesteps
from rfc.samplers.sampling import CFGDenoiser, DDIMSampler, DDPMSampler, StepInfo


def test_respacing_50_matches_the_official_set():
    steps = space_timesteps(1000, "50")
    assert len(steps) == 50
    assert steps == [round(i * 999 / 49) for i in range(50)]
    assert steps == sorted(set(np.linspace(0, 999, 50).round().astype(int).tolist()))
    assert steps[0] == 0 and steps[-1] == 999


def test_other_respacings():
    assert space_timesteps(1000, "ddim50") == list(range(0, 1000, 20))
    assert len(space_timesteps(1000, "250")) == 250
    sections = space_timesteps(1000, "10,15,20")
    assert len(sections) == 45
    assert sum(s < 334 for s in sections) == 10
    with pytest.raises(ValueError, match="respacing"):
        space_timesteps(1000, "fifty")
    with pytest.raises(ValueError, match="exactly 999 steps"):
        space_timesteps(1000, "ddim999")


def test_respaced_process_keeps_cumulative_alphas():
    base = np.cumprod(1 - linear_betas(1000))
    d = GaussianDiffusion(1000, "50")
    np.testing.assert_allclose(d.alphas_cumprod, base[d.timestep_map], rtol=1e-12)
    assert linear_betas(1000)[0] == pytest.approx(1e-4) and linear_betas(1000)[-1] == pytest.approx(0.02)


class Recorder:
    """Listener + fake model that log the order of events."""

    def __init__(self, out_channels: int = 2):
        self.events: list[tuple] = []
        self.out_channels = out_channels

    def begin_step(self, step: StepInfo):
        self.events.append(("begin", step.index, step.timestep, step.down_index))

    def end_step(self, step: StepInfo):
        self.events.append(("end", step.index))

    def __call__(self, x, t, y):
        self.events.append(("forward", tuple(t.tolist())))
        return torch.zeros(x.shape[0], self.out_channels, *x.shape[2:])


@pytest.mark.parametrize("sampler", [DDIMSampler(num_steps=50), DDPMSampler(num_steps=25)])
def test_listener_sees_every_step_once_with_one_forward(sampler):
    rec = Recorder()
    x = torch.randn(3, 1, 4, 4)
    sampler.sample(rec, x, torch.zeros(3, dtype=torch.long), noise=lambda: torch.randn(3, 1, 4, 4), listener=rec)
    n = sampler.num_steps
    assert len(rec.events) == 3 * n
    begins = [e for e in rec.events if e[0] == "begin"]
    assert [e[1] for e in begins] == list(range(n))
    timesteps = [e[2] for e in begins]
    assert timesteps == sorted(timesteps, reverse=True) and len(set(timesteps)) == n
    assert timesteps[0] == 999 and timesteps[-1] == 0
    assert [e[3] for e in begins] == list(range(n - 1, -1, -1))  # the official down-counting index
    for i in range(n):  # begin, exactly one forward with that timestep for all rows, end
        b, f, e = rec.events[3 * i : 3 * i + 3]
        assert b[0] == "begin" and f[0] == "forward" and e == ("end", i)
        assert f[1] == (b[2],) * 3


def test_sampler_rejects_inconsistent_respacing():
    with pytest.raises(ValueError, match="gives 50 steps"):
        DDIMSampler(num_steps=40, respacing="ddim50")


def test_cfg_guides_only_the_first_channels_in_one_forward():
    calls = []
    gen = torch.Generator().manual_seed(0)
    table = torch.randn(11, 8, 4, 4, generator=gen)  # output depends on the label (10 = null)

    def model(x, t, y):
        calls.append(y.clone())
        return table[y] + x.sum() * 0

    y = torch.tensor([1, 4, 7])
    den = CFGDenoiser(model, scale=1.5, null_class=10, guided_channels=3)
    out = den(torch.randn(3, 4, 4, 4), torch.tensor([5, 5, 5]), y)
    assert len(calls) == 1 and calls[0].tolist() == [1, 4, 7, 10, 10, 10]
    cond, uncond = table[y], table[torch.full_like(y, 10)]
    torch.testing.assert_close(out[:, :3], uncond[:, :3] + 1.5 * (cond[:, :3] - uncond[:, :3]), rtol=0, atol=1e-6)
    assert torch.equal(out[:, 3:], cond[:, 3:])  # unguided channels: the conditional half, untouched
    assert den.batch_multiplier == 2


def test_cfg_scale_one_is_a_plain_forward():
    seen = []

    def model(x, t, y):
        seen.append(x.shape[0])
        return torch.ones(x.shape[0], 2, 4, 4)

    den = CFGDenoiser(model, scale=1.0, null_class=10, guided_channels=1)
    den(torch.randn(3, 1, 4, 4), torch.zeros(3, dtype=torch.long), torch.zeros(3, dtype=torch.long))
    assert seen == [3] and den.batch_multiplier == 1


def test_ddim_recovers_the_data_point_when_eps_is_exact():
    """With an oracle eps for a single known x0, deterministic DDIM lands on x0."""
    d_sampler = DDIMSampler(num_steps=50, learn_sigma=False)
    d = d_sampler.diffusion
    x0 = torch.rand(2, 1, 4, 4) * 2 - 1
    ab = torch.from_numpy(np.cumprod(1 - linear_betas(1000))).float()

    def oracle(x, t, y):
        a = ab[t].view(-1, 1, 1, 1)
        return (x - a.sqrt() * x0) / (1 - a).sqrt()

    xT = torch.randn(2, 1, 4, 4)
    out = d_sampler.sample(oracle, xT, torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(out, x0, rtol=0, atol=1e-4)
    assert d.num_timesteps == 50
