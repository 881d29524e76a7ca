"""Generate: a run's samples, batch by batch, into shards. Sample i's label and noise come from
stream (seed, i) (rfc.utils.seeding), so a batch does not depend on which process draws it or when:
under torchrun each rank draws its share (rfc.run.shards.rank_starts), and a rerun on the same folder
(resume) draws only the batches that are missing. Also here: the checks that stop a batch that
came out non-finite, and the full-compute set a cached run is paired with (drawn once per
setting into the store, under its lock).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
from omegaconf import OmegaConf
from torch import nn

from rfc.cache import CacheMethod, MethodStats
from rfc.models.family import ModelFamily, family_of_model
from rfc.run.build import RunPlan, precision_mode
from rfc.run.runlog import BatchListener, BatchReport, Milestones
from rfc.run.shards import Batch, ShardStore, batch_starts, rank_starts
from rfc.run.store import FullComputeEntry
from rfc.samplers.sampling import CFGDenoiser, Sampler, StepInfo
from rfc.utils import progress as bars
from rfc.utils.devices import DeviceUse
from rfc.utils.distributed import Group, barrier, broadcast
from rfc.utils.errors import NonFiniteError
from rfc.utils.files import atomic_savez
from rfc.utils.images import to_uint8_nhwc
from rfc.utils.invariance import batch_invariance
from rfc.utils.seeding import SampleStreams

LOG = logging.getLogger("rfc")


@dataclass
class SampleSet:
    images: np.ndarray  # uint8, channels last: (N, H, W, C) images (a video family: (N, T, H, W, C))
    labels: np.ndarray  # int64 (N,)
    batches: list[Batch]  # in index order, images dropped (they live in ``images``)

    @property
    def stats(self) -> list[MethodStats]:
        """Per batch: the method's accounting (per sample)."""
        return [b.stats for b in self.batches]

    @property
    def timed(self) -> list[Batch]:
        """The batches behind the latency figures (warm-up and unmeasured sessions excluded)."""
        return [b for b in self.batches if b.timed]

    @classmethod
    def from_batches(cls, batches: list[Batch]) -> SampleSet:
        batches = sorted(batches, key=lambda b: b.start)
        images, labels = np.concatenate([b.images for b in batches]), np.concatenate([b.labels for b in batches])
        for b in batches:
            b.images = b.images[:0]  # the set holds one copy of the pixels
        return cls(images, labels.astype(np.int64), batches)


