"""fetch_assets: resumable downloads with size / checksum checks, against a loopback server; the
Hugging Face entries (FLUX, the text-to-image metrics) offline, with snapshot_download replaced."""

from __future__ import annotations

import hashlib
import http.server
import threading
import types
from pathlib import Path

import huggingface_hub
import huggingface_hub.constants
import pytest
import torch
from huggingface_hub.errors import GatedRepoError, HfHubHTTPError

from scripts.fetch_assets import ASSETS, DEFAULT, HUB, VAES, Asset, HubFiles, asset_dest, fetch, main, select

PAYLOAD = bytes(range(256)) * 4000  # about 1 MB


class RangeHandler(http.server.BaseHTTPRequestHandler):
    requests: list[str | None] = []

    def do_GET(self):  # noqa: N802 - http.server's naming
        rng = self.headers.get("Range")
        RangeHandler.requests.append(rng)
        if self.path != "/file.bin":
            self.send_error(404)
            return
        start = int(rng.split("=")[1].split("-")[0]) if rng else 0
        body = PAYLOAD[start:]
        self.send_response(206 if rng else 200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), RangeHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    RangeHandler.requests = []
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def test_resumes_a_partial_download(server, tmp_path: Path):
    digest = hashlib.sha256(PAYLOAD).hexdigest()
    asset = Asset("t", f"{server}/file.bin", "sub/file.bin", sha256_prefix=digest[:12], size=len(PAYLOAD))
    part = tmp_path / "sub" / "file.bin.part"
    part.parent.mkdir()
    part.write_bytes(PAYLOAD[:300_000])
    out = fetch(asset, tmp_path, quiet=True)
    assert out.read_bytes() == PAYLOAD and not part.exists()
    assert RangeHandler.requests == ["bytes=300000-"]
    fetch(asset, tmp_path, quiet=True)  # already present: verified, not downloaded again
    assert len(RangeHandler.requests) == 1


def test_checksum_mismatch_discards_the_download(server, tmp_path: Path):
    asset = Asset("t", f"{server}/file.bin", "file.bin", sha256_prefix="0000dead")
    with pytest.raises(ValueError, match="sha256"):
        fetch(asset, tmp_path, quiet=True)
    assert not (tmp_path / "file.bin").exists() and not (tmp_path / "file.bin.part").exists()


def test_registry_covers_what_the_configs_need():
    paths = {a.path for a in ASSETS}
    assert {"DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt", "VIRTUAL_imagenet256_labeled.npz"} <= paths
    # the VAEs: two files each of the stabilityai repositories, into the Hugging Face cache
    assert select(["vae-ema", "vae-mse"]) == list(VAES) and all(isinstance(v, HubFiles) for v in VAES)
    assert [(v.repo_id, v.files) for v in VAES] == [
        (f"stabilityai/sd-vae-ft-{v}", ("config.json", "diffusion_pytorch_model.safetensors")) for v in ("ema", "mse")]


