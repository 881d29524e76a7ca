"""Download the files a real run needs: the ImageNet (DiT) assets into the assets folder, FLUX.1
and the text-to-image metrics' weights where their libraries look for them.

    python scripts/fetch_assets.py                 # the ImageNet (DiT) assets
    python scripts/fetch_assets.py dit-xl-256 vae-ema
    python scripts/fetch_assets.py flux-dev t2i-metrics
    python scripts/fetch_assets.py --list          # every entry and group, present or missing
    RFC_ASSETS=/data/rfc python scripts/fetch_assets.py   # or --dest

Downloads are resumable: data goes to NAME.part and continues from its size with an HTTP Range
request; the file is renamed into place only after its size (and sha256, where known) check
out, so an interrupted or corrupt download is never mistaken for a finished one.
The runner itself never downloads; it names the missing file and this command.

Not everything goes to the assets folder. ``lpips`` (torchvision's AlexNet) goes to torch hub's
checkpoint folder ($TORCH_HOME/hub/checkpoints), where torchvision loads it from. Everything on the
Hugging Face Hub goes to the Hugging Face cache (HF_HOME / HF_HUB_CACHE; resumable too), where
diffusers, transformers and the runner find it by repository id, and where a copy another project
already fetched is reused instead of downloaded again: the DiT VAEs (``vae-ema``, ``vae-mse``:
config.json and the safetensors weights of stabilityai/sd-vae-ft-ema / -mse, with
huggingface_hub.hf_hub_download) and whole repositories (``flux-dev``, ``flux-schnell``,
``hunyuan-video`` (hunyuanvideo-community/HunyuanVideo, HunyuanVideo in diffusers format),
``clip-vit-large-patch14``, ``image-reward``, with snapshot_download; only the files a run loads:
FLUX's diffusers folders, not the 24 GB single-file checkpoint beside them). A VAE that an earlier
version downloaded into <assets>/sd-vae-ft-ema counts as present (the runner still loads it when
the cache has none). FLUX.1-dev is gated: accept its licence on the model page and log in
(`hf auth login` or HF_TOKEN) first.

``vbench`` is an environment, not a file: VBench's package cannot share this one (eval/vbench.py), so
it creates a virtual environment ($RFC_VBENCH_ENV, default ~/.cache/rfc/vbench-env) with vbench
0.1.5 and its pins, torch at this environment's release and detectron2, then lets the package's own
code download its weights into $VBENCH_CACHE_DIR (default ~/.cache/vbench).

Imports the installed package (``pip install -e .``), so it runs from any working directory.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from eval import vbench
from eval.t2i import (
    ALEXNET_FILE,
    ALEXNET_URL,
    BLIP_TOKENIZER_FILES,
    BLIP_TOKENIZER_REPO,
    CLIP_FILES,
    CLIP_REPO,
    CLIP_WEIGHTS,
    FLUX_FETCH_NAME,
    IMAGE_REWARD_FILES,
    IMAGE_REWARD_REPO,
    flux_weights_missing,
    hub_cache,
    hub_missing,
)
from rfc.models.hub import HUNYUAN_FETCH_NAME, hunyuan_weights_missing
from rfc.models.vae import VAE_CONFIG, VAE_REPOS, VAE_WEIGHTS, cached_vae_folder, check_vae_folder, legacy_vae_folder
from rfc.utils.files import file_digest

ROOT = Path(__file__).resolve().parents[1]
CHUNK = 1 << 20


@dataclass(frozen=True)
class Asset:
    name: str
    url: str
    path: str  # relative to the assets folder
    sha256_prefix: str | None = None  # checked when the publisher states one
    size: int | None = None
    root: str = "assets"  # "assets": under --dest; "torch-hub": torch hub's checkpoint folder


@dataclass(frozen=True)
class HubRepo:
    """A Hugging Face repository, fetched into the Hugging Face cache with snapshot_download."""

    name: str
    repo_id: str
    allow_patterns: tuple[str, ...]  # only what a run loads
    required: tuple[str, ...] = ()  # present in the cache = complete (FLUX: eval.t2i.flux_weights_missing)
    gated: bool = False  # the publisher wants its licence accepted first


@dataclass(frozen=True)
class HubFiles:
    """Named files of a Hugging Face repository, fetched into the Hugging Face cache one by one with
    hf_hub_download (the DiT VAEs: two files of a repository that also holds .bin and .ckpt copies
    of the same weights). ``vae`` names the rfc.models.vae entry it is, whose earlier assets-folder
    copy also counts as present."""

    name: str
    repo_id: str
    files: tuple[str, ...]
    vae: str | None = None


@dataclass(frozen=True)
class VBenchEnv:
    """VBench's own environment and the weights its package downloads (eval/vbench.py: prepare)."""

    name: str = "vbench"