class Clock:
    """Wall time of a region: CUDA events on a GPU (no host sync inside the region), perf_counter
    on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> Clock:
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000
        else:
            self.seconds = time.perf_counter() - self.t0


@torch.no_grad()
def generate_batches(model: nn.Module, sampler: Sampler, denoiser: CFGDenoiser, method: CacheMethod, *, seed: int,
                     num_samples: int, batch_size: int, starts: list[int], device: torch.device,
                     vae: torch.nn.Module | None = None, progress: bool = True, warmup_batches: int = 0,
                     timed: bool = True, precision: str = "fp32", device_use: DeviceUse | None = None,
                     desc: str = "sampling", on_batch: BatchListener | None = None,
                     leave: bool = True, family: ModelFamily | None = None, batch_invariant: int = 0
                     ) -> Iterator[Batch]:
    """Draw the batches [start, start + batch_size) for each of ``starts``, one at a time, so the
    caller can store each before the next begins; sample i's label and noise come from stream
    (seed, i), so a batch does not depend on which process draws it or when.

    Latency: the first ``warmup_batches`` batches are not timed (they pay one-time allocation,
    kernel selection and caching costs); when there are not more batches than that, the first is
    run that many extra times, untimed and discarded, before sampling. ``timed=False`` marks
    every batch unmeasured (a session whose timing is not trustworthy, e.g. several processes, or a
    full-compute set drawn for pairing) and skips those extra passes: they change no sample.
    With ``device_use``, a batch during which another job of the harness, or other processes
    beyond rfc.utils.devices.QUIET_CORES, used the device is not timed either, and says who in
    ``Batch.shared``; ``Batch.load`` keeps the other processes' CPU use that was measured.

    Progress: a bar on the terminal when ``progress`` and rfc.utils.progress.show_bars agree, and
    ``on_batch`` (run.log's milestones, W&B) told of each batch once the caller has taken it,
    and of each warm-up pass.

    The model's family (``family``, else the registered family of the model's class) gives a
    sample's latent shape (any rank), its conditioning and how latents are decoded.
    ``batch_invariant`` > 0 samples and decodes under rfc.utils.invariance.FixedShapes of that many
    rows: a sample's numbers then do not depend on the batch it is drawn in."""
    family = family or family_of_model(model)
    shape = family.latent_shape(model.config)
    extra = warmup_batches if timed and len(starts) <= warmup_batches else 0  # untimed: nothing to warm up for
    total = sum(_batch_len(s, batch_size, num_samples) for s in starts)
    bar = bars.bar(enabled=progress, total=total, unit="img", desc=desc, leave=leave)
    done, t0 = 0, time.perf_counter()
    try:
        for i, start in enumerate(starts[:1] * extra + starts):
            batch = range(start, min(start + batch_size, num_samples))
            streams = SampleStreams(seed, batch, device)
            y = family.conditioning(model, streams, batch)
            x = streams.randn(shape)
            method.reset()
            before = device_use.snapshot() if device_use is not None else None
            with Clock(device) as clock, precision_mode(precision, device, batch_invariant):
                x = sampler.sample(denoiser, x, y, noise=streams.noise_source(shape), listener=method)
            after = device_use.snapshot() if device_use is not None else None
            shared = DeviceUse.shared(before, after) if device_use is not None else None
            load = DeviceUse.load(before, after) if device_use is not None else None
            x = x.float()
            bad = non_finite_rows(x)  # checked after the clock stopped: the check costs no latency
            if bad is not None:
                with precision_mode(precision, device, batch_invariant):
                    raise non_finite_batch_error(batch, bad, sampler, denoiser, method,
                                                 SampleStreams(seed, batch, device), shape, family)
            if i < extra:  # an untimed warm-up pass: nothing kept
                if on_batch is not None:
                    on_batch(BatchReport(desc, start, len(batch), 0, total, 0, len(starts), clock.seconds, None, 0.0,
                                         warmup=True))
                t0 = time.perf_counter()
                continue
            vae_seconds = None
            if vae is not None:
                with Clock(device) as vae_clock, batch_invariance(batch_invariant):
                    x = family.decode(vae, x)
                vae_seconds = vae_clock.seconds
                bad = non_finite_rows(x)
                if bad is not None:
                    raise NonFiniteError(f"sample {start + bad} is finite in latent space but the VAE decoded it to "
                                         "NaN or inf: the VAE weights are damaged (fetch them again)")
            measured = timed and (extra > 0 or i - extra >= warmup_batches)
            yield Batch(start, to_uint8_nhwc(x), y.cpu().numpy().astype(np.int64), method.stats(),
                        clock.seconds, vae_seconds, measured and shared is None, shared if measured else None,
                        load if measured else None)
            bar.update(len(batch))
            done += len(batch)
            if on_batch is not None:
                on_batch(BatchReport(desc, start, len(batch), done, total, i - extra + 1, len(starts), clock.seconds,
                                     vae_seconds, time.perf_counter() - t0))
    finally:
        bar.close()  # before any error line reaches the terminal


def non_finite_rows(x: torch.Tensor) -> int | None:
    """Index (within the batch) of the first sample holding NaN or inf, or None."""
    finite = torch.isfinite(x).flatten(1).all(1)
    if bool(finite.all()):
        return None
    return int((~finite).nonzero()[0, 0])