def test_listing_names_every_entry_and_group(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in (*(a.name for a in ASSETS), "vae-ema", "vae-mse", "flux-dev", "flux-schnell", "clip-vit-large-patch14",
                 "lpips", "image-reward-weights", "image-reward-tokenizer"):
        assert f"\n{name} " in f"\n{out}", name
    assert "https://huggingface.co/black-forest-labs/FLUX.1-dev (gated" in out
    assert "t2i-metrics = clip-vit-large-patch14 + image-reward + lpips" in out
    assert [e.name for e in select(["t2i-metrics"])] == ["clip-vit-large-patch14", "image-reward-weights",
                                                         "image-reward-tokenizer", "lpips"]
    assert [e.name for e in select(["flux-dev", "flux-dev"])] == ["flux-dev"]
    assert {e.name for e in select([])} == {*(a.name for a in ASSETS if a.name != "lpips"), "vae-ema", "vae-mse"}
    assert "lpips" not in DEFAULT and "flux-dev" not in DEFAULT
    with pytest.raises(SystemExit, match="unknown asset 'flux-pro'"):
        select(["flux-pro"])


def test_lpips_goes_where_torchvision_looks(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(torch.hub, "_hub_dir", str(tmp_path / "hub"))
    (lpips,) = select(["lpips"])
    assert asset_dest(lpips, tmp_path / "assets") / lpips.path == tmp_path / "hub" / "checkpoints" / lpips.path


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch) -> Path:
    cache = tmp_path / "hf"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def refusing(status: int, cls: type = GatedRepoError):
    def snapshot_download(repo_id, **kwargs):
        response = types.SimpleNamespace(status_code=status, headers={}, request=None)
        raise cls(f"{status} Client Error. Cannot access gated repo for url https://huggingface.co/{repo_id}",
                  response=response)
    return snapshot_download


def test_gated_refusal_is_one_clear_line(hf_cache, monkeypatch, capsys):
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refusing(401))
    assert main(["flux-dev"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("flux-dev: black-forest-labs/FLUX.1-dev is a gated repository (HTTP 401)")
    assert "accept the licence at https://huggingface.co/black-forest-labs/FLUX.1-dev" in err[0]
    assert "`hf auth login` or HF_TOKEN" in err[0]
    monkeypatch.setattr(huggingface_hub, "snapshot_download", refusing(403, HfHubHTTPError))
    assert main(["flux-schnell"]) == 1
    assert "black-forest-labs/FLUX.1-schnell refused access (HTTP 403)" in capsys.readouterr().err


def test_hub_failures_and_an_incomplete_download(hf_cache, monkeypatch, capsys):
    def offline(repo_id, **kwargs):
        raise huggingface_hub.errors.LocalEntryNotFoundError("cannot reach the Hub and nothing is cached")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert main(["clip-vit-large-patch14"]) == 1
    err = capsys.readouterr().err
    assert "clip-vit-large-patch14: FAILED: cannot reach the Hub" in err and "(run again to resume)" in err
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **kwargs: str(hf_cache))
    assert main(["image-reward-weights"]) == 1
    assert "still incomplete: ImageReward.pt, med_config.json missing" in capsys.readouterr().err


def test_a_complete_repo_is_not_requested_again(hf_cache, monkeypatch, capsys):
    (clip,) = [h for h in HUB if h.name == "clip-vit-large-patch14"]
    snap = hf_cache / "models--openai--clip-vit-large-patch14" / "snapshots" / "abc"
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc")
    for f in clip.required:
        (snap / f).write_text("{}")
    calls = []

    def local_only(repo_id, **kwargs):
        calls.append(kwargs.get("local_files_only"))
        return str(snap)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", local_only)
    assert main(["clip-vit-large-patch14"]) == 0
    assert calls == [True] and "clip-vit-large-patch14: present" in capsys.readouterr().out


def _snapshot(cache: Path, repo_id: str, files: dict[str, bytes], commit: str = "c0ffee") -> Path:
    """A Hugging Face cache entry of ``repo_id`` at ``commit`` (refs/main pointing at it)."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    for name, data in files.items():
        (snap / name).write_bytes(data)
    return snap


def test_vae_goes_to_the_hf_cache_with_hf_hub_download(hf_cache, tmp_path, monkeypatch, capsys):
    """vae-ema: hf_hub_download of config and safetensors weights (nothing in the assets folder);
    run again, it is present and nothing is requested."""
    calls = []

    def hf_hub_download(repo_id, filename, **kwargs):
        if kwargs.get("local_files_only"):  # the presence check: whatever the fake cache holds
            path = hf_cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "c0ffee" / filename
            if not path.exists():
                raise huggingface_hub.errors.LocalEntryNotFoundError(filename)
            return str(path)
        calls.append((repo_id, filename))
        snap = hf_cache / f"models--{repo_id.replace('/', '--')}" / "snapshots" / "c0ffee"
        if not snap.exists():
            _snapshot(hf_cache, repo_id, {})
        (snap / filename).write_bytes(b"{}")
        return str(snap / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    assert main(["vae-ema", "--dest", str(tmp_path / "assets")]) == 0
    assert calls == [("stabilityai/sd-vae-ft-ema", "config.json"),
                     ("stabilityai/sd-vae-ft-ema", "diffusion_pytorch_model.safetensors")]
    assert "vae-ema: done" in capsys.readouterr().out and not (tmp_path / "assets").exists()
    assert main(["vae-ema", "--dest", str(tmp_path / "assets")]) == 0
    assert len(calls) == 2 and "vae-ema: present" in capsys.readouterr().out


def test_an_earlier_assets_folder_vae_counts_as_present(hf_cache, tmp_path, monkeypatch, capsys):
    legacy = tmp_path / "assets" / "sd-vae-ft-mse"
    legacy.mkdir(parents=True)
    (legacy / "config.json").write_text("{}")
    (legacy / "diffusion_pytorch_model.safetensors").write_bytes(b"w")

    def never(*args, **kwargs):
        if kwargs.get("local_files_only"):
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        raise AssertionError("downloaded although the assets folder holds the VAE")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", never)
    assert main(["vae-mse", "--dest", str(tmp_path / "assets")]) == 0
    assert f"vae-mse: present ({legacy})" in capsys.readouterr().out
    assert main(["--list", "vae-mse", "vae-ema", "--dest", str(tmp_path / "assets")]) == 0
    listing = capsys.readouterr().out.splitlines()
    assert listing[0].split()[:2] == ["vae-mse", "present"] and listing[1].split()[:2] == ["vae-ema", "missing"]