class AccessRefused(OSError):
    """The hub refused the download (401 / 403, a gated repository): retrying will not help."""


_DIT = "https://dl.fbaipublicfiles.com/DiT/models/DiT-XL-2-{s}x{s}.pt"

ASSETS: tuple[Asset, ...] = (
    Asset("dit-xl-256", _DIT.format(s=256), "DiT-XL-2-256x256.pt"),
    Asset("dit-xl-512", _DIT.format(s=512), "DiT-XL-2-512x512.pt"),
    # torch-fidelity's FID Inception (the TF 2015-12-05 graph ADM's evaluator uses).
    Asset("inception", "https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
          "weights-inception-2015-12-05-6726825d.pth", "weights-inception-2015-12-05-6726825d.pth"),
    Asset("adm-ref-imagenet256", "https://openaipublic.blob.core.windows.net/diffusion/jul-2021/ref_batches/"
          "imagenet/256/VIRTUAL_imagenet256_labeled.npz", "VIRTUAL_imagenet256_labeled.npz"),
    # LPIPS's backbone: torchvision's AlexNet, where torchvision looks for it (torch hub names a file after
    # its sha256 prefix); the LPIPS linear layers ship with torchmetrics.
    Asset("lpips", ALEXNET_URL, ALEXNET_FILE, sha256_prefix="7be5be79", root="torch-hub"),
)

_FLUX_PATTERNS = ("model_index.json", "scheduler/*", "tokenizer/*", "tokenizer_2/*", "text_encoder/*",
                  "text_encoder_2/*", "transformer/*", "vae/*")
_FLUX_REPO = {name: repo for repo, name in FLUX_FETCH_NAME.items()}

VAES: tuple[HubFiles, ...] = tuple(HubFiles(f"vae-{v}", repo, (VAE_CONFIG, VAE_WEIGHTS[0]), vae=v)
                                   for v, repo in VAE_REPOS.items())

# everything fetched from the Hugging Face Hub into its cache: the VAEs file by file, repositories whole
HUB: tuple[HubFiles | HubRepo, ...] = (
    *VAES,
    HubRepo("flux-dev", _FLUX_REPO["flux-dev"], _FLUX_PATTERNS, gated=True),
    HubRepo("flux-schnell", _FLUX_REPO["flux-schnell"], _FLUX_PATTERNS),
    HubRepo("hunyuan-video", *HUNYUAN_FETCH_NAME, _FLUX_PATTERNS),  # the same components as FLUX's folders
    HubRepo("clip-vit-large-patch14", CLIP_REPO,
            (*CLIP_FILES, CLIP_WEIGHTS[0], "preprocessor_config.json", "tokenizer.json", "tokenizer_config.json",
             "special_tokens_map.json"), required=(*CLIP_FILES, CLIP_WEIGHTS[0])),
    HubRepo("image-reward-weights", IMAGE_REWARD_REPO, IMAGE_REWARD_FILES, required=IMAGE_REWARD_FILES),
    HubRepo("image-reward-tokenizer", BLIP_TOKENIZER_REPO, (*BLIP_TOKENIZER_FILES, "tokenizer.json", "config.json"),
            required=BLIP_TOKENIZER_FILES),
)

GROUPS = {
    "image-reward": ("image-reward-weights", "image-reward-tokenizer"),
    "t2i-metrics": ("clip-vit-large-patch14", "image-reward", "lpips"),
}
ENTRIES: tuple[Entry, ...] = (*ASSETS, *HUB, VBenchEnv())
DEFAULT = ("dit-xl-256", "dit-xl-512", "vae-ema", "vae-mse", "inception", "adm-ref-imagenet256")  # no names given

Entry = Asset | HubFiles | HubRepo | VBenchEnv


def default_dest() -> Path:
    return Path(os.environ.get("RFC_ASSETS", ROOT / "assets"))


