"""Download the files a real (ImageNet) run needs into the assets folder.

    python scripts/fetch_assets.py                 # everything
    python scripts/fetch_assets.py dit-xl-256 vae-ema
    python scripts/fetch_assets.py --list
    RFC_ASSETS=/data/rfc python scripts/fetch_assets.py   # or --dest

Downloads are resumable: data goes to NAME.part and continues from its size with an HTTP Range
request; the file is renamed into place only after its size (and sha256, where known) check
out, so an interrupted or corrupt download is never mistaken for a finished one.
The runner itself never downloads; it names the missing file and this command.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from rfc.files import file_digest  # noqa: E402

CHUNK = 1 << 20


@dataclass(frozen=True)
class Asset:
    name: str
    url: str
    path: str  # relative to the assets folder
    sha256_prefix: str | None = None  # checked when the publisher states one
    size: int | None = None


_HF = "https://huggingface.co/stabilityai/sd-vae-ft-{v}/resolve/main/{f}"
_DIT = "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-{s}x{s}.pt"

ASSETS: tuple[Asset, ...] = (
    Asset("dit-xl-256", _DIT.format(s=256), "DiT-XL-2-256x256.pt"),
    Asset("dit-xl-512", _DIT.format(s=512), "DiT-XL-2-512x512.pt"),
    *(Asset(f"vae-{v}-{kind}", _HF.format(v=v, f=f), f"sd-vae-ft-{v}/{f}")
      for v in ("ema", "mse")
      for kind, f in (("config", "config.json"), ("weights", "diffusion_pytorch_model.safetensors"))),
    # torch-fidelity's FID Inception (the TF 2015-12-05 graph ADM's evaluator uses).
    Asset("inception", "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
          "weights-inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth"),
    Asset("adm-ref-imagenet256", "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/"
          "imagenet/256/VIRTUAL_imagenet256_labeled.npz", "VIRTUAL_imagenet256_labeled.npz"),
)

GROUPS = {"vae-ema": ("vae-ema-config", "vae-ema-weights"), "vae-mse": ("vae-mse-config", "vae-mse-weights")}


def default_dest() -> Path:
    return Path(os.environ.get("RFC_ASSETS", ROOT / "assets"))


def verify(asset: Asset, path: Path) -> None:
    """Raise ValueError if ``path`` contradicts the asset's known size or checksum."""
    if asset.size is not None and path.stat().st_size != asset.size:
        raise ValueError(f"{asset.name}: size {path.stat().st_size} != expected {asset.size}")
    if asset.sha256_prefix is not None and not file_digest(path).startswith(asset.sha256_prefix):
        raise ValueError(f"{asset.name}: sha256 does not start with {asset.sha256_prefix}")


def fetch(asset: Asset, dest: Path, timeout: float = 60.0, quiet: bool = False) -> Path:
    """Download ``asset`` into ``dest`` (resuming a partial file); return the final path."""
    final = dest / asset.path
    if final.exists():
        verify(asset, final)
        if not quiet:
            print(f"{asset.name}: present ({final})")
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + ".part")
    have = part.stat().st_size if part.exists() else 0
    req = urllib.request.Request(asset.url, headers={"Range": f"bytes={have}-"} if have else {})
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as err:
        if err.code == 416 and have:  # the partial file is already complete
            resp = None
        else:
            raise
    if resp is not None:
        with resp:
            resumed = have and resp.status == 206
            if have and not resumed:  # server ignored the range: start over
                have = 0
            length = resp.headers.get("Content-Length")
            total = have + int(length) if length is not None else None
            with part.open("ab" if resumed else "wb") as f:
                done = have
                for block in iter(lambda: resp.read(CHUNK), b""):
                    f.write(block)
                    done += len(block)
                    if not quiet and total:
                        print(f"\r{asset.name}: {done / 1e6:.1f} / {total / 1e6:.1f} MB", end="", flush=True)
            if not quiet:
                print()
            if total is not None and part.stat().st_size != total:
                raise OSError(f"{asset.name}: connection closed at {part.stat().st_size} of {total} bytes; "
                              "run the command again to resume")
    try:
        verify(asset, part)
    except ValueError:
        part.unlink()  # a corrupt download must not be resumed
        raise
    os.replace(part, final)
    if not quiet:
        print(f"{asset.name}: done ({final})")
    return final


def select(names: list[str]) -> list[Asset]:
    by_name = {a.name: a for a in ASSETS}
    if not names:
        return list(ASSETS)
    chosen: list[Asset] = []
    for n in names:
        if n in GROUPS:
            chosen += [by_name[x] for x in GROUPS[n]]
        elif n in by_name:
            chosen.append(by_name[n])
        else:
            raise SystemExit(f"unknown asset {n!r}; known: {', '.join([*by_name, *GROUPS])}")
    return chosen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="assets or groups to fetch (default: all)")
    p.add_argument("--dest", type=Path, default=None, help="assets folder (default: $RFC_ASSETS or ./assets)")
    p.add_argument("--list", action="store_true", help="list the assets and exit")
    args = p.parse_args(argv)
    dest = args.dest or default_dest()
    assets = select(args.names)
    if args.list:
        for a in assets:
            state = "present" if (dest / a.path).exists() else "missing"
            print(f"{a.name:24s} {state:8s} {dest / a.path}  <- {a.url}")
        return 0
    failed = []
    for a in assets:
        try:
            fetch(a, dest)
        except (OSError, ValueError) as err:  # URLError is an OSError
            print(f"{a.name}: FAILED: {err}", file=sys.stderr)
            failed.append(a.name)
    if failed:
        print(f"failed: {', '.join(failed)} (run again to resume)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
