"""The Stable Diffusion VAE that DiT decodes its latents with (diffusers AutoencoderKL).

Where the weights come from: stabilityai/sd-vae-ft-ema (or -mse) in the user's Hugging Face cache,
as ``scripts/fetch_assets.py vae-ema`` puts them there with huggingface_hub's hf_hub_download, so a
VAE that diffusers or another project already fetched is reused instead of copied. Files that
earlier versions of fetch_assets downloaded into the assets folder (``<assets>/sd-vae-ft-ema``)
are used when the cache has no complete copy. The runner never downloads: lookups are
``local_files_only`` and a missing VAE is named, with the fetch command, before any sampling.
``random_vae`` builds the same architecture with random weights, for exercising the pipeline
without assets (its images are noise, its timing is real).
"""

from __future__ import annotations

import re
from pathlib import Path

import torch

from rfc.models.load import FETCH_HINT, MissingAssetError, check_finite
from rfc.utils.errors import RunError, reason

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


VAE_REPOS = {"ema": "stabilityai/sd-vae-ft-ema", "mse": "stabilityai/sd-vae-ft-mse"}
VAE_CONFIG = "config.json"
VAE_WEIGHTS = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")  # either; the first is fetched


def vae_repo(name: str) -> str:
    """The Hugging Face repository of a named VAE ("ema" -> stabilityai/sd-vae-ft-ema)."""
    return VAE_REPOS.get(name, f"stabilityai/sd-vae-ft-{name}")


def legacy_vae_folder(assets: str | Path, name: str) -> Path:
    """Where fetch_assets put a VAE before it used the Hugging Face cache (assets/sd-vae-ft-ema)."""
    return Path(assets) / f"sd-vae-ft-{name}"


def cached_vae_folder(name: str) -> Path | None:
    """The Hugging Face cache's snapshot folder holding the VAE's config and weights (one
    revision: from_pretrained loads a folder), or None. ``local_files_only``: no request is made,
    with or without a network."""
    from huggingface_hub import hf_hub_download

    def cached(filename: str) -> Path | None:
        try:
            return Path(hf_hub_download(vae_repo(name), filename, local_files_only=True))
        except OSError:  # LocalEntryNotFoundError: not in the cache (a FileNotFoundError)
            return None
        except ValueError:  # a cache folder it cannot read as one (e.g. a bad refs file)
            return None

    config = cached(VAE_CONFIG)
    if config is None:
        return None
    for weights in VAE_WEIGHTS:
        path = cached(weights)
        if path is not None and path.parent == config.parent:
            return config.parent
    return None


def vae_folder(assets: str | Path, name: str) -> Path:
    """Folder of a named VAE: its Hugging Face cache snapshot when complete there, else the assets
    folder's copy from an earlier fetch_assets (returned even when absent: check_vae_folder then
    names what is missing and the command that fetches it)."""
    return cached_vae_folder(name) or legacy_vae_folder(assets, name)


def fetch_command(folder: str | Path) -> str:
    """The fetch_assets command for the VAE in ``folder`` (a cache snapshot or an assets folder)."""
    match = re.search(r"sd-vae-ft-([a-z0-9]+)", str(folder))
    return f"{FETCH_HINT} vae-{match.group(1) if match else 'ema'}"


def check_vae_folder(folder: str | Path) -> Path:
    """Fail fast, before any sampling, when the VAE folder is incomplete, naming both places the
    VAE is looked for and the command that fills the first."""
    folder = Path(folder)
    weights = [folder / w for w in VAE_WEIGHTS]
    if not (folder / VAE_CONFIG).is_file() or not any(w.is_file() for w in weights):
        match = re.search(r"sd-vae-ft-([a-z0-9]+)", folder.name)
        repo = vae_repo(match.group(1)) if match else folder.name
        raise MissingAssetError(
            f"missing VAE ({folder.name}): {repo} is not in the Hugging Face cache ({_hub_cache()}) and {folder} "
            f"holds no config.json and weights. Fetch it with `{fetch_command(folder)}` (it goes to the Hugging "
            "Face cache; the runner never downloads).")
    return folder


def load_vae(folder: str | Path) -> torch.nn.Module:
    """The VAE in ``folder`` (from vae_folder), checked for NaN or infinity; a damaged file is one
    RunError saying how to replace it (a cached copy must be deleted first: fetch_assets finds it
    present otherwise)."""
    from diffusers.models import AutoencoderKL
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # its install hints (accelerate) would bury the run's own lines
    folder = check_vae_folder(folder)
    fetch = fetch_command(folder)
    in_cache = folder.parent.name == "snapshots"
    again = (f"delete the cached copy ({folder.parents[1]}) and fetch it again (`{fetch}`)" if in_cache
             else f"fetch them again (`{fetch}`)")
    try:
        vae = AutoencoderKL.from_pretrained(str(folder), local_files_only=True)
    except Exception as err:  # diffusers, safetensors and json raise their own types for damaged files
        raise RunError(f"cannot load the VAE from {folder} ({reason(err)}); its files are damaged "
                       f"or incomplete: {again}") from err
    check_finite(vae.state_dict(), f"VAE {folder}", again)
    return vae.eval().requires_grad_(False)


def _hub_cache() -> Path:
    """The Hugging Face cache folder (HF_HUB_CACHE, else HF_HOME/hub), for messages."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


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
