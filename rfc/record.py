"""One result row. Every table, CSV file and log reads its columns from this dataclass, so a
column means the same thing everywhere. Unknown values stay None (an empty cell), never a guess.

Also the run's record step: merge_shards (samples.npz, grid, schedules), make_record (the row's
setting, accounting and timing columns) and publish_record (record.json and the loggers). Their
heavy imports (torch, the extractors, the shards) are made inside them: rfc.setting,
eval.loggers and scripts/make_tables.py import this module for the row type alone, and
rfc.setting is imported back from here."""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import logging
import statistics
import subprocess
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from rfc.build import RunPlan
    from rfc.generate import SampleSet, Session
    from rfc.samplers.sampling import CFGDenoiser
    from rfc.shards import ShardStore

LOG = logging.getLogger("rfc")
REPO_ROOT = Path(__file__).resolve().parents[1]


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
    setting_id: str | None = None  # rfc.setting.setting_id of the sample setting (= its full-compute store entry)
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


# --------------------------------------------------------------------------------------------
# A run's record: merged samples, its row, record.json and the loggers
# --------------------------------------------------------------------------------------------


def merge_shards(plan: RunPlan, store: ShardStore) -> tuple[SampleSet, Path, Path]:
    """Rank 0: merge the shards into samples.npz, grid and schedules. Returns the sample set and
    the paths of samples.npz and the grid."""
    from rfc.files import atomic_savez, atomic_write_text
    from rfc.generate import SampleSet
    from rfc.images import save_grid

    samples = SampleSet.from_batches(store.load_all())
    npz_path = plan.out_dir / "samples.npz"
    atomic_savez(npz_path, arr_0=samples.images, arr_1=samples.labels)  # ADM layout: images, labels
    grid_path = save_grid(samples.images, plan.out_dir / "grid.png", n=int(plan.cfg.eval.grid_size))
    schedules = [{"batch": b.start // plan.batch_size, "first_index": b.start, "full_steps": b.stats.full_indices}
                 for b in samples.batches]  # forward-order indices of the full steps
    atomic_write_text(plan.out_dir / "schedules.json", json.dumps(schedules) + "\n")
    return samples, npz_path, grid_path


def make_record(plan: RunPlan, samples: SampleSet, denoiser: CFGDenoiser, processes: int, busy: str | None,
                sweep: str | None, session: Session, resumed: int, peak_gb: float | None) -> RunRecord:
    """Rank 0: the row's setting, accounting and timing columns (quality metrics come later, from
    rfc.score). ``processes``: the torchrun world size that drew the samples; ``busy``: why this
    job could not have the device to itself (rfc.devices.concurrency), or None."""
    import numpy as np
    import torch

    from eval.extractors import get_extractor
    from rfc.generate import batch_sizes
    from rfc.setting import setting_id

    cfg, method = plan.cfg, plan.method
    weights = batch_sizes(plan.num_samples, plan.batch_size)

    def mean(values: list[float]) -> float:
        return float(np.average(values, weights=weights))

    d = plan.dit
    if plan.text_to_image:
        from eval.flops import flux_flops

        flops = [flux_flops(s, denoiser.batch_multiplier, d.image_tokens, d.text_tokens, d.hidden_size, d.num_heads,
                            d.depth_double, d.depth_single) for s in samples.stats]
    else:
        flops = [s.flops(denoiser.batch_multiplier, d.num_tokens, d.hidden_size, d.num_heads) for s in samples.stats]
    notes = []
    # Latency: batches timed while the job had the device to itself (a resumed run may combine
    # several such sessions); none at all when this session shared it.
    timed = samples.timed if busy is None and not session.shared else []
    latency = spread = images_per_s = None
    if timed:
        latencies = [b.latency for b in timed]
        latency, spread = statistics.median(latencies), max(latencies) - min(latencies)
        images_per_s = sum(len(b.labels) for b in timed) / sum(latencies)
    elif session.drawn:
        images_per_s = session.drawn / session.seconds
    device = plan.setting["device"]
    if busy is not None:
        notes.append(f"latency not measured: {busy}; images_per_s is this session's throughput")
    elif session.shared:
        notes.append(f"latency not measured: another job of this harness used {device} during "
                     f"{len(session.shared)} timed batch(es) ({session.shared[0]}); images_per_s is this session's "
                     "throughput")
    elif not timed:
        notes.append("latency not measured: no batch of this run was timed with the device to itself")
    if resumed:
        notes.append(f"resumed: {resumed} of {plan.num_samples} samples drawn by an earlier session")
    vae_times = [b.vae_latency for b in timed if b.vae_latency is not None]
    return RunRecord(
        git_sha=git_sha(REPO_ROOT), experiment=cfg.get("experiment_name"), variant=cfg.get("variant_name"),
        sweep=sweep, setting_id=setting_id(plan.setting), **plan.setting,
        method=method.name, method_params=json.dumps(method.params(), sort_keys=True),
        nfc=mean([s.full_steps for s in samples.stats]), tflops=mean(flops) / 1e12,
        full_sites=mean([s.full_sites for s in samples.stats]),
        cached_sites=mean([s.cached_sites for s in samples.stats]),
        partial_sites=mean([s.partial_sites for s in samples.stats]),
        full_blocks=mean([s.full_blocks for s in samples.stats]),
        partial_blocks=mean([s.partial_blocks for s in samples.stats]),
        cache_bytes=max(s.cache_bytes_peak for s in samples.stats),
        latency_s=latency, latency_spread_s=spread, timed_batches=len(timed), images_per_s=images_per_s,
        vae_latency_s=statistics.median(vae_times) if vae_times else None,
        peak_memory_gb=peak_gb, processes=processes,
        extractor=get_extractor(plan.extractor).name if plan.score and plan.extractor else None,
        cpu_threads=torch.get_num_threads() if plan.device.type == "cpu" else None,
        fused=None if method.name == "none" else bool(method.programs),
        torch_version=torch.__version__, output_dir=str(plan.out_dir), notes="; ".join(notes) or None,
    )


class RowLogger(Protocol):
    """What publish_record needs of a logger (eval.loggers.build_loggers makes them): it records
    the row and returns the line to show."""

    def log(self, record: RunRecord, out_dir: Path) -> str: ...


def publish_record(record: RunRecord, out_dir: Path, loggers: Sequence[RowLogger], samples_path: Path,
                   grid_path: Path) -> None:
    """Write the run folder's record.json, name the run's samples and grid, log the row's key
    metrics (run.log's result line), and hand the row to the loggers (CSV, W&B), each of whose
    lines is printed and logged."""
    from rfc.files import atomic_write_text
    from rfc.runlog import log_result

    atomic_write_text(out_dir / "record.json", json.dumps(record.as_dict(), indent=2) + "\n")
    print(f"samples: {samples_path}\ngrid:    {grid_path}")
    LOG.info("samples: %s; grid: %s; record: %s", samples_path, grid_path, out_dir / "record.json")
    log_result(record)
    for logger in loggers:
        line = logger.log(record, out_dir)
        print(line)
        LOG.info("%s", line)