def torch_hub_checkpoints() -> Path:
    """torch hub's checkpoint folder ($TORCH_HOME/hub/checkpoints), where torchvision looks for weights."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints"


def asset_dest(asset: Asset, dest: Path) -> Path:
    """The folder ``asset.path`` is relative to: --dest, or torch hub's checkpoint folder."""
    return torch_hub_checkpoints() if asset.root == "torch-hub" else dest


def hub_state(repo: HubRepo) -> str | None:
    """None when ``repo``'s files are all in the Hugging Face cache, else what is missing (offline)."""
    if repo.repo_id in FLUX_FETCH_NAME:
        return flux_weights_missing(repo.repo_id)
    if repo.repo_id in HUNYUAN_FETCH_NAME:
        return hunyuan_weights_missing(repo.repo_id)
    missing = hub_missing(repo.repo_id, repo.required)
    return f"{', '.join(missing)} missing" if missing else None


def files_state(entry: HubFiles, dest: Path) -> str | None:
    """None when ``entry``'s files are in the Hugging Face cache (for a VAE: as the runner finds
    them, one revision holding config and weights) or, for a VAE, complete in the assets folder
    of an earlier version; else what is missing. Offline."""
    if entry.vae is not None:
        if cached_vae_folder(entry.vae) is not None:
            return None
        try:
            check_vae_folder(legacy_vae_folder(dest, entry.vae))
            return None
        except FileNotFoundError:
            missing = hub_missing(entry.repo_id, entry.files) or ["one revision holding config and weights"]
            return f"{', '.join(missing)} missing"
    missing = hub_missing(entry.repo_id, entry.files)
    return f"{', '.join(missing)} missing" if missing else None


def fetch_files(entry: HubFiles, dest: Path, quiet: bool = False) -> Path:
    """hf_hub_download each of ``entry``'s files into the Hugging Face cache (a file already there
    is not requested again; an interrupted download resumes); return the folder holding them.
    Nothing is fetched when the assets folder already holds an earlier version's complete copy
    of a VAE, since the runner loads that one. Raises AccessRefused on 401 / 403 and OSError when a
    file is still missing afterwards."""
    import huggingface_hub

    legacy = legacy_vae_folder(dest, entry.vae) if entry.vae is not None else None
    if files_state(entry, dest) is None:
        folder = (cached_vae_folder(entry.vae) if entry.vae is not None else None) or legacy
        if not quiet:
            print(f"{entry.name}: present ({folder})")
        return Path(folder) if folder is not None else Path(hub_cache())
    paths = []
    try:
        for f in entry.files:
            paths.append(Path(huggingface_hub.hf_hub_download(entry.repo_id, f)))
    except OSError as err:
        status = _refusal(err)
        if status is None:
            raise
        raise AccessRefused(f"{entry.name}: {entry.repo_id} refused access (HTTP {status}): log in "
                            "(`hf auth login` or HF_TOKEN), then run again") from err
    missing = files_state(entry, dest)
    if missing is not None:
        raise OSError(f"{entry.name}: downloaded, but still incomplete: {missing}")
    if not quiet:
        print(f"{entry.name}: done ({paths[0].parent})")
    return paths[0].parent


def _refusal(err: BaseException) -> int | None:
    """The HTTP status (401 / 403) when the hub refused access, else None."""
    from huggingface_hub.errors import GatedRepoError

    status = getattr(getattr(err, "response", None), "status_code", None)
    if status in (401, 403):
        return int(status)
    return 403 if isinstance(err, GatedRepoError) else None


