"""One run: build model, method and sampler from the config, generate a sample set with paired
randomness, score it, and record one row.

Every check that can fail (missing checkpoint, VAE, classifier, bad sizes) runs before the
first sample is drawn, so a mistake costs seconds, not a sampling job.
"""

from __future__ import annotations

import contextlib
import csv
import json
import statistics
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from eval.extractors import check_reference, get_extractor, resolve_reference
from eval.loggers import build_loggers, cell
from eval.metrics import psnr_ssim
from eval.stats import distances, quality_metrics, save_stats, stats_of
from rfc.cache import CacheMethod, MethodStats, NoCache
from rfc.distributed import Group, barrier, broadcast, group
from rfc.images import save_grid, to_uint8_nhwc
from rfc.models.dit import DiT, DiTConfig, dit_config
from rfc.models.load import build_dit, require_file
from rfc.models.vae import LATENT_DOWNSAMPLE, check_vae_folder, decode, load_vae, random_vae, vae_folder
from rfc.record import RunRecord, git_sha
from rfc.samplers.sampling import CFGDenoiser, Sampler
from rfc.seeding import SampleStreams
from rfc.shards import Batch, ShardStore, atomic_savez, batch_starts, rank_starts, sample_config

REPO_ROOT = Path(__file__).resolve().parents[1]
VAE_CHOICES = ("ema", "mse", "none")


# --------------------------------------------------------------------------------------------
# Config -> objects
# --------------------------------------------------------------------------------------------


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The configured device; under torchrun, "auto" and "cuda" mean this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={name} requested but CUDA is not available")
    return device


def model_config(m: DictConfig) -> DiTConfig:
    """DiTConfig from configs/model/*.yaml: a named arch ("DiT-XL/2") or explicit sizes."""
    if m.vae not in VAE_CHOICES:
        raise ValueError(f"model.vae must be one of {VAE_CHOICES}, got {m.vae!r}")
    latent = m.vae != "none"
    if latent and m.image_size % LATENT_DOWNSAMPLE:
        raise ValueError(f"image_size {m.image_size} is not a multiple of {LATENT_DOWNSAMPLE}")
    input_size = m.image_size // LATENT_DOWNSAMPLE if latent else m.image_size
    common = dict(input_size=input_size, in_channels=m.in_channels, num_classes=m.num_classes,
                  learn_sigma=m.learn_sigma, class_dropout_prob=m.class_dropout_prob)
    if m.get("arch"):
        return dit_config(m.arch, **common)
    return DiTConfig(patch_size=m.patch_size, hidden_size=m.hidden_size, depth=m.depth,
                     num_heads=m.num_heads, **common)


PRECISIONS = ("fp32", "tf32", "bf16")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")


