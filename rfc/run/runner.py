"""One run: build model, method and sampler from the config, generate a sample set with paired
randomness, score it, and record one row.

Every check that can fail (missing checkpoint, VAE, classifier, bad sizes) runs before the
first sample is drawn, so a mistake costs seconds, not a sampling job.

The flow, one module per stage:

1. build (rfc.run.build): plan_run validates the config and every input and output file, then
   build_model / build_vae make the model (unreadable or non-finite weights stop the run there).
2. generate (rfc.run.generate): the samples go to shards in the run folder as they are drawn (every
   torchrun rank its share; a rerun on the folder draws only what is missing), and a cached run
   finds, or draws once under the store's lock, the full-compute set of its setting.
3. score (rfc.run.score): quality metrics against the reference, paired metrics against full compute.
4. record (rfc.run.record): rank 0 merges the shards into samples.npz, grid and schedules, makes the
   row, writes record.json and hands the row to the loggers (CSV, W&B).

Along the way rank 0 tells the story in run.log (rfc.run.runlog: the config summary, sampling
milestones, each stage's time, the result) and to W&B, whose run is open from the moment the job
holds its folder until it ends, however it ends (rfc.run.loggers.logging_job).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
from omegaconf import DictConfig

from rfc.cache import NoCache
from rfc.run.build import RunPlan, batch_invariant_rows, build_model, build_vae, compile_for, plan_run
from rfc.run.generate import Drawer, claim_entry, full_compute_pair, manifest_config, open_store
from rfc.run.loggers import JobLogger, build_loggers, logging_job
from rfc.run.record import make_record, merge_shards, publish_record
from rfc.run.row import RunRecord
from rfc.run.runlog import log_plan, timed
from rfc.run.score import score
from rfc.run.shards import ShardStore
from rfc.run.store import FullComputeEntry, store_root
from rfc.utils.devices import DeviceUse, concurrency
from rfc.utils.distributed import Group, broadcast, group
from rfc.utils.errors import FolderLockedError
from rfc.utils.files import FolderLock
from rfc.utils.progress import job_progress

LOG = logging.getLogger("rfc")


def run(cfg: DictConfig, out_dir: str | Path, progress: bool = True, sweep: str | None = None,
        launcher: str = "basic", n_jobs: int | None = None) -> RunRecord | None:
    """Execute one configured run and hand its row to the configured loggers (CSV, W&B).

    Samples go to shards in ``out_dir`` as they are drawn: a rerun on the same folder draws only
    what is missing. Under torchrun every rank draws its share of the batches; rank 0 merges,
    scores and logs (other ranks return None). Latency is recorded only when the job had its
    device to itself (rfc.utils.devices): one process, a launcher that runs jobs one at a time
    (``launcher``, Hydra's hydra/launcher choice, with joblib's ``n_jobs``), and no other job of
    the harness on the device during any timed batch.

    ``progress``: False turns every progress bar of the job off; True leaves the choice to
    rfc.utils.progress.show_bars (a terminal, a launcher that does not multiplex output)."""
    with job_progress(progress, launcher, n_jobs):
        return _run(cfg, out_dir, progress, sweep, launcher, n_jobs)


def _run(cfg: DictConfig, out_dir: str | Path, progress: bool, sweep: str | None, launcher: str,
         n_jobs: int | None) -> RunRecord | None:
    grp = group()
    plan = plan_run(cfg, out_dir)
    if grp.is_main:
        log_plan(plan, sweep)
    store = ShardStore(plan.out_dir, manifest_config(plan), plan.num_samples, plan.batch_size)
    store.check()  # a folder of another configuration is refused here, before any work
    loggers = build_loggers(cfg, sweep) if grp.is_main else []  # fails fast, e.g. W&B online without a login
    lock, refusal = FolderLock(plan.out_dir), None
    if grp.is_main:  # rank 0 holds the folder for its whole group
        try:
            lock.acquire()
        except FolderLockedError as err:
            refusal = str(err)
    refusal = broadcast(refusal)
    if refusal:
        raise FolderLockedError(refusal)
    try:
        with DeviceUse(plan.device) as use, logging_job(loggers, plan, sweep):
            return _run_locked(plan, store, loggers, grp, progress, sweep,
                               concurrency(launcher, n_jobs, grp.world_size), use)
    finally:
        lock.release()


def _run_locked(plan: RunPlan, store: ShardStore, loggers: list[JobLogger], grp: Group, progress: bool,
                sweep: str | None, busy: str | None, use: DeviceUse) -> RunRecord | None:
    cfg, device = plan.cfg, plan.device
    torch.set_grad_enabled(False)
    with timed("model built") as info:
        model, denoiser = build_model(plan)  # unreadable or non-finite weights stop the run here
        vae = build_vae(plan)
        info["detail"] = f"{sum(p.numel() for p in model.parameters()) / 1e6:.3g} M parameters" + (
            "" if vae is None else f", VAE {sum(p.numel() for p in vae.parameters()) / 1e6:.3g} M")
    resumed = open_store(store, grp)
    if resumed and grp.is_main:
        LOG.info("resuming: %d of %d samples already in %s", resumed, plan.num_samples, store.folder)
    if busy is not None and grp.is_main:
        LOG.info("latency will not be recorded: %s", busy)
    method, sampler = plan.method, plan.sampler
    if cfg.compile:
        compile_for(model, method)
    entry = FullComputeEntry(store_root(plan.paths), plan.setting)
    # Full compute with no set in the store yet: this run's samples become the set. Its lock, held
    # while it samples, makes cached jobs of the setting wait for it rather than draw the set again.
    publish = grp.is_main and method.computes_everything and claim_entry(entry)
    drawer = Drawer(model, sampler, denoiser, vae, device, seed=int(cfg.seed),
                    warmup_batches=int(cfg.eval.warmup_batches), precision=str(cfg.precision),
                    batch_invariant=batch_invariant_rows(cfg),
                    progress=progress and grp.is_main, grp=grp, use=use, listeners=[lg.progress for lg in loggers])
    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        session = drawer.draw_into(store, method, busy is None, "sampling")
        peak_gb = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        if grp.is_main:
            with timed("merged the shards into samples.npz, grid and schedules"):
                samples, npz_path, grid_path = merge_shards(plan, store)
            record = make_record(plan, samples, denoiser, grp.world_size, busy, sweep, session, resumed, peak_gb)
            if publish:
                entry.publish(npz_path, source=f"method=none run {plan.out_dir}")
                LOG.info("published as the full-compute set %s (%s)", entry.id, entry.folder)
        pair, drawn_pair = None, False
        if plan.score and not method.computes_everything and str(cfg.eval.paired) != "off":
            t0 = time.perf_counter()
            pair, drawn_pair = full_compute_pair(
                entry, str(cfg.eval.paired), grp,
                lambda target: drawer.draw_into(target, NoCache(), False, "full compute (for pairing)"))
            if grp.is_main:
                how = "none in the store (eval.paired=find)" if pair is None else (
                    f"full-compute set {pair.id} " + ("drawn by this run" if drawn_pair else "found in the store"))
                LOG.info("pairing: %.2f s (%s)", time.perf_counter() - t0, how)
        if not grp.is_main:
            return None
        notes = [record.notes] if record.notes else []
        if plan.score:
            if pair is not None:
                notes.append(f"paired with full-compute set {pair.id} ({pair.folder}"
                             + (", drawn by this run)" if drawn_pair else ")"))
            elif not method.computes_everything and str(cfg.eval.paired) == "find":
                notes.append(f"paired metrics missing: no full-compute set of this setting in {entry.folder.parent} "
                             "(eval.paired=find)")
            with timed("scoring"):
                record = score(record, samples, plan, pair, notes, entry if publish else None)
    finally:
        if entry.held:
            entry.release()

    publish_record(record, plan.out_dir, loggers, npz_path, grid_path)
    return record
