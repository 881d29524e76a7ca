"""VBench (Huang et al., 2024) for text-to-video rows: the package's own scores, from an environment of its own.

RFC's Table 3 reports VBench's total score (%) of each method's videos. The ``vbench`` package
(0.1.5, its newest release) pins transformers 4.33.2 and numpy < 2, which cannot share an environment
with this project's pins (transformers 5, numpy 2); its 16 dimensions load a dozen models (CLIP,
DINO, RAFT, AMT, MUSIQ, UMT, ViCLIP, Tag2Text, GRiT through detectron2) by their own code. So the
harness does not reimplement any of it: ``python scripts/fetch_assets.py vbench`` creates a virtual
environment with the package and its pins (``$RFC_VBENCH_ENV``, default ``~/.cache/rfc/vbench-env``)
and lets the package's own download code fill its weight folder (``$VBENCH_CACHE_DIR``, default
``~/.cache/vbench``, where the package looks); scoring runs ``eval/vbench_worker.py`` in that
environment, which calls ``VBench.evaluate`` in its standard mode with local weights.

What the harness adds, and why:

- The videos: each sample is written as ``{prompt}-{k}.mp4`` (k = 0..4, its rank among the samples
  of the same prompt), the names VBench's standard mode looks for, encoded as HunyuanVideo's and
  TaylorSeer's sampling scripts save them (imageio's ffmpeg writer: libx264, quality 5, yuv420p,
  24 fps). The encoding is lossy, as it is for every published VBench number.
- The total: VBench computes per-dimension scores; its total score comes from the repository's
  final-score script (scripts/cal_final_score.py with scripts/constant.py), not from the package.
  ``total_score`` does the same arithmetic (min-max normalised dimensions, dynamic degree weighted
  0.5, quality and semantic means weighted 4:1), checked against that script's output in the tests.
  That script counts a dimension without a result as 0; here the total exists only when all 16
  dimensions were scored, else the column stays empty and the row's notes say which are missing.
- Coverage: the full protocol is VBench's 944 distinct standard prompts (``prompts=vbench``) with 5
  videos each, 4,720 videos. A run with fewer samples is scored on what it has (each dimension on its
  own prompts' videos, as VBench does); the notes then say "partial" with the count, and the setting
  (prompts, sample count) keeps such rows apart from full-protocol ones. Videos whose prompt is not a
  standard one, or beyond 5 of one prompt, are not scored (VBench would ignore them), and the notes
  say so. VBench's static filter for temporal flickering (25 samples per prompt, the 5 most static
  kept) is not applied: like the caching papers, the harness draws 5 videos per prompt.

``SCORER`` replaces the environment with a function (videos, prompts, device, notes) -> score, which
the tests use to check the column's plumbing without the package.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import numpy as np
    import torch

Scorer = Callable[["np.ndarray", Sequence[str], "torch.device", list[str]], "float | None"]

SCORER: Scorer | None = None  # None: VBench's package in its environment (the module docstring)

VERSION = "0.1.5"
FETCH = "python scripts/fetch_assets.py vbench"
WORKER = Path(__file__).resolve().with_name("vbench_worker.py")
VIDEOS_PER_PROMPT = 5  # VBench's standard protocol
STANDARD_PROMPTS = 944  # distinct prompts of VBench_full_info.json (946 entries; prompts/vbench.txt)
FPS = 24  # HunyuanVideo's and TaylorSeer's sampling scripts save at 24 fps
MP4 = {"codec": "libx264", "quality": 5, "pixelformat": "yuv420p", "macro_block_size": 16}  # imageio's defaults

# VBench's dimensions, their groups and the final-score arithmetic's constants (Vchitect/VBench,
# scripts/constant.py): weight, and the min and max each dimension is normalised by.
QUALITY = ("subject_consistency", "background_consistency", "temporal_flickering", "motion_smoothness",
           "aesthetic_quality", "imaging_quality", "dynamic_degree")
SEMANTIC = ("object_class", "multiple_objects", "human_action", "color", "spatial_relationship", "scene",
            "appearance_style", "temporal_style", "overall_consistency")
DIMENSIONS = (*QUALITY, *SEMANTIC)
WEIGHT = {d: (0.5 if d == "dynamic_degree" else 1.0) for d in DIMENSIONS}
NORMALIZE = {
    "subject_consistency": (0.1462, 1.0), "background_consistency": (0.2615, 1.0),
    "temporal_flickering": (0.6293, 1.0), "motion_smoothness": (0.706, 0.9975), "dynamic_degree": (0.0, 1.0),
    "aesthetic_quality": (0.0, 1.0), "imaging_quality": (0.0, 1.0), "object_class": (0.0, 1.0),
    "multiple_objects": (0.0, 1.0), "human_action": (0.0, 1.0), "color": (0.0, 1.0),
    "spatial_relationship": (0.0, 1.0), "scene": (0.0, 0.8222), "appearance_style": (0.0009, 0.2855),
    "temporal_style": (0.0, 0.364), "overall_consistency": (0.0, 0.364),
}
QUALITY_WEIGHT, SEMANTIC_WEIGHT = 4.0, 1.0

# What VBench loads from its weight folder in local mode (vbench.utils.init_submodules, the aesthetic
# head of vbench.aesthetic_quality): path under $VBENCH_CACHE_DIR -> the dimensions that need it.
# Besides these: bert-base-uncased in the environment's Hugging Face cache (scene, and the GRiT
# dimensions) and detectron2 in the environment, both put there by the fetch command.
ASSETS: dict[str, tuple[str, ...]] = {
    "clip_model/ViT-B-32.pt": ("background_consistency", "appearance_style"),
    "clip_model/ViT-L-14.pt": ("aesthetic_quality",),
    "aesthetic_model/emb_reader/sa_0_4_vit_l_14_linear.pth": ("aesthetic_quality",),
    "dino_model/facebookresearch_dino_main/hubconf.py": ("subject_consistency",),
    "dino_model/dino_vitbase16_pretrain.pth": ("subject_consistency",),
    "raft_model/models/raft-things.pth": ("dynamic_degree",),
    "amt_model/amt-s.pth": ("motion_smoothness",),
    "pyiqa_model/musiq_spaq_ckpt-358bb6af.pth": ("imaging_quality",),
    "umt_model/l16_ptk710_ftk710_ftk400_f16_res224.pth": ("human_action",),
    "grit_model/grit_b_densecap_objectdet.pth": ("object_class", "multiple_objects", "color", "spatial_relationship"),
    "caption_model/tag2text_swin_14m.pth": ("scene",),
    "ViCLIP/ViClip-InternVid-10M-FLT.pth": ("temporal_style", "overall_consistency"),
}


def total_score(scores: Mapping[str, float]) -> dict[str, float]:
    """VBench's quality, semantic and total scores (fractions) from its 16 dimension scores, as its
    final-score script computes them; a ValueError naming the dimensions missing."""
    missing = [d for d in DIMENSIONS if d not in scores]
    if missing:
        raise ValueError(f"VBench's total needs all 16 dimensions; missing: {', '.join(missing)}")
    norm = {d: (scores[d] - NORMALIZE[d][0]) / (NORMALIZE[d][1] - NORMALIZE[d][0]) * WEIGHT[d] for d in DIMENSIONS}
    quality = sum(norm[d] for d in QUALITY) / sum(WEIGHT[d] for d in QUALITY)
    semantic = sum(norm[d] for d in SEMANTIC) / sum(WEIGHT[d] for d in SEMANTIC)
    total = (quality * QUALITY_WEIGHT + semantic * SEMANTIC_WEIGHT) / (QUALITY_WEIGHT + SEMANTIC_WEIGHT)
    return {"quality": quality, "semantic": semantic, "total": total}


def environment() -> Path:
    """The VBench environment's folder: $RFC_VBENCH_ENV, else ~/.cache/rfc/vbench-env."""
    return Path(os.environ.get("RFC_VBENCH_ENV") or Path.home() / ".cache" / "rfc" / "vbench-env")


