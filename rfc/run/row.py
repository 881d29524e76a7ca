"""One result row. Every table, CSV file and log reads its columns from this dataclass, so a
column means the same thing everywhere. Unknown values stay None (an empty cell), never a guess.
The row imports nothing of the harness: the setting, the loggers and the reports read it."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import subprocess
import uuid
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def cell(value: object) -> str:
    """A value as its CSV cell: "" for None (unknown), repr for floats (round-trips exactly)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _now() -> str:
    return _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")


def new_run_id() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S-") + uuid.uuid4().hex[:6]


RESULT_PATHS = ("results",)  # what the harness itself writes into the tree: not code


def git_sha(repo: str | Path) -> str | None:
    """Commit of the code that produced a row, with "-dirty" when tracked code had local changes.
    Changes under results/ (rows, tables, figures the harness writes) do not count: they describe
    results, not the code that made them."""
    excludes = [f":(exclude){p}" for p in RESULT_PATHS]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True,
                             timeout=5, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".", *excludes],
                               cwd=repo, capture_output=True, text=True, timeout=5, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return sha + ("-dirty" if dirty else "") if sha else None


@dataclass
class RunRecord:
    """Columns of results/runs.csv, in order."""

    run_id: str = field(default_factory=new_run_id)
    time: str = field(default_factory=_now)
    git_sha: str | None = None
    experiment: str | None = None  # experiment preset (configs/experiment) the run belongs to
    variant: str | None = None  # the row's label in that experiment's tables ("TaylorSeer N=4 m=2")
    sweep: str | None = None  # Hydra multirun folder: rows of one sweep share it
    setting_id: str | None = None  # rfc.run.setting.setting_id of the sample setting (= its full-compute store entry)
    model: str | None = None
    arch: str | None = None
    image_size: int | None = None
    checkpoint: str | None = None  # weights: "sha256:<16 hex>" of the checkpoint, or "random:<init>:<config>"
    method: str | None = None
    method_params: str | None = None  # JSON of the method's hyperparameters
    sampler: str | None = None
    sampler_params: str | None = None  # JSON of the sampler's own parameters (DDIM's eta)
    respacing: str | None = None
    num_steps: int | None = None
    cfg_scale: float | None = None
    guided_channels: int | None = None
    prompts: str | None = None  # text-to-image rows: the prompt set (name:digest); sample i uses prompt i
    seed: int | None = None
    num_samples: int | None = None
    batch_size: int | None = None
    nfc: float | None = None  # full computations per sample as the papers count them (ToCa: block 0 full)
    tflops: float | None = None  # analytic, per image, of what ran (B = 2 rows with guidance)
    full_sites: float | None = None  # branch computations on all tokens, per sample
    cached_sites: float | None = None  # branches predicted or reused, per sample
    partial_sites: float | None = None  # branches recomputed on a token subset, per sample
    full_blocks: float | None = None  # block evaluations with both branches on all tokens, per sample
    partial_blocks: float | None = None  # block evaluations that recomputed a token subset (ToCa), per sample
    cache_bytes: int | None = None  # peak bytes held by the method (whole batch)
    latency_s: float | None = None  # median seconds of the sampling loop per batch
    latency_spread_s: float | None = None  # max - min over timed batches
    timed_batches: int | None = None  # batches behind the latency figures (warm-up excluded)
    images_per_s: float | None = None  # over the timed batches, sampling loop only
    vae_latency_s: float | None = None  # median seconds decoding one batch (not in latency_s)
    peak_memory_gb: float | None = None  # peak GPU memory allocated while sampling (rank 0)
    processes: int | None = None  # processes that drew the samples (torchrun world size)
    fid: float | None = None
    sfid: float | None = None
    inception_score: float | None = None
    precision: float | None = None
    recall: float | None = None
    fid2fc: float | None = None
    sfid2fc: float | None = None
    psnr: float | None = None  # mean per-image PSNR (dB) against full compute, same noise
    ssim: float | None = None  # mean per-image SSIM against full compute
    lpips: float | None = None  # mean per-image LPIPS (AlexNet) against full compute (text-to-image rows)
    image_reward: float | None = None  # mean ImageReward of image and prompt (text-to-image rows)
    clip_score: float | None = None  # mean CLIP score of image and prompt, the papers' scale (eval/t2i.py)
    class_acc: float | None = None  # domain classifier's agreement with the conditioning labels
    extractor: str | None = None  # feature space of fid / sfid
    reference: str | None = None  # what fid is measured against
    vae: str | None = None
    device: str | None = None  # GPU name, or "cpu (<machine>)"
    cpu_threads: int | None = None  # torch's intra-op threads on a CPU (they set its speed); empty on a GPU
    precision_mode: str | None = None  # fp32 | tf32 | bf16 (bf16 weights) | bf16-autocast
    compile: bool | None = None  # torch.compile'd model / cached steps
    fused: bool | None = None  # cached steps through the fused path (it ran, not only configured); empty: none
    torch_version: str | None = None
    output_dir: str | None = None
    notes: str | None = None  # why a metric is missing, what the paired metrics compare with

    @classmethod
    def columns(cls) -> list[str]:
        return [f.name for f in dataclasses.fields(cls)]

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)
