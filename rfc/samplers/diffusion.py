"""Gaussian diffusion as DiT uses it: 1000 linear betas, learned-range variance, respacing.

The respacing rules and the learned-range variance follow guided-diffusion (which DiT ships), so
"50", "250" and "ddim50" select exactly the timesteps the official code selects and a
respaced process hands the model the original integer timesteps.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch


def linear_betas(num_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """DiT's schedule: betas linear in [1e-4, 0.02], scaled so any length keeps the same shape."""
    scale = 1000 / num_timesteps
    return np.linspace(scale * beta_start, scale * beta_end, num_timesteps, dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | int | list[int]) -> list[int]:
    """Timesteps kept by a respacing string, in increasing order (guided-diffusion's rules).

    "50" keeps round(i * 999 / 49), i = 0..49; "10,15,20" splits the range into three equal
    sections and keeps that many evenly spaced steps from each; "ddimN" keeps range(0, T, s)
    for the integer stride s that yields exactly N steps.
    """
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim") :])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return list(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride from "
                             f"{num_timesteps}")
        try:
            counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise ValueError(f"bad timestep respacing {section_counts!r}: expected e.g. '50', '250', "
                             "'ddim50'") from None
    elif isinstance(section_counts, int):
        counts = [section_counts]
    else:
        counts = list(section_counts)
    size_per = num_timesteps // len(counts)
    extra = num_timesteps % len(counts)
    start_idx = 0
    all_steps: list[int] = []
    for i, section_count in enumerate(counts):
        size = size_per + (1 if i < extra else 0)
        if size < section_count:
            raise ValueError(f"cannot divide a section of {size} steps into {section_count}")
        if section_count < 1:
            raise ValueError(f"a respacing section needs at least one step, got {section_count}")
        frac_stride = 1 if section_count <= 1 else (size - 1) / (section_count - 1)
        cur_idx = 0.0
        for _ in range(section_count):
            all_steps.append(start_idx + round(cur_idx))
            cur_idx += frac_stride
        start_idx += size
    return sorted(set(all_steps))


