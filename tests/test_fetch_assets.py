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

from scripts.fetch_assets import ASSETS, DEFAULT, HUB, Asset, asset_dest, fetch, main, select

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
    assert {"DiT-XL-2-256x256.pt", "DiT-XL-2-512x512.pt", "sd-vae-ft-ema/config.json",
            "sd-vae-ft-mse/diffusion_pytorch_model.safetensors", "VIRTUAL_imagenet256_labeled.npz"} <= paths
    assert [a.name for a in select(["vae-ema"])] == ["vae-ema-config", "vae-ema-weights"]


def test_listing_names_every_entry_and_group(capsys):
    assert main(["--list"]) == 0
    out = capsys.readouterr().out
    for name in (*(a.name for a in ASSETS), "flux-dev", "flux-schnell", "clip-vit-large-patch14", "lpips",
                 "image-reward-weights", "image-reward-tokenizer"):
        assert f"\n{name} " in f"\n{out}", name
    assert "https://huggingface.co/black-forest-labs/FLUX.1-dev (gated" in out
    assert "t2i-metrics = clip-vit-large-patch14 + image-reward + lpips" in out
    assert [e.name for e in select(["t2i-metrics"])] == ["clip-vit-large-patch14", "image-reward-weights",
                                                         "image-reward-tokenizer", "lpips"]
    assert [e.name for e in select(["flux-dev", "flux-dev"])] == ["flux-dev"]
    assert {e.name for e in select([])} == {a.name for a in ASSETS if a.name != "lpips"}  # no names: ImageNet
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
