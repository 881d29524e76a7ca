"""The Stable Diffusion VAE that DiT decodes its latents with (diffusers AutoencoderKL).

Loaded from a local folder only (config.json + weights, as `scripts/fetch_assets.py` lays it
out): the runner never downloads. ``random_vae`` builds the same architecture with random
weights, for exercising the pipeline without assets (its images are noise, its timing is real).
"""

from __future__ import annotations

from pathlib import Path

import torch

from rfc.errors import RunError, reason
from rfc.models.load import FETCH_HINT, check_finite, require_file

LATENT_SCALE = 0.18215  # DiT divides latents by this before decoding
LATENT_DOWNSAMPLE = 8

# Architecture of stabilityai/sd-vae-ft-ema and -mse (from their config.json).
SD_VAE_CONFIG: dict[str, object] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
}


def vae_folder(assets: str | Path, name: str) -> Path:
    """Folder of a named VAE ("ema" -> assets/sd-vae-ft-ema)."""
    return Path(assets) / f"sd-vae-ft-{name}"


def check_vae_folder(folder: str | Path) -> Path:
    """Fail fast, before any sampling, when the VAE folder is incomplete."""
    folder = Path(folder)
    require_file(folder / "config.json", f"VAE config ({folder.name})")
    weights = [folder / "diffusion_pytorch_model.safetensors", folder / "diffusion_pytorch_model.bin"]
    if not any(w.exists() for w in weights):
        require_file(weights[0], f"VAE weights ({folder.name})")
    return folder


def load_vae(folder: str | Path) -> torch.nn.Module:
    from diffusers.models import AutoencoderKL
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its install hints (accelerate) would bury the run's own lines
    folder = check_vae_folder(folder)
    fetch = f"{FETCH_HINT} {folder.name.replace('sd-vae-ft-', 'vae-')}"
    try:
        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # diffusers, safetensors and json raise their own types for damaged files
        raise RunError(f"cannot load the VAE from {folder} ({reason(err)}); its files are damaged "
                       f"or incomplete: fetch them again (`{fetch}`)") from err
    check_finite(vae.state_dict(), f"VAE {folder}", f"fetch it again (`{fetch}`)")
    return vae.eval().requires_grad_(False)


def random_vae(seed: int = 0) -> torch.nn.Module:
    from diffusers.models import AutoencoderKL

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKL(**SD_VAE_CONFIG)
    return vae.eval().requires_grad_(False)


@torch.no_grad()
def decode(vae: torch.nn.Module, latents: torch.Tensor) -> torch.Tensor:
    """Latents (B, 4, s, s) -> images (B, 3, 8s, 8s) in about [-1, 1]. A VAE with its own latent
    scaling (FLUX's, rfc.models.flux.FluxVAE) decodes through its ``decode_images``."""
    if hasattr(vae, "decode_images"):
        return vae.decode_images(latents)
    return vae.decode(latents / LATENT_SCALE).sample