def python() -> Path:
    """The interpreter that runs the worker: $RFC_VBENCH_PYTHON, else the environment's."""
    given = os.environ.get("RFC_VBENCH_PYTHON")
    return Path(given) if given else environment() / "bin" / "python"


def cache_dir() -> Path:
    """VBench's weight folder, where the package itself looks: $VBENCH_CACHE_DIR, else ~/.cache/vbench."""
    return Path(os.environ.get("VBENCH_CACHE_DIR") or Path.home() / ".cache" / "vbench")


def missing_assets() -> list[str]:
    """The files of ``ASSETS`` not in VBench's weight folder."""
    return [p for p in ASSETS if not (cache_dir() / p).is_file()]


def missing() -> tuple[str, str] | None:
    """(why VBench cannot be scored here, the command that fixes it), or None: the registry's file
    check, run before sampling."""
    if SCORER is not None:
        return None
    if not python().is_file():
        return f"VBench's environment {python()} does not exist", FETCH
    gone = missing_assets()
    if gone:
        dims = sorted({d for p in gone for d in ASSETS[p]}, key=DIMENSIONS.index)
        return (f"VBench's weights are missing from {cache_dir()}: {', '.join(gone)} (needed by {', '.join(dims)})",
                FETCH)
    try:
        import imageio_ffmpeg  # noqa: F401  (the videos are written here, before the worker runs)
    except ImportError:
        return "imageio-ffmpeg is not installed (VBench scores mp4 files)", 'pip install -e ".[vbench]"'
    return _environment_problem()