class StepWatch:
    """Forwards the sampler's step announcements to the method and checks the denoiser's input
    and output of every step: where a batch turned non-finite (used only after it did)."""

    def __init__(self, method: CacheMethod, denoiser: CFGDenoiser) -> None:
        self.method, self.denoiser = method, denoiser
        self.step: int | None = None
        self.found: str | None = None

    def begin_step(self, step: StepInfo) -> None:
        self.step = step.index
        self.method.begin_step(step)

    def end_step(self, step: StepInfo) -> None:
        self.method.end_step(step)

    def __call__(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.found is None and non_finite_rows(x) is not None:
            self.found = f"in the sampler update after step {self.step - 1}" if self.step else "in the initial noise"
        out = self.denoiser(x, t, y)
        if self.found is None and non_finite_rows(out.float()) is not None:
            self.found = f"in the model output at step {self.step}"
        return out


def non_finite_batch_error(batch: range, bad: int, sampler: Sampler, denoiser: CFGDenoiser, method: CacheMethod,
                           streams: SampleStreams, shape: tuple[int, ...], family: ModelFamily) -> NonFiniteError:
    """The error for a batch that came out non-finite. To say at which step, the batch is drawn
    again (same noise, same method) watching every step: one extra batch, paid only on failure."""
    watch = StepWatch(method, denoiser)
    method.reset()
    y = family.conditioning(denoiser.model, streams, batch)
    sampler.sample(watch, streams.randn(shape), y, noise=streams.noise_source(shape), listener=watch)
    found = watch.found or f"in the last sampler update (step {sampler.num_steps - 1})"
    return NonFiniteError(
        f"sample {batch.start + bad} came out non-finite (NaN or inf), first {found} (forward step index, "
        f"0 = noisiest, of {sampler.num_steps}); nothing of its batch [{batch.start}, {batch.stop}) was stored or "
        "recorded. Check cfg_scale, the sampler and method settings and the weights (precision=fp32 rules out "
        "bf16 overflow)")


def generate(model: nn.Module, sampler: Sampler, denoiser: CFGDenoiser, method: CacheMethod, *, seed: int,
             indices: range, batch_size: int, device: torch.device, vae: torch.nn.Module | None = None,
             progress: bool = True, warmup_batches: int = 0, precision: str = "fp32", desc: str = "sampling",
             leave: bool = True, batch_invariant: int = 0) -> SampleSet:
    """All of ``indices`` (a range from 0) in memory: calibration, diagnostics and tests."""
    if indices.start != 0 or indices.step != 1:
        raise ValueError(f"indices must be range(0, n), got {indices}")
    n = len(indices)
    return SampleSet.from_batches(list(generate_batches(
        model, sampler, denoiser, method, seed=seed, num_samples=n, batch_size=batch_size,
        starts=batch_starts(n, batch_size), device=device, vae=vae, progress=progress,
        warmup_batches=warmup_batches, precision=precision, desc=desc, leave=leave,
        batch_invariant=batch_invariant)))


# --------------------------------------------------------------------------------------------
# Shards: ranks, resume, the full-compute pair
# --------------------------------------------------------------------------------------------


@dataclass
class Session:
    """What one sampling session of the group did: samples drawn, wall seconds, and who else used
    the device during batches that were to be timed (rank 0's view)."""

    drawn: int = 0
    seconds: float = 0.0
    shared: list[str] = field(default_factory=list)
    loads: list[tuple[float, float]] = field(default_factory=list)  # (other processes' cores, seconds) per timed batch


def sample_into(store: ShardStore, draw: Callable[[list[int], bool], Iterator[Batch]], grp: Group,
                timed: bool) -> Session:
    """Draw this rank's missing batches into ``store``; every rank waits for the others."""
    mine = store.missing(rank_starts(store.num_samples, store.batch_size, grp.rank, grp.world_size))
    todo = store.missing(batch_starts(store.num_samples, store.batch_size))
    barrier()
    t0 = time.perf_counter()
    session = Session()
    for batch in draw(mine, timed):
        store.write(batch)
        if batch.shared:
            session.shared.append(batch.shared)
        elif batch.load is not None:
            session.loads.append((batch.load, batch.latency))
    barrier()
    session.seconds = time.perf_counter() - t0
    session.drawn = sum(_batch_len(s, store.batch_size, store.num_samples) for s in todo)
    return session


def manifest_config(plan: RunPlan) -> dict:
    """What a run folder's samples depend on, as its manifest records it: the sample setting
    (rfc.run.setting) and the method's configuration. A resume that changes any of it is refused."""
    return {**plan.setting, "method": OmegaConf.to_container(plan.cfg.method, resolve=True)}


@dataclass
class Drawer:
    """A built model with its sampler, guidance, VAE and the run's sampling settings: draws a
    method's batches into a shard store (the run's own samples, or a full-compute set for
    pairing), with the method attached to the model while it draws."""

    model: nn.Module
    sampler: Sampler
    denoiser: CFGDenoiser
    vae: torch.nn.Module | None
    device: torch.device
    seed: int
    warmup_batches: int
    precision: str
    batch_invariant: int  # rows per tile of the batch-invariant numerics (0: off)
    progress: bool  # a progress bar (the caller passes it for rank 0 only)
    grp: Group
    use: DeviceUse  # who else uses the device during timed batches
    listeners: list[BatchListener] = field(default_factory=list)  # told of every batch (W&B), after run.log

    def _on_batch(self, report: BatchReport, milestones: Milestones) -> None:
        if not self.grp.is_main:
            return
        milestones(report)
        for listener in self.listeners:
            listener(report)

    def draw_into(self, target: ShardStore, meth: CacheMethod, timed: bool, desc: str) -> Session:
        """This rank's missing batches of ``target`` drawn with ``meth`` (see sample_into)."""

        milestones = Milestones(self.grp.world_size)

        def draw(starts: list[int], timed: bool) -> Iterator[Batch]:
            meth.attach(self.model)
            try:
                yield from generate_batches(self.model, self.sampler, self.denoiser, meth, seed=self.seed,
                                            num_samples=target.num_samples, batch_size=target.batch_size,
                                            starts=starts, device=self.device, vae=self.vae, progress=self.progress,
                                            warmup_batches=self.warmup_batches, timed=timed,
                                            precision=self.precision, batch_invariant=self.batch_invariant,
                                            device_use=self.use if timed else None,
                                            desc=desc, on_batch=lambda r: self._on_batch(r, milestones))
            finally:
                meth.detach()

        return sample_into(target, draw, self.grp, timed)


def open_store(store: ShardStore, grp: Group) -> int:
    """Rank 0 verifies the shards already in the folder (rejects are named and set aside, to be
    redrawn) and writes the manifest; every rank waits. Returns the samples already on disk."""
    resumed = 0
    if grp.is_main:
        resumed, problems = store.verify()
        for problem in problems:
            LOG.warning("%s", problem)
        store.create()
    barrier()
    return resumed


def claim_entry(entry: FullComputeEntry) -> bool:
    """Take the store entry for this full-compute run to publish its samples into: only when no
    complete set is there and no other job is drawing one."""
    if entry.try_lock() is not None:
        return False
    if entry.complete():
        entry.release()
        return False
    return True


WAIT_POLL_S = 2.0  # how often a job waiting for a full-compute set checks the store's lock


def lock_entry(entry: FullComputeEntry, grp: Group) -> None:
    """Rank 0 takes the entry's lock, waiting while another job draws the set. The wait is a
    series of short polls that every rank joins, so no collective of a torchrun group times out
    during a 45-minute wait."""
    since, last_said = time.monotonic(), None
    while True:
        holder = entry.try_lock() if grp.is_main else None
        if broadcast(holder is None):
            return
        waited = time.monotonic() - since
        if grp.is_main and (last_said is None or waited - last_said >= 60):
            line = (f"waiting for the full-compute set {entry.id}, which {holder} is drawing "
                    f"({waited / 60:.0f} min so far); it will be reused, not drawn again")
            print(line)
            LOG.info("%s", line)
            last_said = waited
        time.sleep(WAIT_POLL_S)


def full_compute_pair(entry: FullComputeEntry, mode: str, grp: Group,
                      draw: Callable[[ShardStore], Session]) -> tuple[FullComputeEntry | None, bool]:
    """The full-compute set of this run's setting from the store: used when it is there; with
    ``eval.paired=auto`` drawn under the entry's lock when it is not (after waiting for any job
    already drawing it, and resuming a killed draw from its shards). Returns the entry (None when
    ``find`` found nothing) and whether this run drew it."""
    if broadcast(entry.complete() if grp.is_main else None):
        return entry, False
    if mode != "auto":
        return None, False
    lock_entry(entry, grp)
    drew = False
    try:
        if not broadcast(entry.complete() if grp.is_main else None):
            n, batch = int(entry.setting["num_samples"]), int(entry.setting["batch_size"])
            shards = ShardStore(entry.folder, {**entry.setting, "method": "none"}, n, batch)
            shards.check()
            resumed = open_store(shards, grp)
            if grp.is_main:
                LOG.info("drawing the full-compute set %s into %s (%d of %d samples already there)", entry.id,
                         entry.folder, resumed, n)
            draw(shards)
            if grp.is_main:
                full = SampleSet.from_batches(shards.load_all())
                staging = entry.folder / "drawn.npz"
                atomic_savez(staging, arr_0=full.images, arr_1=full.labels)
                entry.publish(staging, source="drawn for pairing")
                staging.unlink()
            drew = True
            barrier()
    finally:
        if grp.is_main:
            entry.release()
    return entry, drew


def _batch_len(start: int, batch_size: int, n: int) -> int:
    return min(batch_size, n - start)


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """Sizes of the batches that split n samples (the last may be smaller): weights for means."""
    return [_batch_len(s, batch_size, n) for s in batch_starts(n, batch_size)]

