"""Sampling loops. A sampler owns time: before each model call it tells its listener the step's
forward-order index (0 = noisiest) and true timestep, then calls the denoiser exactly once.

Nothing here draws from the global RNG: the starting noise and any per-step noise come from a
:class:`NoiseSource`, which the runner builds from per-sample generators (see rfc.utils.seeding).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from rfc.samplers.diffusion import GaussianDiffusion

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
"""(x (B, c, S, S), model timesteps (B,), labels (B,)) -> model output (B, c_out, S, S)."""

NoiseSource = Callable[[], torch.Tensor]
"""Returns the next standard-normal tensor shaped like the sample batch."""


@dataclass(frozen=True)
class StepInfo:
    """One sampling step, as the sampler announces it.

    index: forward order, 0 = the first (noisiest) step, num_steps - 1 = the last.
    timestep: the original diffusion timestep the model is conditioned on (999 ... 0 for "50").
    The official caching code counts down instead (its step 49 is our index 0): that index is
    ``num_steps - 1 - index``, exposed as ``down_index``. value: the timestep unrounded, where the
    schedule's timesteps are not integers (flow matching), as a pipeline's ``current_timestep``
    holds it (what diffusers' timestep-gated cache hooks compare); None where ``timestep`` is exact.
    sigma: the noise level of the step's input where the sampler has one in [0, 1] (flow matching's
    ``scheduler.sigmas[index]``, what a pipeline hands diffusers' SeaCache), else None.
    """

    index: int
    timestep: int
    num_steps: int
    value: float | None = None
    sigma: float | None = None

    @property
    def down_index(self) -> int:
        return self.num_steps - 1 - self.index


class StepListener(Protocol):
    """Told of every step; caching methods implement it to know where the sampler is."""

    def begin_step(self, step: StepInfo) -> None: ...

    def end_step(self, step: StepInfo) -> None: ...


class Sampler:
    """Base of the loops: a respaced diffusion and the step announcements."""

    name = "base"

    def __init__(self, num_steps: int = 50, respacing: str | None = None, learn_sigma: bool = True,
                 num_train_timesteps: int = 1000) -> None:
        if num_steps < 1:
            raise ValueError(f"sampler.num_steps must be >= 1, got {num_steps}")
        respacing = str(num_steps) if respacing in (None, "") else str(respacing)
        self.respacing = respacing
        self.diffusion = GaussianDiffusion(num_train_timesteps, respacing, learn_sigma=learn_sigma)
        if self.diffusion.num_timesteps != num_steps:
            raise ValueError(
                f"sampler.respacing {respacing!r} gives {self.diffusion.num_timesteps} steps but sampler.num_steps is "
                f"{num_steps}"
            )
        self.num_steps = num_steps

    def params(self) -> dict[str, object]:
        """The sampler's own parameters beyond its name and steps, recorded in the row (they
        change the samples, so they are part of the setting)."""
        return {}

    @property
    def timesteps(self) -> np.ndarray:
        """Original timesteps in the order they are visited (descending)."""
        return self.diffusion.timestep_map[::-1].copy()

    def sample(self, denoiser: Denoiser, x: torch.Tensor, y: torch.Tensor, noise: NoiseSource | None = None,
               listener: StepListener | None = None) -> torch.Tensor:
        """Run every step from x = x_T and return x_0."""
        d = self.diffusion
        for index, k in enumerate(reversed(range(d.num_timesteps))):
            info = StepInfo(index=index, timestep=int(d.timestep_map[k]), num_steps=d.num_timesteps)
            t = torch.full((x.shape[0],), k, device=x.device, dtype=torch.long)
            if listener is not None:
                listener.begin_step(info)
            out = denoiser(x, d.model_timesteps(t), y)
            if listener is not None:
                listener.end_step(info)
            x = self.step(out, x, t, k, noise)
        return x

    def step(self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor, k: int,
             noise: NoiseSource | None) -> torch.Tensor:
        raise NotImplementedError


class DDIMSampler(Sampler):
    """DDIM (eta 0 by default: deterministic; the variance channels are ignored).

    The step coefficients are computed exactly as guided-diffusion's ``ddim_sample`` computes
    them: alpha_bar and alpha_bar_prev are read from the float64 tables as fp32 tensors, and
    sigma, sqrt(alpha_bar_prev) and sqrt(1 - alpha_bar_prev - sigma^2) are taken in fp32 torch.
    Taking those square roots in float64 lands a few ulps away from the official samples (the
    conformance tests pin this down bit for bit)."""

    name = "ddim"

    def __init__(self, num_steps: int = 50, respacing: str | None = None, eta: float = 0.0,
                 learn_sigma: bool = True, num_train_timesteps: int = 1000) -> None:
        super().__init__(num_steps, respacing, learn_sigma, num_train_timesteps)
        self.eta = eta

    def params(self) -> dict[str, object]:
        return {"eta": float(self.eta)}

    def step(self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor, k: int,
             noise: NoiseSource | None) -> torch.Tensor:
        d = self.diffusion
        pred = d.p_mean_variance(model_output, x, t)
        eps = d.predict_eps_from_xstart(x, t, pred.pred_xstart)
        a_bar = torch.tensor(d.alphas_cumprod[k], device=x.device).float()
        a_bar_prev = torch.tensor(d.alphas_cumprod_prev[k], device=x.device).float()
        sigma = self.eta * torch.sqrt((1 - a_bar_prev) / (1 - a_bar)) * torch.sqrt(1 - a_bar / a_bar_prev)
        x_prev = pred.pred_xstart * torch.sqrt(a_bar_prev) + torch.sqrt(1 - a_bar_prev - sigma**2) * eps
        if self.eta > 0 and k > 0:
            if noise is None:
                raise ValueError("DDIM with eta > 0 needs a noise source")
            x_prev = x_prev + sigma * noise()
        return x_prev


class DDPMSampler(Sampler):
    """Ancestral sampling with the learned-range variance (DiT's DDPM-250)."""

    name = "ddpm"

    def step(self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor, k: int,
             noise: NoiseSource | None) -> torch.Tensor:
        pred = self.diffusion.p_mean_variance(model_output, x, t)
        if k == 0:
            return pred.mean
        if noise is None:
            raise ValueError("DDPM sampling needs a noise source")
        return pred.mean + torch.exp(0.5 * pred.log_variance) * noise()


class CFGDenoiser:
    """Classifier-free guidance around a class-conditional model, in ONE batched forward.

    The batch is doubled to [x, x] with labels [y, null]; guidance eps = u + s (c - u) is applied
    to the first ``guided_channels`` output channels only (3 for the official DiT checkpoints, a
    quirk of the release kept for exact reproduction); the remaining channels (the fourth latent
    channel's eps and the variance values) are the conditional half's, unguided.
    Scale <= 1 means no guidance: a plain conditional forward, as DiT's sampling script does.
    """

    def __init__(self, model: Callable[..., torch.Tensor], scale: float, null_class: int,
                 guided_channels: int) -> None:
        self.model = model
        self.scale = float(scale)
        self.null_class = null_class
        self.guided_channels = guided_channels

    @property
    def batch_multiplier(self) -> int:
        """How many model rows one sample costs (2 with guidance): the B of the FLOPs formula."""
        return 2 if self.scale > 1.0 else 1

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The guided output; a caching method attached to the model (its ``cache_method``) gets
        the guidance-level hook first, whose default is ``guided``."""
        method = getattr(self.model, "cache_method", None)
        return self.guided(x, t, y) if method is None else method.guided_step(self, x, t, y)

    def rows(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The model's input rows: [x, x] with labels [y, null] under guidance, else (x, t, y)."""
        if self.scale <= 1.0:
            return x, t, y
        return torch.cat([x, x], dim=0), torch.cat([t, t], dim=0), torch.cat([y, torch.full_like(y, self.null_class)])

    def combine(self, out: torch.Tensor, batch: int) -> torch.Tensor:
        """The guided output from the model's output rows (conditional first, then unconditional)."""
        if self.scale <= 1.0:
            return out
        g = self.guided_channels
        cond, uncond = out[:batch, :g], out[batch:, :g]
        guided = uncond + self.scale * (cond - uncond)
        return torch.cat([guided, out[:batch, g:]], dim=1)

    def guided(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Both halves in one batched forward of the model, combined."""
        return self.combine(self.model(*self.rows(x, t, y)), x.shape[0])  # model output (2B, c_out, S, S)