def _worker_check() -> dict | str:
    """Ask the worker in VBench's environment which vbench release it has and whether detectron2 is
    there, without importing either (fast); what went wrong, as text, when it cannot answer."""
    with tempfile.TemporaryDirectory(prefix="rfc-vbench-") as tmp:
        result = Path(tmp) / "check.json"
        try:
            request = _request(Path(tmp), {"check": True, "result": str(result)})
            proc = subprocess.run([str(python()), str(WORKER), request], capture_output=True, text=True, check=False)
        except OSError as err:
            return f"VBench's environment {python()} does not run: {err.strerror}"
        if proc.returncode != 0 or not result.is_file():
            said = (proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"])[-1]
            return f"VBench's environment {python()} does not run the worker: {said}"
        return json.loads(result.read_text(encoding="utf-8"))


def _environment_problem() -> tuple[str, str] | None:
    """What is wrong inside VBench's environment (another release, no detectron2), found before
    hours of sampling rather than after."""
    found = _worker_check()
    if isinstance(found, str):
        return found, FETCH
    if found["version"] != VERSION:
        return (f"VBench's environment {python()} has vbench {found['version']}; the harness scores with vbench "
                f"{VERSION}", FETCH)
    if not found["detectron2"]:
        return (f"detectron2 is not installed in VBench's environment {python()} (GRiT's object_class, "
                f"multiple_objects, color, spatial_relationship need it)", FETCH)
    return None


# What ``prepare`` installs in the environment besides torch: the package at the checked release (which
# brings its pins), and detectron2 for GRiT's four dimensions (not on PyPI: VBench's README installs it
# from its repository).
ENV_PACKAGES = (f"vbench=={VERSION}",)
DETECTRON2 = "detectron2@git+https://github.com/facebookresearch/detectron2.git"


def prepare(quiet: bool = False) -> None:
    """Create VBench's environment where it is missing (the package with its own pins, torch at the
    harness's release) and let the package download every weight it loads in local mode into
    ``cache_dir()``. Needs the internet; an OSError names the step that failed."""
    import torch
    import torchvision

    def step(what: str, cmd: list[str]) -> None:
        if not quiet:
            print(f"vbench: {what}", flush=True)
        if subprocess.run(cmd, check=False).returncode != 0:
            raise OSError(f"vbench: {what} failed ({' '.join(cmd)})")

    env = environment()
    pip = [str(python()), "-m", "pip", "install"]
    if not python().is_file():
        if os.environ.get("RFC_VBENCH_PYTHON"):
            raise OSError(f"vbench: $RFC_VBENCH_PYTHON names {python()}, which does not exist (unset it to let "
                          f"this command create {env})")
        step(f"creating {env}", [sys.executable, "-m", "venv", str(env)])
        base = (torch.__version__.split("+")[0], torchvision.__version__.split("+")[0])
        step("installing torch", [*pip, f"torch=={base[0]}", f"torchvision=={base[1]}"])
    found = _worker_check()
    if isinstance(found, str):
        raise OSError(f"vbench: {found}")
    if found["version"] != VERSION:
        step(f"installing vbench {VERSION} with its pins", [*pip, *ENV_PACKAGES])
    if not found["detectron2"]:
        step("installing detectron2", [*pip, "setuptools", "wheel"])
        step("installing detectron2", [*pip, "--no-build-isolation", DETECTRON2])
    with tempfile.TemporaryDirectory(prefix="rfc-vbench-") as tmp:
        step(f"fetching VBench's weights into {cache_dir()}",
             [str(python()), str(WORKER), _request(Path(tmp), {"fetch": True, "dimensions": list(DIMENSIONS)})])
    gone = missing_assets()
    if gone:
        raise OSError(f"vbench: still missing from {cache_dir()} after the download: {', '.join(gone)}")
    if not quiet:
        print(f"vbench: done ({env}, weights in {cache_dir()})")


def _request(folder: Path, request: dict) -> str:
    """Write ``request`` (with the release it is for) into ``folder``; its path."""
    path = folder / "request.json"
    path.write_text(json.dumps({"version": VERSION, **request}), encoding="utf-8")
    return str(path)


def video_names(prompts: Sequence[str]) -> list[str | None]:
    """The file name VBench's standard mode looks for, per video: ``{prompt}-{k}.mp4`` with k the
    video's rank among the videos of its prompt; None for a sixth and later video of one prompt."""
    seen: dict[str, int] = {}
    names: list[str | None] = []
    for p in prompts:
        k = seen.get(p, 0)
        seen[p] = k + 1
        if "/" in p or "\0" in p:
            raise ValueError(f"prompt {p!r} cannot name a file (VBench names a video by its prompt)")
        names.append(f"{p}-{k}.mp4" if k < VIDEOS_PER_PROMPT else None)
    return names


def write_videos(videos: np.ndarray, names: Sequence[str | None], folder: Path) -> int:
    """Each uint8 (F, H, W, 3) video with a name as an mp4 in ``folder`` (the module docstring's
    encoding); how many were written."""
    import imageio.v2 as imageio

    written = 0
    for video, name in zip(videos, names, strict=True):
        if name is None:
            continue
        with imageio.get_writer(folder / name, format="FFMPEG", fps=FPS, **MP4) as w:
            for frame in video:
                w.append_data(frame)
        written += 1
    return written


def _run_worker(request: dict, work: Path) -> dict:
    """Run the worker in VBench's environment on ``request``; its result, or a RunError with the
    end of its log."""
    from rfc.utils.errors import RunError

    log = work / "worker.log"
    with log.open("w", encoding="utf-8") as out:
        proc = subprocess.run([str(python()), str(WORKER), _request(work, request)], stdout=out,
                              stderr=subprocess.STDOUT, check=False)
    result = Path(request["result"])
    if proc.returncode != 0 or not result.is_file():
        tail = log.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-15:]
        raise RunError(f"VBench's worker ({python()} {WORKER.name}) failed with exit code {proc.returncode}:\n"
                       + "\n".join(tail))
    return json.loads(result.read_text(encoding="utf-8"))


