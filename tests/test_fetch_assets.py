"""fetch_assets: resumable downloads with size / checksum checks, against a loopback server."""

from __future__ import annotations

import hashlib
import http.server
import threading
from pathlib import Path

import pytest

from scripts.fetch_assets import ASSETS, Asset, fetch, select

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