@contextlib.contextmanager
def precision_mode(precision: str, device: torch.device) -> Iterator[None]:
    """Numerics of the sampling loop. fp32: exact fp32 matmuls. tf32 (default): fp32 storage with
    TF32 tensor-core matmuls and convolutions on GPUs that have them (on a CPU it equals fp32).
    bf16: autocast of matmuls and attention to bfloat16; the residual stream, the sampler and the
    cache keep their own dtypes. The previous global settings are restored afterwards."""
    check_precision(precision)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        if precision == "bf16":
            with torch.autocast(device.type, dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def compile_for(model: DiT, method: CacheMethod) -> None:
    """``compile=true``: torch.compile the full-compute path in place (state_dict unchanged).
    Full compute compiles the whole forward; with a caching method the blocks' attention and MLP
    modules are compiled (the blocks themselves route through the method) and the method's fused
    cached step is compiled too."""
    if isinstance(method, NoCache):
        model.compile(dynamic=False)
        return
    for block in model.blocks:
        block.attn.compile(dynamic=False)
        block.mlp.compile(dynamic=False)
    method.compile = True


@dataclass
class RunPlan:
    """Validated settings of a run, derived from the config before any heavy work."""

    cfg: DictConfig
    device: torch.device
    dit: DiTConfig
    num_samples: int
    batch_size: int
    score: bool
    extractor: str | None
    out_dir: Path
    method: CacheMethod
    sampler: Sampler
    paths: dict = field(default_factory=dict)


def plan_run(cfg: DictConfig, out_dir: str | Path) -> RunPlan:
    """Validate the config and check every input file; raises before anything expensive."""
    ev, m = cfg.eval, cfg.model
    if int(ev.num_samples) < 1:
        raise ValueError(f"eval.num_samples must be >= 1, got {ev.num_samples}")
    if int(ev.batch_size) < 1:
        raise ValueError(f"eval.batch_size must be >= 1, got {ev.batch_size}")
    if int(cfg.seed) < 0:
        raise ValueError(f"seed must be >= 0, got {cfg.seed}")
    if int(ev.warmup_batches) < 0:
        raise ValueError(f"eval.warmup_batches must be >= 0, got {ev.warmup_batches}")
    if ev.paired is False:  # YAML reads a bare off as false
        ev.paired = "off"
    if str(ev.paired) not in ("auto", "find", "off"):
        raise ValueError(f"eval.paired must be auto, find or off, got {ev.paired!r}")
    check_precision(str(cfg.get("precision", "tf32")))
    dit = model_config(m)
    if int(m.guided_channels) < 1 or int(m.guided_channels) > dit.in_channels:
        raise ValueError(f"model.guided_channels must be in 1..{dit.in_channels}, got {m.guided_channels}")
    if float(cfg.cfg_scale) > 1.0 and dit.class_dropout_prob <= 0:
        raise ValueError("guidance needs a null class: model.class_dropout_prob must be > 0 when cfg_scale > 1")
    device = resolve_device(str(cfg.device), group().local_rank)
    method = build(cfg.method, "method")
    sampler = build(cfg.sampler, "sampler", learn_sigma=dit.learn_sigma)
    paths = OmegaConf.to_container(cfg.paths, resolve=True)
    if m.pretrained:
        require_file(m.checkpoint, f"{m.name} checkpoint")
    if m.vae != "none" and m.vae_pretrained:
        check_vae_folder(vae_folder(paths["assets"], m.vae))
    if not m.pretrained:
        vae_note = "" if m.vae == "none" else (" and a random VAE" if not m.vae_pretrained else "")
        print(f"note: model.pretrained=false: random DiT weights{vae_note} (timing is real, images are not)"
              + ("" if ev.score else "; quality metrics skipped (eval.score=false)"))
    score = bool(ev.score)
    extractor = str(ev.extractor) if score else None
    if score:
        get_extractor(extractor).check(paths)
        check_reference(str(ev.reference))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return RunPlan(cfg, device, dit, int(ev.num_samples), int(ev.batch_size), score, extractor, out, method,
                   sampler, paths)


def build_model(plan: RunPlan) -> tuple[DiT, CFGDenoiser]:
    """The planned DiT on its device (checkpoint or random init) and its guidance wrapper."""
    m = plan.cfg.model
    model = build_dit(plan.dit, m.checkpoint if m.pretrained else None, init=m.init, seed=int(plan.cfg.seed))
    model = model.to(plan.device)
    denoiser = CFGDenoiser(model, float(plan.cfg.cfg_scale), null_class=plan.dit.num_classes,
                           guided_channels=int(m.guided_channels))
    return model, denoiser


def build(node: DictConfig, group: str, **kwargs: object) -> object:
    """Instantiate a config group's ``_target_``; a constructor's validation error comes out as
    the ValueError it raised (naming the key), not wrapped in Hydra's exception."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as err:
        cause = err.__cause__
        if isinstance(cause, (ValueError, TypeError)):
            raise ValueError(f"{group}: {cause}") from cause
        raise


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


@dataclass
class SampleSet:
    images: np.ndarray  # uint8 (N, H, W, C)
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


class _Clock:
    """Wall time of a region: CUDA events on a GPU (no host sync inside the region), perf_counter
    on the CPU."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def __enter__(self) -> _Clock:
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
def generate_batches(model: DiT, sampler: Sampler, denoiser: CFGDenoiser, method: CacheMethod, *, seed: int,
                     num_samples: int, batch_size: int, starts: list[int], device: torch.device,
                     vae: torch.nn.Module | None = None, progress: bool = True, warmup_batches: int = 0,
                     timed: bool = True, precision: str = "fp32") -> Iterator[Batch]:
    """Draw the batches [start, start + batch_size) for each of ``starts``, one at a time, so the
    caller can store each before the next begins; sample i's label and noise come from stream
    (seed, i), so a batch does not depend on which process draws it or when.

    Latency: the first ``warmup_batches`` batches are not timed (they pay one-time allocation,
    kernel selection and caching costs); when there are not more batches than that, the first is
    run that many extra times, untimed and discarded, before sampling. ``timed=False`` marks
    every batch unmeasured (a session whose timing is not trustworthy, e.g. several processes)."""
    cfg = model.config
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    extra = warmup_batches if len(starts) <= warmup_batches else 0
    bar = tqdm(total=sum(_batch_len(s, batch_size, num_samples) for s in starts), unit="img", desc="sampling",
               disable=not progress)
    for i, start in enumerate(starts[:1] * extra + starts):
        batch = range(start, min(start + batch_size, num_samples))
        streams = SampleStreams(seed, batch, device)
        y = streams.labels(cfg.num_classes)
        x = streams.randn(shape)
        method.reset()
        with _Clock(device) as clock, precision_mode(precision, device):
            x = sampler.sample(denoiser, x, y, noise=streams.noise_source(shape), listener=method)
        x = x.float()
        if i < extra:
            continue  # an untimed warm-up pass: nothing kept
        vae_seconds = None
        if vae is not None:
            with _Clock(device) as vae_clock:
                x = decode(vae, x)
            vae_seconds = vae_clock.seconds
        yield Batch(start, to_uint8_nhwc(x), y.cpu().numpy().astype(np.int64), method.stats(), clock.seconds,
                    vae_seconds, timed and (extra > 0 or i - extra >= warmup_batches))
        bar.update(len(batch))
    bar.close()


def generate(model: DiT, sampler: Sampler, denoiser: CFGDenoiser, method: CacheMethod, *, seed: int,
             indices: range, batch_size: int, device: torch.device, vae: torch.nn.Module | None = None,
             progress: bool = True, warmup_batches: int = 0, precision: str = "fp32") -> SampleSet:
    """All of ``indices`` (a range from 0) in memory: calibration, diagnostics and tests."""
    if indices.start != 0 or indices.step != 1:
        raise ValueError(f"indices must be range(0, n), got {indices}")
    n = len(indices)
    return SampleSet.from_batches(list(generate_batches(
        model, sampler, denoiser, method, seed=seed, num_samples=n, batch_size=batch_size,
        starts=batch_starts(n, batch_size), device=device, vae=vae, progress=progress,
        warmup_batches=warmup_batches, precision=precision)))


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _sample_into(store: ShardStore, draw: Callable[[list[int], bool], Iterator[Batch]], grp: Group,
                 timed: bool) -> tuple[int, float]:
    """Draw this rank's missing batches into ``store``; every rank waits for the others. Returns
    the number of samples the whole group drew in this session and its wall seconds."""
    mine = store.missing(rank_starts(store.num_samples, store.batch_size, grp.rank, grp.world_size))
    todo = store.missing(batch_starts(store.num_samples, store.batch_size))
    barrier()
    t0 = time.perf_counter()
    for batch in draw(mine, timed):
        store.write(batch)
    barrier()
    seconds = time.perf_counter() - t0
    return sum(_batch_len(s, store.batch_size, store.num_samples) for s in todo), seconds


def run(cfg: DictConfig, out_dir: str | Path, progress: bool = True, sweep: str | None = None,
        launcher: str = "basic") -> RunRecord | None:
    """Execute one configured run and hand its row to the configured loggers (CSV, W&B).

    Samples go to shards in ``out_dir`` as they are drawn: a rerun on the same folder draws only
    what is missing. Under torchrun every rank draws its share of the batches; rank 0 merges,
    scores and logs (other ranks return None). Latency is measured only when one process draws
    the samples under the basic launcher; otherwise the row records throughput alone."""
    grp = group()
    plan = plan_run(cfg, out_dir)
    store = ShardStore(plan.out_dir, sample_config(cfg), plan.num_samples, plan.batch_size)
    resumed = store.check()  # a folder of another configuration is refused here, before any work
    loggers = build_loggers(cfg, sweep) if grp.is_main else []  # fails fast, e.g. W&B online without a login
    if grp.is_main:
        store.create()
    barrier()
    m, device = cfg.model, plan.device
    torch.set_grad_enabled(False)

    model, denoiser = build_model(plan)
    vae = None
    if m.vae != "none":
        vae = load_vae(vae_folder(plan.paths["assets"], m.vae)) if m.vae_pretrained else random_vae(int(cfg.seed))
        vae = vae.to(device)
    method, sampler = plan.method, plan.sampler
    if cfg.compile:
        compile_for(model, method)
    single = not grp.distributed and launcher == "basic"

    def sample_into(target: ShardStore, meth: CacheMethod, show: bool) -> tuple[int, float]:
        def draw(starts: list[int], timed: bool) -> Iterator[Batch]:
            meth.attach(model)
            try:
                yield from generate_batches(model, sampler, denoiser, meth, seed=int(cfg.seed),
                                            num_samples=plan.num_samples, batch_size=plan.batch_size,
                                            starts=starts, device=device, vae=vae, progress=show,
                                            warmup_batches=int(cfg.eval.warmup_batches), timed=timed,
                                            precision=str(cfg.precision))
            finally:
                meth.detach()

        return _sample_into(target, draw, grp, single)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    drawn, seconds = sample_into(store, method, progress and grp.is_main)
    peak_gb = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None

    if grp.is_main:
        samples, record, npz_path, grid_path = _merge_and_record(plan, store, denoiser, grp, launcher, single,
                                                                 sweep, drawn, seconds, resumed, peak_gb)
    mode = str(cfg.eval.paired)
    # Paired full compute: rank 0 looks for a matching run in runs.csv; if none, the group draws one.
    pair_folder = None
    if grp.is_main and plan.score and method.name != "none" and mode != "off":
        pair_folder = find_full_compute(record, plan.paths["runs_csv"])
    generate_pair = bool(broadcast(grp.is_main and plan.score and method.name != "none" and mode == "auto"
                                   and pair_folder is None))
    pair_store = None
    if generate_pair:
        pair_store = ShardStore(plan.out_dir / "full_compute", {**store.config, "method": "none"},
                                plan.num_samples, plan.batch_size)
        pair_store.check()
        if grp.is_main:
            pair_store.create()
        barrier()
        sample_into(pair_store, NoCache(), False)
    if not grp.is_main:
        return None
    notes = [record.notes] if record.notes else []
    if plan.score:
        pair_images = None
        if pair_store is not None:
            pair_images = SampleSet.from_batches(pair_store.load_all()).images
            atomic_savez(pair_store.folder / "samples.npz", arr_0=pair_images, arr_1=samples.labels)
        record = score(record, samples, plan, pair_folder, pair_images, notes)

    (plan.out_dir / "record.json").write_text(json.dumps(record.as_dict(), indent=2) + "\n")
    print(f"samples: {npz_path}\ngrid:    {grid_path}")
    for logger in loggers:
        print(logger.log(record, plan.out_dir))
    return record


def _merge_and_record(plan: RunPlan, store: ShardStore, denoiser: CFGDenoiser, grp: Group, launcher: str,
                      single: bool, sweep: str | None, drawn: int, seconds: float, resumed: int,
                      peak_gb: float | None) -> tuple[SampleSet, RunRecord, Path, Path]:
    """Rank 0: merge the shards into samples.npz, grid and schedules, and fill the row's
    accounting and timing columns (quality metrics come later)."""
    cfg, m, method, sampler = plan.cfg, plan.cfg.model, plan.method, plan.sampler
    samples = SampleSet.from_batches(store.load_all())
    npz_path = plan.out_dir / "samples.npz"
    atomic_savez(npz_path, arr_0=samples.images, arr_1=samples.labels)  # ADM layout: images, labels
    grid_path = save_grid(samples.images, plan.out_dir / "grid.png", n=int(cfg.eval.grid_size))
    schedules = [{"batch": b.start // plan.batch_size, "first_index": b.start, "full_steps": b.stats.full_indices}
                 for b in samples.batches]  # forward-order indices of the full steps
    (plan.out_dir / "schedules.json").write_text(json.dumps(schedules) + "\n")

    weights = batch_sizes(plan.num_samples, plan.batch_size)

    def mean(values: list[float]) -> float:
        return float(np.average(values, weights=weights))

    d = plan.dit
    flops = [s.flops(denoiser.batch_multiplier, d.num_tokens, d.hidden_size, d.num_heads) for s in samples.stats]
    notes = []
    # Latency: single-process batches only (a resumed run may combine several such sessions).
    timed = samples.timed if single else []
    latency = spread = images_per_s = None
    if timed:
        latencies = [b.latency for b in timed]
        latency, spread = statistics.median(latencies), max(latencies) - min(latencies)
        images_per_s = sum(len(b.labels) for b in timed) / sum(latencies)
    elif drawn:
        images_per_s = drawn / seconds
    if not single:
        how = f"{grp.world_size} processes" if grp.distributed else f"launcher={launcher}"
        notes.append(f"latency not measured ({how}); images_per_s is this session's throughput")
    elif not timed:
        notes.append("latency not measured: no batch of this run was timed in a single-process session")
    if resumed:
        notes.append(f"resumed: {resumed} of {plan.num_samples} samples drawn by an earlier session")
    vae_times = [b.vae_latency for b in timed if b.vae_latency is not None]
    record = RunRecord(
        git_sha=git_sha(REPO_ROOT), experiment=cfg.get("experiment_name"), variant=cfg.get("variant_name"),
        sweep=sweep, model=str(m.name), arch=str(m.get("arch") or "custom"),
        image_size=int(m.image_size), method=method.name, method_params=json.dumps(method.params(), sort_keys=True),
        sampler=sampler.name, respacing=sampler.respacing, num_steps=sampler.num_steps,
        cfg_scale=float(cfg.cfg_scale), guided_channels=int(m.guided_channels), seed=int(cfg.seed),
        num_samples=plan.num_samples, batch_size=plan.batch_size,
        nfc=mean([s.full_steps for s in samples.stats]), tflops=mean(flops) / 1e12,
        full_sites=mean([s.full_sites for s in samples.stats]),
        cached_sites=mean([s.cached_sites for s in samples.stats]),
        partial_sites=mean([s.partial_sites for s in samples.stats]),
        full_blocks=mean([s.full_blocks for s in samples.stats]),
        partial_blocks=mean([s.partial_blocks for s in samples.stats]),
        cache_bytes=max(s.cache_bytes_peak for s in samples.stats),
        latency_s=latency, latency_spread_s=spread, timed_batches=len(timed), images_per_s=images_per_s,
        vae_latency_s=statistics.median(vae_times) if vae_times else None,
        peak_memory_gb=peak_gb, processes=grp.world_size,
        vae=None if m.vae == "none" else f"sd-vae-ft-{m.vae}" + ("" if m.vae_pretrained else " (random)"),
        extractor=get_extractor(plan.extractor).name if plan.score else None,  # pairing needs it first
        device=_device_name(plan.device), dtype=str(cfg.precision) + ("+compile" if cfg.compile else ""),
        torch_version=torch.__version__,
        output_dir=str(plan.out_dir), notes="; ".join(notes) or None,
    )
    return samples, record, npz_path, grid_path


PAIRING_COLUMNS = ("model", "arch", "image_size", "sampler", "respacing", "num_steps", "cfg_scale",
                   "guided_channels", "seed", "num_samples", "vae", "extractor")


def find_full_compute(record: RunRecord, runs_csv: str | Path) -> Path | None:
    """Output folder of the latest full-compute run with the same model, sampler, guidance, seeds
    and sample count (so sample i of both sets started from the same noise), with its files."""
    path = Path(runs_csv)
    if not path.exists():
        return None
    want = {c: cell(getattr(record, c)) for c in PAIRING_COLUMNS}
    with path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("method") == "none"
                and all(r.get(c, "") == v for c, v in want.items())]
    for row in reversed(rows):
        folder = Path(row.get("output_dir") or "")
        if (folder / "samples.npz").exists() and (folder / "stats.npz").exists():
            return folder
    return None


def score(record: RunRecord, samples: SampleSet, plan: RunPlan, pair_folder: Path | None = None,
          pair_images: np.ndarray | None = None, notes: list[str] | None = None) -> RunRecord:
    """Quality metrics against the reference, and paired metrics against full compute: the run
    itself for method=none, else a matching earlier run (``pair_folder``) or full-compute samples
    drawn for this run (``pair_images``)."""
    spec = get_extractor(plan.extractor)
    extract = spec.build(plan.paths, str(plan.device))
    feats = extract(samples.images)
    ref = resolve_reference(str(plan.cfg.eval.reference), spec, extract)
    reason = "the Inception weights have no logits layer" if spec.name.startswith("inception") else None
    own = stats_of(feats)  # computed once: metrics, stats.npz and the paired distances share it
    q = quality_metrics(feats, ref, reason, own)
    record.extractor, record.reference = spec.name, ref.name
    record.fid, record.sfid, record.inception_score = q["fid"], q["sfid"], q["inception_score"]
    record.precision, record.recall = q["precision"], q["recall"]
    notes = list(notes or []) + ([q["notes"]] if q["notes"] else [])
    if "predictions" in feats:
        record.class_acc = float((feats["predictions"] == samples.labels).mean())
    save_stats(plan.out_dir / "stats.npz", feats, spec.name, own)

    pair_stats = None
    if record.method == "none":
        pair_images, pair_stats = samples.images, own  # full compute is its own pair
    elif pair_folder is not None:
        pair_images = np.load(pair_folder / "samples.npz")["arr_0"]
        with np.load(pair_folder / "stats.npz") as st:
            pair_stats = {k: st[k] for k in st.files if k.startswith(("mu", "sigma"))}
        notes.append(f"paired with {pair_folder}")
    elif pair_images is not None:
        pair_feats = extract(pair_images)
        pair_stats = stats_of(pair_feats)
        save_stats(plan.out_dir / "full_compute" / "stats.npz", pair_feats, spec.name, pair_stats)
        notes.append("full-compute pair generated on demand")
    if pair_stats is not None:
        record.fid2fc, record.sfid2fc = distances(own, pair_stats)
        record.psnr, record.ssim = psnr_ssim(samples.images, pair_images)
    record.notes = "; ".join(notes) or None
    return record


def _batch_len(start: int, batch_size: int, n: int) -> int:
    return min(batch_size, n - start)


def batch_sizes(n: int, batch_size: int) -> list[int]:
    """Sizes of the batches that split n samples (the last may be smaller): weights for means."""
    return [_batch_len(s, batch_size, n) for s in batch_starts(n, batch_size)]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