def fetch_hub(repo: HubRepo, quiet: bool = False) -> Path:
    """snapshot_download ``repo``'s allowed files into the Hugging Face cache (resuming a partial
    download); return its snapshot folder. Raises AccessRefused, in one line saying what to do,
    when the hub refuses (gated repository, no or wrong token), and OSError when the download
    ended without every required file."""
    import huggingface_hub

    if hub_state(repo) is None:  # complete: no request at all (a gated repository would want a token)
        folder = huggingface_hub.snapshot_download(repo.repo_id, allow_patterns=list(repo.allow_patterns),
                                                   local_files_only=True)
        if not quiet:
            print(f"{repo.name}: present ({folder})")
        return Path(folder)
    try:
        folder = Path(huggingface_hub.snapshot_download(repo.repo_id, allow_patterns=list(repo.allow_patterns)))
    except OSError as err:  # HfHubHTTPError and LocalEntryNotFoundError are OSErrors
        status = _refusal(err)
        if status is None:
            raise
        what = "is a gated repository" if repo.gated else "refused access"
        raise AccessRefused(
            f"{repo.name}: {repo.repo_id} {what} (HTTP {status}): accept the licence at "
            f"https://huggingface.co/{repo.repo_id} and log in (`hf auth login` or HF_TOKEN), then run again") from err
    missing = hub_state(repo)
    if missing is not None:
        raise OSError(f"{repo.name}: downloaded, but still incomplete: {missing}")
    if not quiet:
        print(f"{repo.name}: done ({folder})")
    return folder


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


def select(names: list[str]) -> list[Entry]:
    """The entries ``names`` (entries or groups, groups may hold groups) stand for, in order and
    each once; no names: the ImageNet (DiT) assets."""
    by_name: dict[str, Entry] = {e.name: e for e in ENTRIES}
    chosen: list[Entry] = []

    def add(n: str) -> None:
        if n in GROUPS:
            for x in GROUPS[n]:
                add(x)
        elif n in by_name:
            if by_name[n] not in chosen:
                chosen.append(by_name[n])
        else:
            raise SystemExit(f"unknown asset {n!r}; known: {', '.join([*by_name, *GROUPS])}")

    for n in names or DEFAULT:
        add(n)
    return chosen


def describe(entry: Entry, dest: Path) -> str:
    """One --list line: name, present / missing, where it goes, where it comes from."""
    if isinstance(entry, HubFiles):
        state = "present" if files_state(entry, dest) is None else "missing"
        return (f"{entry.name:24s} {state:8s} {hub_cache()} [HF cache]  <- https://huggingface.co/{entry.repo_id} "
                f"({', '.join(entry.files)})")
    if isinstance(entry, VBenchEnv):
        state = "present" if vbench.missing() is None else "missing"
        return (f"{entry.name:24s} {state:8s} {vbench.environment()} + {vbench.cache_dir()}  <- PyPI (vbench "
                f"{vbench.VERSION}), detectron2's repository, the package's own weight downloads")
    if isinstance(entry, HubRepo):
        state = "present" if hub_state(entry) is None else "missing"
        gated = " (gated: accept the licence, log in)" if entry.gated else ""
        return f"{entry.name:24s} {state:8s} {hub_cache()} [HF cache]  <- https://huggingface.co/{entry.repo_id}{gated}"
    path = asset_dest(entry, dest) / entry.path
    return f"{entry.name:24s} {'present' if path.exists() else 'missing':8s} {path}  <- {entry.url}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("names", nargs="*", help="assets or groups to fetch (default: the ImageNet assets)")
    p.add_argument("--dest", type=Path, default=None,
                   help="assets folder (default: $RFC_ASSETS or ./assets); Hugging Face repositories go to the "
                        "Hugging Face cache, lpips to torch hub's checkpoints")
    p.add_argument("--list", action="store_true", help="list the assets (all of them without names) and exit")
    args = p.parse_args(argv)
    dest = args.dest or default_dest()
    if args.list:
        by_name = {e.name: e for e in ENTRIES}
        for e in select(args.names) if args.names else by_name.values():
            print(describe(e, dest))
        print("groups: " + ", ".join(f"{g} = {' + '.join(members)}" for g, members in GROUPS.items()))
        return 0
    entries = select(args.names)
    failed, refused = [], False
    for e in entries:
        try:
            if isinstance(e, VBenchEnv):
                vbench.prepare()
            elif isinstance(e, HubRepo):
                fetch_hub(e)
            elif isinstance(e, HubFiles):
                fetch_files(e, dest)
            else:
                fetch(e, asset_dest(e, dest))
        except AccessRefused as err:  # one line; running again will not help
            print(err, file=sys.stderr)
            refused = True
        except (OSError, ValueError) as err:  # URLError is an OSError
            print(f"{e.name}: FAILED: {err}", file=sys.stderr)
            failed.append(e.name)
    if failed:
        print(f"failed: {', '.join(failed)} (run again to resume)", file=sys.stderr)
    return 1 if failed or refused else 0


if __name__ == "__main__":
    sys.exit(main())
