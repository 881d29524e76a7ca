"""rfc.models.vae: the VAE is found in the Hugging Face cache (where fetch_assets puts it with
hf_hub_download), else in an earlier version's assets folder, and never downloaded at run time."""

from __future__ import annotations

import socket
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch

from rfc.models.load import MissingAssetError
from rfc.models.vae import cached_vae_folder, check_vae_folder, legacy_vae_folder, load_vae, vae_folder
from rfc.utils.errors import RunError

SMALL_VAE = dict(block_out_channels=(8,), down_block_types=("DownEncoderBlock2D",),
                 up_block_types=("UpDecoderBlock2D",), layers_per_block=1, latent_channels=4, norm_num_groups=8)


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch) -> Path:
    cache = tmp_path / "hf"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def offline(monkeypatch) -> None:
    """Any network connection fails the test: the runner must never download."""
    def refuse(*args, **kwargs):
        raise AssertionError(f"network access at run time: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def _save_vae(folder: Path, seed: int) -> torch.nn.Module:
    from diffusers.models import AutoencoderKL

    torch.manual_seed(seed)
    vae = AutoencoderKL(**SMALL_VAE)
    vae.save_pretrained(folder)  # config.json + diffusion_pytorch_model.safetensors
    return vae


def _cached_vae(cache: Path, name: str, seed: int, commit: str = "a" * 40) -> Path:
    repo = cache / f"models--stabilityai--sd-vae-ft-{name}"
    snap = repo / "snapshots" / commit
    _save_vae(snap, seed)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    return snap


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


def test_the_cache_comes_first_and_the_assets_folder_is_the_fallback(hf_cache, tmp_path, offline):
    assets = tmp_path / "assets"
    legacy = _save_vae(legacy_vae_folder(assets, "ema"), seed=1)
    assert cached_vae_folder("ema") is None
    assert vae_folder(assets, "ema") == assets / "sd-vae-ft-ema"  # files of an earlier fetch_assets
    assert _same(load_vae(vae_folder(assets, "ema")), legacy)

    snap = _cached_vae(hf_cache, "ema", seed=2)
    cached = _save_vae(tmp_path / "copy", seed=2)
    assert vae_folder(assets, "ema") == snap == cached_vae_folder("ema")
    assert _same(load_vae(vae_folder(assets, "ema")), cached)
    assert cached_vae_folder("mse") is None  # each VAE its own repository


def test_a_missing_vae_names_both_places_and_the_fetch_command(hf_cache, tmp_path, offline):
    folder = vae_folder(tmp_path / "assets", "mse")
    with pytest.raises(MissingAssetError) as err:
        check_vae_folder(folder)
    msg = str(err.value)
    assert "stabilityai/sd-vae-ft-mse is not in the Hugging Face cache" in msg and str(hf_cache) in msg
    assert str(folder) in msg and "`python scripts/fetch_assets.py vae-mse`" in msg
    # a cache entry without weights (an interrupted fetch) is not a VAE folder
    repo = hf_cache / "models--stabilityai--sd-vae-ft-mse"
    (repo / "snapshots" / "b").mkdir(parents=True)
    (repo / "snapshots" / "b" / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("b")
    assert cached_vae_folder("mse") is None


def test_a_damaged_cached_vae_says_to_delete_it(hf_cache, tmp_path, offline):
    snap = _cached_vae(hf_cache, "ema", seed=0)
    (snap / "diffusion_pytorch_model.safetensors").write_bytes(b"\0" * 64)
    with pytest.raises(RunError) as err:
        load_vae(vae_folder(tmp_path / "assets", "ema"))
    assert f"damaged or incomplete: delete the cached copy ({snap.parents[1]})" in str(err.value)
    assert "and fetch it again (`python scripts/fetch_assets.py vae-ema`)" in str(err.value)
