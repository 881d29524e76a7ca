"""The run's record step: merge_shards (samples.npz, grid, schedules), make_record (the row's
setting, accounting and timing columns) and publish_record (record.json and the loggers). The row
itself is rfc.run.row.RunRecord."""

from __future__ import annotations

import json
import logging
import os
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from eval.extractors import get_extractor
from rfc.cache.base import sample_nfcs
from rfc.run.build import RunPlan
from rfc.run.generate import SampleSet, Session, batch_sizes
from rfc.run.row import REPO_ROOT, RunRecord, git_sha
from rfc.run.runlog import log_result
from rfc.run.setting import setting_id
from rfc.run.shards import ShardStore
from rfc.samplers.sampling import CFGDenoiser
from rfc.utils.devices import mean_load, quiet_limit
from rfc.utils.files import atomic_savez, atomic_write_text
from rfc.utils.images import save_grid, save_video_preview

LOG = logging.getLogger("rfc")


# --------------------------------------------------------------------------------------------
# A run's record: merged samples, its row, record.json and the loggers
# --------------------------------------------------------------------------------------------


def merge_shards(plan: RunPlan, store: ShardStore) -> tuple[SampleSet, Path, Path]:
    """Rank 0: merge the shards into samples.npz, grid and schedules. Returns the sample set and
    the paths of samples.npz and the grid."""
    samples = SampleSet.from_batches(store.load_all())
    npz_path = plan.out_dir / "samples.npz"
    atomic_savez(npz_path, arr_0=samples.images, arr_1=samples.labels)  # ADM layout: images, labels
    grid_path = save_grid(samples.images, plan.out_dir / "grid.png", n=int(plan.cfg.eval.grid_size))
    if samples.images.ndim == 5:  # videos: one a person can watch beside the grid of frame strips
        save_video_preview(samples.images, plan.out_dir / "preview.gif")
    schedules = []  # forward-order indices of the full steps; in sample scope each sample's own too
    for b in samples.batches:
        entry = {"batch": b.start // plan.batch_size, "first_index": b.start, "full_steps": b.stats.full_indices}
        if b.stats.sample_full_indices:
            entry["samples"] = b.stats.sample_full_indices
        schedules.append(entry)
    atomic_write_text(plan.out_dir / "schedules.json", json.dumps(schedules) + "\n")
    return samples, npz_path, grid_path


def make_record(plan: RunPlan, samples: SampleSet, denoiser: CFGDenoiser, processes: int, busy: str | None,
                sweep: str | None, session: Session, resumed: int, peak_gb: float | None) -> RunRecord:
    """Rank 0: the row's setting, accounting and timing columns (quality metrics come later, from
    rfc.run.score). ``processes``: the torchrun world size that drew the samples; ``busy``: why this
    job could not have the device to itself (rfc.utils.devices.concurrency), or None."""
    cfg, method = plan.cfg, plan.method
    weights = batch_sizes(plan.num_samples, plan.batch_size)

    def mean(values: list[float]) -> float:
        return float(np.average(values, weights=weights))

    nfcs = sample_nfcs(samples.stats, weights)  # each sample's own (schedule_scope=sample: they differ)
    cost = plan.family.cost(plan.arch)  # each site kind at its own cost, the rows that ran
    flops = [cost.flops(s, denoiser.batch_multiplier) for s in samples.stats]
    notes = list(plan.notes)
    # Latency: batches timed while the job had the device to itself (a resumed run may combine
    # several such sessions); none at all when this session shared it.
    # Short batches can each slip under the per-batch test (a clock tick is 10 ms of CPU): the
    # other processes' mean use over all the timed batches decides too.
    load, loaded = mean_load(session.loads)
    timed = samples.timed if busy is None and not session.shared and not loaded else []
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
        notes.append(f"latency not measured: {device} was shared during {len(session.shared)} timed batch(es) "
                     f"({session.shared[0]}); images_per_s is this session's throughput")
    elif loaded:
        notes.append(f"latency not measured: other processes used {load:.2f} of {os.cpu_count()} CPU cores on "
                     f"average over the timed batches, more than {quiet_limit():g}; images_per_s is this session's "
                     "throughput")
    elif not timed:
        notes.append("latency not measured: no batch of this run was timed with the device to itself")
    elif load is not None:
        notes.append(f"timed on a quiet {device}: other processes used {load:.2f} of {os.cpu_count()} CPU cores on "
                     "average during the timed batches")
    if resumed:
        notes.append(f"resumed: {resumed} of {plan.num_samples} samples drawn by an earlier session")
    vae_times = [b.vae_latency for b in timed if b.vae_latency is not None]
    return RunRecord(
        git_sha=git_sha(REPO_ROOT), experiment=cfg.get("experiment_name"), variant=cfg.get("variant_name"),
        sweep=sweep, setting_id=setting_id(plan.setting), **plan.setting,
        method=method.name, method_params=json.dumps(method.params(), sort_keys=True),
        nfc=float(np.mean(nfcs)), nfc_min=min(nfcs), nfc_max=max(nfcs), tflops=mean(flops) / 1e12,
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
        fused=None if method.computes_everything else bool(method.programs),
        torch_version=torch.__version__, output_dir=str(plan.out_dir), notes="; ".join(notes) or None,
    )


class RowLogger(Protocol):
    """What publish_record needs of a logger (rfc.run.loggers.build_loggers makes them): it records
    the row and returns the line to show."""

    def log(self, record: RunRecord, out_dir: Path) -> str: ...


def publish_record(record: RunRecord, out_dir: Path, loggers: Sequence[RowLogger], samples_path: Path,
                   grid_path: Path) -> None:
    """Write the run folder's record.json, name the run's samples and grid, log the row's key
    metrics (run.log's result line), and hand the row to the loggers (CSV, W&B), each of whose
    lines is printed and logged."""
    atomic_write_text(out_dir / "record.json", json.dumps(record.as_dict(), indent=2) + "\n")
    print(f"samples: {samples_path}\ngrid:    {grid_path}")
    LOG.info("samples: %s; grid: %s; record: %s", samples_path, grid_path, out_dir / "record.json")
    log_result(record)
    for logger in loggers:
        line = logger.log(record, out_dir)
        print(line)
        LOG.info("%s", line)