def package_score(videos: np.ndarray, prompts: Sequence[str], device: torch.device, notes: list[str]) -> float | None:
    """VBench's total score (%) of the videos by the package in its environment (the module
    docstring); None with the reason in ``notes`` when not all 16 dimensions have videos."""
    names = video_names(prompts)
    with tempfile.TemporaryDirectory(prefix="rfc-vbench-") as tmp:
        work = Path(tmp)
        (work / "videos").mkdir()
        written = write_videos(videos, names, work / "videos")
        result = _run_worker({"videos": str(work / "videos"), "output": str(work / "out"),
                              "result": str(work / "result.json"), "device": str(device),
                              "dimensions": list(DIMENSIONS)}, work)
    return _from_result(result, written, len(videos) - written, notes)


def _from_result(result: dict, written: int, extra: int, notes: list[str]) -> float | None:
    """The row's total from the worker's per-dimension scores, the coverage said in ``notes``."""
    scores: dict[str, float] = {d: float(v) for d, v in result["scores"].items()}
    counts: dict[str, int] = result["videos"]
    unknown: list[str] = result.get("unknown_prompts", [])
    said = []
    if unknown:
        said.append(f"{len(unknown)} prompts are not VBench's standard prompts and were not scored "
                    f"(e.g. {unknown[0]!r}; prompts=vbench)")
    if extra:
        said.append(f"{extra} videos beyond VBench's {VIDEOS_PER_PROMPT} per prompt were not scored")
    missing = [d for d in DIMENSIONS if d not in scores or not counts.get(d)]
    if missing:
        notes.append("vbench not scored: no video for " + ", ".join(missing)
                     + f" (prompts=vbench with at least 16 samples covers every dimension){'; ' if said else ''}"
                     + "; ".join(said))
        return None
    t = total_score(scores)
    scored = written - int(result.get("unscored_videos", 0))
    full = VIDEOS_PER_PROMPT * STANDARD_PROMPTS
    coverage = "the full protocol" if scored >= full else f"partial: {scored} of the protocol's {full} videos"
    dims = " ".join(f"{d}={scores[d]:.4f}" for d in DIMENSIONS)
    notes.append(f"vbench {VERSION}: quality {100 * t['quality']:.2f}%, semantic {100 * t['semantic']:.2f}% "
                 f"({coverage}; no static filter); {dims}" + (f"; {'; '.join(said)}" if said else ""))
    return 100.0 * t["total"]


def vbench_score(videos: np.ndarray, prompts: Sequence[str], device: torch.device,
                 notes: list[str] | None = None) -> float | None:
    """VBench's total score (%) of uint8 (N, F, H, W, 3) videos with their prompts: by ``SCORER``
    where one is plugged in, else by the package in its environment; None (reason in ``notes``)
    when the videos do not cover every dimension."""
    from rfc.utils.errors import RunError

    if videos.ndim != 5 or len(prompts) != len(videos):
        raise ValueError(f"VBench needs uint8 (N, F, H, W, 3) videos and one prompt per video, got {videos.shape} "
                         f"and {len(prompts)} prompts")
    notes = [] if notes is None else notes
    if SCORER is not None:
        value = SCORER(videos, prompts, device, notes)
        return None if value is None else float(value)
    why = missing()
    if why is not None:
        raise RunError(f"cannot score vbench: {why[0]} ({why[1]})")
    return package_score(videos, prompts, device, notes)
