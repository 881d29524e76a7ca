"""The flow-matching sampler of FLUX.1 and HunyuanVideo: Euler steps on the schedule their pipelines
use, in the harness's loop.

The schedule is diffusers' FlowMatchEulerDiscreteScheduler's own (its ``set_timesteps`` shifts the
sigmas the pipeline hands it: by the resolution-dependent mu of FluxPipeline, or by a fixed shift
for FLUX.1-schnell and HunyuanVideo), so the tables are the pipeline's to the bit. The sigmas
handed over are each pipeline's own expression of the same grid, which differ in the last bits:
FluxPipeline's linspace(1, 1/N, N) (``sigma_grid=flux``) and HunyuanVideoPipeline's
linspace(1, 0, N + 1)[:-1] (``sigma_grid=hunyuan``). The loop is the harness's: it announces every
step to the caching method (as the DiT samplers do), calls the denoiser once with the timestep as
the pipeline hands it to its transformer (FluxPipeline: ``timestep / 1000``, ``timestep_input=unit``;
HunyuanVideoPipeline: the scheduler's value itself, ``timestep_input=train``), and takes the Euler
step x + (sigma_next - sigma) * v in fp32, as the scheduler's ``step`` does.
"""

from __future__ import annotations

import numpy as np
import torch

from rfc.samplers.sampling import Denoiser, NoiseSource, Sampler, StepInfo, StepListener


def calculate_shift(image_seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float,
                    max_shift: float) -> float:
    """FluxPipeline's mu: linear in the number of image tokens between the two anchors."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * m + (base_shift - m * base_seq_len)


SIGMA_GRIDS = ("flux", "hunyuan")
TIMESTEP_INPUTS = ("unit", "train")


class FlowMatchEulerSampler(Sampler):
    """Euler steps of the flow-matching ODE from x_1 = noise (sigma 1) to x_0 (sigma 0)."""

    name = "flow_euler"

    def __init__(self, num_steps: int = 50, dynamic_shift: bool = True, shift: float = 3.0,
                 base_image_seq_len: int = 256, max_image_seq_len: int = 4096, base_shift: float = 0.5,
                 max_shift: float = 1.15, num_train_timesteps: int = 1000, sigma_grid: str = "flux",
                 timestep_input: str = "unit", **_: object) -> None:
        if not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"sampler.num_steps must be an integer >= 1, got {num_steps}")
        if float(shift) <= 0:
            raise ValueError(f"sampler.shift must be > 0, got {shift}")
        if max_image_seq_len <= base_image_seq_len:
            raise ValueError(f"sampler.max_image_seq_len ({max_image_seq_len}) must exceed sampler.base_image_seq_len "
                             f"({base_image_seq_len})")
        if sigma_grid not in SIGMA_GRIDS:
            raise ValueError(f"sampler.sigma_grid must be one of {', '.join(SIGMA_GRIDS)}, got {sigma_grid!r}")
        if timestep_input not in TIMESTEP_INPUTS:
            raise ValueError(f"sampler.timestep_input must be one of {', '.join(TIMESTEP_INPUTS)}, got "
                             f"{timestep_input!r}")
        self.sigma_grid, self.timestep_input = sigma_grid, timestep_input
        self.num_steps = num_steps
        self.respacing = None
        self.dynamic_shift, self.shift = bool(dynamic_shift), float(shift)
        self.base_image_seq_len, self.max_image_seq_len = int(base_image_seq_len), int(max_image_seq_len)
        self.base_shift, self.max_shift = float(base_shift), float(max_shift)
        self.num_train_timesteps = int(num_train_timesteps)
        self._tables: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def params(self) -> dict[str, object]:
        shift = {"dynamic_shift": True, "base_image_seq_len": self.base_image_seq_len,
                 "max_image_seq_len": self.max_image_seq_len, "base_shift": self.base_shift,
                 "max_shift": self.max_shift} if self.dynamic_shift else {"dynamic_shift": False, "shift": self.shift}
        if self.sigma_grid != "flux" or self.timestep_input != "unit":  # FLUX's settings keep their names
            shift.update(sigma_grid=self.sigma_grid, timestep_input=self.timestep_input)
        return shift

    def schedule(self, image_seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(timesteps (N,), sigmas (N + 1,)) in fp32 for ``image_seq_len`` packed image tokens,
        made by the scheduler exactly as FluxPipeline asks for them."""
        if image_seq_len not in self._tables:
            from diffusers import FlowMatchEulerDiscreteScheduler

            scheduler = FlowMatchEulerDiscreteScheduler(
                num_train_timesteps=self.num_train_timesteps, shift=self.shift,
                use_dynamic_shifting=self.dynamic_shift, base_shift=self.base_shift, max_shift=self.max_shift,
                base_image_seq_len=self.base_image_seq_len, max_image_seq_len=self.max_image_seq_len)
            n = self.num_steps
            sigmas = np.linspace(1.0, 1 / n, n) if self.sigma_grid == "flux" else np.linspace(1.0, 0.0, n + 1)[:-1]
            mu = calculate_shift(image_seq_len, self.base_image_seq_len, self.max_image_seq_len, self.base_shift,
                                 self.max_shift) if self.dynamic_shift else None
            scheduler.set_timesteps(sigmas=sigmas, mu=mu)
            self._tables[image_seq_len] = scheduler.timesteps.clone(), scheduler.sigmas.clone()
        return self._tables[image_seq_len]

    @property
    def timesteps(self) -> np.ndarray:
        """The 1024 px (4096-token) schedule's timesteps; the run's own depend on its resolution."""
        return self.schedule(4096)[0].numpy()

    def sample(self, denoiser: Denoiser, x: torch.Tensor, y: torch.Tensor, noise: NoiseSource | None = None,
               listener: StepListener | None = None) -> torch.Tensor:
        """Every step from x = noise (B, 16, h, w), or (B, 16, f, h, w) for video, and return the final
        latents (fp32). The resolution-dependent shift counts 2x2-packed tokens of every frame."""
        timesteps, sigmas = self.schedule(x[0, 0].numel() // 4)
        scale = 1000 if self.timestep_input == "unit" else 1
        sigmas = sigmas.to(x.device)
        x = x.float()
        for index in range(self.num_steps):
            t = timesteps[index].to(x.device)
            info = StepInfo(index=index, timestep=int(t.round()), num_steps=self.num_steps, value=float(t),
                            sigma=float(sigmas[index]))
            if listener is not None:
                listener.begin_step(info)
            out = denoiser(x, t.expand(x.shape[0]).to(x.dtype) / scale, y)
            if listener is not None:
                listener.end_step(info)
            x = x + (sigmas[index + 1] - sigmas[index]) * out.float()
        return x