def _extract(arr: np.ndarray, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """arr[t] broadcast to x's shape, in x's dtype (the tables are float64 numpy, as upstream)."""
    out = torch.from_numpy(arr).to(device=t.device)[t].float()
    return out.reshape(-1, *([1] * (x.dim() - 1))).expand_as(x).to(x.dtype)


@dataclass
class Prediction:
    mean: torch.Tensor
    variance: torch.Tensor
    log_variance: torch.Tensor
    pred_xstart: torch.Tensor
    eps: torch.Tensor


class GaussianDiffusion:
    """A (possibly respaced) diffusion process. Index k runs over the kept steps in increasing
    noise; ``timestep_map[k]`` is the original timestep the model is conditioned on."""

    def __init__(self, num_timesteps: int = 1000, respacing: str | int | list[int] | None = None,
                 learn_sigma: bool = True) -> None:
        base_betas = linear_betas(num_timesteps)
        base_alphas_cumprod = np.cumprod(1.0 - base_betas)
        use = space_timesteps(num_timesteps, respacing) if respacing not in (None, "") else list(range(num_timesteps))
        # Respaced betas keep the cumulative products of the kept steps.
        betas, last = [], 1.0
        for t in use:
            betas.append(1 - base_alphas_cumprod[t] / last)
            last = base_alphas_cumprod[t]
        self.original_num_timesteps = num_timesteps
        self.timestep_map = np.asarray(use, dtype=np.int64)
        self.learn_sigma = learn_sigma
        self.betas = np.asarray(betas, dtype=np.float64)
        self.num_timesteps = len(self.betas)
        alphas = 1.0 - self.betas
        self.alphas_cumprod = np.cumprod(alphas)
        self.alphas_cumprod_prev = np.append(1.0, self.alphas_cumprod[:-1])
        self.sqrt_alphas_cumprod = np.sqrt(self.alphas_cumprod)
        self.sqrt_one_minus_alphas_cumprod = np.sqrt(1.0 - self.alphas_cumprod)
        self.sqrt_recip_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod)
        self.sqrt_recipm1_alphas_cumprod = np.sqrt(1.0 / self.alphas_cumprod - 1)
        self.posterior_variance = self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        # The first posterior variance is 0; log of it is clipped to the next value (upstream rule).
        self.posterior_log_variance_clipped = np.log(np.append(self.posterior_variance[1], self.posterior_variance[1:]))
        self.posterior_mean_coef1 = self.betas * np.sqrt(self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)
        self.posterior_mean_coef2 = (1.0 - self.alphas_cumprod_prev) * np.sqrt(alphas) / (1.0 - self.alphas_cumprod)

    # ---- forward process --------------------------------------------------------------------
    def q_sample(self, x_start: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return (_extract(self.sqrt_alphas_cumprod, t, x_start) * x_start
                + _extract(self.sqrt_one_minus_alphas_cumprod, t, x_start) * noise)

    def q_posterior(self, x_start: torch.Tensor, x_t: torch.Tensor,
                    t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = (_extract(self.posterior_mean_coef1, t, x_t) * x_start
                + _extract(self.posterior_mean_coef2, t, x_t) * x_t)
        return mean, _extract(self.posterior_log_variance_clipped, t, x_t)

    # ---- model output -> distribution -------------------------------------------------------
    def model_timesteps(self, t: torch.Tensor) -> torch.Tensor:
        """Original timesteps the model is conditioned on for respaced indices t."""
        return torch.from_numpy(self.timestep_map).to(t.device)[t]

    def p_mean_variance(self, model_output: torch.Tensor, x: torch.Tensor, t: torch.Tensor,
                        clip_denoised: bool = False) -> Prediction:
        """Split eps / variance values and form p(x_{t-1} | x_t) as guided-diffusion does."""
        C = x.shape[1]
        if self.learn_sigma:
            if model_output.shape[1] != 2 * C:
                raise ValueError(f"learned-sigma model must output {2 * C} channels, got {model_output.shape[1]}")
            eps, var_values = model_output[:, :C], model_output[:, C:]
            min_log = _extract(self.posterior_log_variance_clipped, t, x)
            max_log = _extract(np.log(self.betas), t, x)
            frac = (var_values + 1) / 2  # model outputs [-1, 1] -> interpolation weight
            log_variance = frac * max_log + (1 - frac) * min_log
            variance = torch.exp(log_variance)
        else:
            eps = model_output[:, :C]
            # fixed-large variance, as upstream's default for non-learned sigma
            var = np.append(self.posterior_variance[1], self.betas[1:])
            variance = _extract(var, t, x)
            log_variance = _extract(np.log(var), t, x)
        pred_xstart = self.predict_xstart_from_eps(x, t, eps)
        if clip_denoised:
            pred_xstart = pred_xstart.clamp(-1, 1)
        mean, _ = self.q_posterior(pred_xstart, x, t)
        return Prediction(mean, variance, log_variance, pred_xstart, eps)

    def predict_xstart_from_eps(self, x_t: torch.Tensor, t: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
        return (_extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t
                - _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t) * eps)

    def predict_eps_from_xstart(self, x_t: torch.Tensor, t: torch.Tensor, pred_xstart: torch.Tensor) -> torch.Tensor:
        return ((_extract(self.sqrt_recip_alphas_cumprod, t, x_t) * x_t - pred_xstart)
                / _extract(self.sqrt_recipm1_alphas_cumprod, t, x_t))

    # ---- training loss (epsilon MSE + variational bound for the learned variance) -----------
    def training_losses(self, model_output: torch.Tensor, x_start: torch.Tensor, x_t: torch.Tensor,
                        t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Per-sample hybrid loss of improved DDPM as DiT trains: MSE on eps plus the VLB term,
        whose gradient reaches only the variance (the mean is detached)."""
        C = x_t.shape[1]
        mse = ((noise - model_output[:, :C]) ** 2).mean(dim=(1, 2, 3))
        if not self.learn_sigma:
            return mse
        frozen = torch.cat([model_output[:, :C].detach(), model_output[:, C:]], dim=1)
        pred = self.p_mean_variance(frozen, x_t, t)
        true_mean, true_log_var = self.q_posterior(x_start, x_t, t)
        kl = normal_kl(true_mean, true_log_var, pred.mean, pred.log_variance).mean(dim=(1, 2, 3)) / math.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x_start, pred.mean, 0.5 * pred.log_variance)
        nll = nll.mean(dim=(1, 2, 3)) / math.log(2.0)
        vb = torch.where(t == 0, nll, kl)
        return mse + vb


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N1 || N2) elementwise, in nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def _approx_standard_normal_cdf(x: torch.Tensor) -> torch.Tensor:
    return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x.pow(3))))


def discretized_gaussian_log_likelihood(x: torch.Tensor, means: torch.Tensor, log_scales: torch.Tensor) -> torch.Tensor:
    """Log-likelihood of data in [-1, 1] quantised to 256 levels under N(means, exp(log_scales)^2)."""
    centered = x - means
    inv_stdv = torch.exp(-log_scales)
    cdf_plus = _approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = _approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1.0 - cdf_min).clamp(min=1e-12))
    cdf_delta = cdf_plus - cdf_min
    return torch.where(
        x < -0.999, log_cdf_plus,
        torch.where(x > 0.999, log_one_minus_cdf_min, torch.log(cdf_delta.clamp(min=1e-12))),
    )
