"""One run: build model, method and sampler from the config, generate a sample set with paired
randomness, score it, and record one row.

Every check that can fail (missing checkpoint, VAE, classifier, bad sizes) runs before the
first sample is drawn, so a mistake costs seconds, not a sampling job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
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

from eval.extractors import check_reference, extractor_id, get_extractor, resolve_reference
from eval.loggers import build_loggers
from eval.metrics import psnr_ssim
from eval.stats import check_features, distances, quality_metrics, save_stats, stats_of
from rfc.cache import CacheMethod, MethodStats, NoCache
from rfc.devices import DeviceUse, concurrency
from rfc.distributed import Group, barrier, broadcast, group
from rfc.errors import ConfigError, FolderLockedError, NonFiniteError, RunError
from rfc.files import FolderLock, atomic_savez, atomic_write_text, check_writable_file, memo_digest
from rfc.images import save_grid, to_uint8_nhwc
from rfc.models.dit import DiT, DiTConfig, dit_config
from rfc.models.load import build_dit, require_file
from rfc.models.vae import LATENT_DOWNSAMPLE, check_vae_folder, decode, load_vae, random_vae, vae_folder
from rfc.record import RunRecord, git_sha
from rfc.samplers.sampling import CFGDenoiser, Sampler, StepInfo
from rfc.seeding import SampleStreams
from rfc.setting import setting_id
from rfc.shards import Batch, ShardStore, batch_starts, rank_starts
from rfc.store import FullComputeEntry, digest_memo, link_or_copy, store_root
from rfc.validate import as_bool, as_float, as_int, check_arguments

LOG = logging.getLogger("rfc")
REPO_ROOT = Path(__file__).resolve().parents[1]
VAE_CHOICES = ("ema", "mse", "none")
MIN_SCORED_SAMPLES = 2  # a covariance needs two samples
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds


# --------------------------------------------------------------------------------------------
# Config -> objects
# --------------------------------------------------------------------------------------------


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The configured device; under torchrun, "auto" and "cuda" mean this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{local_rank}"
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ConfigError(f"device={name} is not a device torch knows: use auto, cpu, cuda or cuda:N") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={name} requested but CUDA is not available (use device=cpu or device=auto)")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"device={name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"device={name} is not supported: use auto, cpu, cuda or cuda:N")
    return device


def model_config(m: DictConfig) -> DiTConfig:
    """DiTConfig from configs/model/*.yaml: a named arch ("DiT-XL/2") or explicit sizes."""
    if m.vae not in VAE_CHOICES:
        raise ConfigError(f"model.vae must be one of {VAE_CHOICES}, got {m.vae!r}")
    latent = m.vae != "none"
    image_size = as_int(m.image_size, "model.image_size", 1)
    if latent and image_size % LATENT_DOWNSAMPLE:
        raise ConfigError(f"model.image_size {image_size} is not a multiple of {LATENT_DOWNSAMPLE} (the VAE's "
                          "downsampling)")
    input_size = image_size // LATENT_DOWNSAMPLE if latent else image_size
    common = dict(input_size=input_size, in_channels=as_int(m.in_channels, "model.in_channels", 1),
                  num_classes=as_int(m.num_classes, "model.num_classes", 1),
                  learn_sigma=as_bool(m.learn_sigma, "model.learn_sigma"),
                  class_dropout_prob=as_float(m.class_dropout_prob, "model.class_dropout_prob", 0.0, 1.0))
    if m.get("arch"):
        config = dit_config(m.arch, **common)
    else:
        config = DiTConfig(patch_size=as_int(m.patch_size, "model.patch_size", 1),
                           hidden_size=as_int(m.hidden_size, "model.hidden_size", 1),
                           depth=as_int(m.depth, "model.depth", 1), num_heads=as_int(m.num_heads, "model.num_heads", 1),
                           **common)
    if config.input_size % config.patch_size:
        raise ConfigError(f"model.image_size {image_size} gives a {config.input_size}-pixel input, which patch size "
                          f"{config.patch_size} does not divide")
    if config.hidden_size % config.num_heads:
        raise ConfigError(f"model.hidden_size {config.hidden_size} is not divisible by model.num_heads "
                          f"{config.num_heads}")
    return config


PRECISIONS = ("fp32", "tf32", "bf16", "bf16-autocast")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def apply_precision(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """The weights' side of a precision mode, applied once after loading, before any sampling.
    ``bf16``: every parameter and buffer converted to bfloat16 in place (the DiT casts its input
    latents to the weights' dtype and returns fp32, so the sampler, guidance and VAE stay fp32).
    fp32, tf32 and bf16-autocast keep the fp32 weights: the model is returned untouched."""
    check_precision(precision)
    if precision == "bf16":
        model.to(torch.bfloat16)
    return model


@contextlib.contextmanager
def precision_mode(precision: str, device: torch.device) -> Iterator[None]:
    """Numerics of the sampling loop. fp32: exact fp32 matmuls. tf32 (default): fp32 storage with
    TF32 tensor-core matmuls and convolutions on GPUs that have them (on a CPU it equals fp32).
    bf16: the weights are stored in bfloat16 (apply_precision, once); no autocast here, TF32 flags
    as for tf32 (they only touch what stays fp32). bf16-autocast: fp32 weights, autocast of matmuls
    and attention to bfloat16 (every forward re-casts the weights); the residual stream, the
    sampler and the cache keep their own dtypes. The previous global settings are restored
    afterwards."""
    check_precision(precision)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        if precision == "bf16-autocast":
            with torch.autocast(device.type, dtype=torch.bfloat16):
                yield
        else:
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def compile_for(model: DiT, method: CacheMethod) -> None:
    """``compile=true``: torch.compile what runs (state_dict unchanged). Full compute compiles the
    whole forward. A method with step programs (FORA, TaylorSeer, RFC's fused configurations)
    compiles them: each full and each cached step is one graph, as fast as the plain compiled
    forward plus the method's own stores. The others (ToCa, RFC's per-site variants) route the
    blocks per site, so their attention and MLP modules are compiled instead."""
    if isinstance(method, NoCache):
        model.compile(dynamic=False)
        return
    method.compile = True
    if method.fused and method.can_fuse():
        return
    for block in model.blocks:
        block.attn.compile(dynamic=False)
        block.mlp.compile(dynamic=False)


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
    setting: dict = field(default_factory=dict)  # rfc.setting.SAMPLE_KEYS -> value: what fixes the samples


def plan_run(cfg: DictConfig, out_dir: str | Path) -> RunPlan:
    """Validate the config and check every input and output file; raises before anything
    expensive, naming the key or file at fault."""
    ev, m = cfg.eval, cfg.model
    num_samples = as_int(ev.num_samples, "eval.num_samples", 1)
    batch_size = as_int(ev.batch_size, "eval.batch_size", 1)
    as_int(cfg.seed, "seed", 0, MAX_SEED)
    as_int(ev.warmup_batches, "eval.warmup_batches", 0)
    as_int(ev.grid_size, "eval.grid_size", 1)
    cfg_scale = as_float(cfg.cfg_scale, "cfg_scale")
    as_bool(cfg.compile, "compile")
    score = as_bool(ev.score, "eval.score")
    if ev.paired is False:  # YAML reads a bare off as false
        ev.paired = "off"
    if str(ev.paired) not in ("auto", "find", "off"):
        raise ConfigError(f"eval.paired must be auto, find or off, got {ev.paired!r}")
    check_precision(str(cfg.get("precision", "tf32")))
    dit = model_config(m)
    if as_int(m.guided_channels, "model.guided_channels") < 1 or int(m.guided_channels) > dit.in_channels:
        raise ConfigError(f"model.guided_channels must be in 1..{dit.in_channels}, got {m.guided_channels}")
    if cfg_scale > 1.0 and dit.class_dropout_prob <= 0:
        raise ConfigError("guidance needs a null class: model.class_dropout_prob must be > 0 when cfg_scale > 1")
    if score and num_samples < MIN_SCORED_SAMPLES:
        raise ConfigError(f"eval.num_samples={num_samples} is too few to score (FID needs a covariance of at least "
                          f"{MIN_SCORED_SAMPLES} samples): raise it or set eval.score=false")
    device = resolve_device(str(cfg.device), group().local_rank)
    check_arguments(cfg.method, "method")
    check_arguments(cfg.sampler, "sampler")
    method = build(cfg.method, "method")
    sampler = build(cfg.sampler, "sampler", learn_sigma=dit.learn_sigma)
    paths = OmegaConf.to_container(cfg.paths, resolve=True)
    if m.pretrained:
        require_file(m.checkpoint, f"{m.name} checkpoint (model.checkpoint)")
    if m.vae != "none" and m.vae_pretrained:
        check_vae_folder(vae_folder(paths["assets"], m.vae))
    extractor = str(ev.extractor) if score else None
    if score:
        get_extractor(extractor).check(paths)
        check_reference(str(ev.reference))
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the run folder {out} ({err.strerror or err})") from err
    check_writable_file(out / "record.json", "the run folder's")
    if cfg.logger.get("csv"):
        check_writable_file(cfg.paths.runs_csv, "paths.runs_csv")
    check_writable_file(digest_memo(paths), "paths.store's")  # full-compute sets, statistics, digests
    if not m.pretrained:
        vae_note = "" if m.vae == "none" else (" and a random VAE" if not m.vae_pretrained else "")
        print(f"note: model.pretrained=false: random DiT weights{vae_note} (timing is real, images are not)"
              + ("" if score else "; quality metrics skipped (eval.score=false)"))
    plan = RunPlan(cfg, device, dit, num_samples, batch_size, score, extractor, out, method, sampler, paths)
    plan.setting = sample_setting(plan)
    return plan


def vae_name(m: DictConfig) -> str | None:
    return None if m.vae == "none" else f"sd-vae-ft-{m.vae}" + ("" if m.vae_pretrained else " (random)")


def sample_setting(plan: RunPlan) -> dict[str, object]:
    """The run's values of rfc.setting.SAMPLE_KEYS: what every sample's numbers depend on. The row
    records them column by column, the shard manifest refuses a resume that changes one, and the
    full-compute store files this setting's set under their id. Weights are named by content (the
    checkpoint's sha256, memoized in the store), random weights by their init and architecture
    (the seed is its own key)."""
    cfg, m = plan.cfg, plan.cfg.model
    if m.pretrained:
        weights = "sha256:" + memo_digest(m.checkpoint, digest_memo(plan.paths))[:16]
    else:
        arch = json.dumps(dataclasses.asdict(plan.dit), sort_keys=True)
        weights = f"random:{m.init}:{hashlib.sha256(arch.encode()).hexdigest()[:8]}"
    sampler = plan.sampler
    return dict(model=str(m.name), arch=str(m.get("arch") or "custom"), image_size=int(m.image_size),
                vae=vae_name(m), sampler=sampler.name, sampler_params=json.dumps(sampler.params(), sort_keys=True),
                respacing=sampler.respacing, num_steps=sampler.num_steps, cfg_scale=float(cfg.cfg_scale),
                guided_channels=int(m.guided_channels), checkpoint=weights, seed=int(cfg.seed),
                num_samples=plan.num_samples, batch_size=plan.batch_size, device=device_name(plan.device),
                precision_mode=str(cfg.precision), compile=as_bool(cfg.compile, "compile"))


def build_model(plan: RunPlan) -> tuple[DiT, CFGDenoiser]:
    """The planned DiT on its device (checkpoint or random init, loaded and checked in fp32, then
    converted by apply_precision for the run's precision) and its guidance wrapper."""
    m = plan.cfg.model
    model = build_dit(plan.dit, m.checkpoint if m.pretrained else None, init=m.init, seed=int(plan.cfg.seed))
    model = apply_precision(model.to(plan.device), str(plan.cfg.precision))
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
            raise ConfigError(str(cause) if str(cause).startswith(f"{group}.") else f"{group}: {cause}") from cause
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
                     timed: bool = True, precision: str = "fp32", device_use: DeviceUse | None = None,
                     desc: str = "sampling") -> Iterator[Batch]:
    """Draw the batches [start, start + batch_size) for each of ``starts``, one at a time, so the
    caller can store each before the next begins; sample i's label and noise come from stream
    (seed, i), so a batch does not depend on which process draws it or when.

    Latency: the first ``warmup_batches`` batches are not timed (they pay one-time allocation,
    kernel selection and caching costs); when there are not more batches than that, the first is
    run that many extra times, untimed and discarded, before sampling. ``timed=False`` marks
    every batch unmeasured (a session whose timing is not trustworthy, e.g. several processes).
    With ``device_use``, a batch during which another job of the harness used the device is not
    timed either, and names that job in ``Batch.shared``."""
    cfg = model.config
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    extra = warmup_batches if len(starts) <= warmup_batches else 0
    bar = tqdm(total=sum(_batch_len(s, batch_size, num_samples) for s in starts), unit="img", desc=desc,
               disable=not progress)
    try:
        for i, start in enumerate(starts[:1] * extra + starts):
            batch = range(start, min(start + batch_size, num_samples))
            streams = SampleStreams(seed, batch, device)
            y = streams.labels(cfg.num_classes)
            x = streams.randn(shape)
            method.reset()
            before = device_use.snapshot() if device_use is not None else None
            with _Clock(device) as clock, precision_mode(precision, device):
                x = sampler.sample(denoiser, x, y, noise=streams.noise_source(shape), listener=method)
            shared = DeviceUse.shared(before, device_use.snapshot()) if device_use is not None else None
            x = x.float()
            bad = _non_finite_rows(x)  # checked after the clock stopped: the check costs no latency
            if bad is not None:
                with precision_mode(precision, device):
                    raise _non_finite_batch(batch, bad, sampler, denoiser, method, SampleStreams(seed, batch, device),
                                            shape, cfg)
            if i < extra:
                continue  # an untimed warm-up pass: nothing kept
            vae_seconds = None
            if vae is not None:
                with _Clock(device) as vae_clock:
                    x = decode(vae, x)
                vae_seconds = vae_clock.seconds
                bad = _non_finite_rows(x)
                if bad is not None:
                    raise NonFiniteError(f"sample {start + bad} is finite in latent space but the VAE decoded it to "
                                         "NaN or inf: the VAE weights are damaged (fetch them again)")
            measured = timed and (extra > 0 or i - extra >= warmup_batches)
            yield Batch(start, to_uint8_nhwc(x), y.cpu().numpy().astype(np.int64), method.stats(), clock.seconds,
                        vae_seconds, measured and shared is None, shared if measured else None)
            bar.update(len(batch))
    finally:
        bar.close()  # before any error line reaches the terminal


def _non_finite_rows(x: torch.Tensor) -> int | None:
    """Index (within the batch) of the first sample holding NaN or inf, or None."""
    finite = torch.isfinite(x).flatten(1).all(1)
    if bool(finite.all()):
        return None
    return int((~finite).nonzero()[0, 0])


class _StepWatch:
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
        if self.found is None and _non_finite_rows(x) is not None:
            self.found = f"in the sampler update after step {self.step - 1}" if self.step else "in the initial noise"
        out = self.denoiser(x, t, y)
        if self.found is None and _non_finite_rows(out.float()) is not None:
            self.found = f"in the model output at step {self.step}"
        return out


def _non_finite_batch(batch: range, bad: int, sampler: Sampler, denoiser: CFGDenoiser, method: CacheMethod,
                      streams: SampleStreams, shape: tuple[int, ...], cfg: DiTConfig) -> NonFiniteError:
    """The error for a batch that came out non-finite. To say at which step, the batch is drawn
    again (same noise, same method) watching every step: one extra batch, paid only on failure."""
    watch = _StepWatch(method, denoiser)
    method.reset()
    y = streams.labels(cfg.num_classes)
    sampler.sample(watch, streams.randn(shape), y, noise=streams.noise_source(shape), listener=watch)
    found = watch.found or f"in the last sampler update (step {sampler.num_steps - 1})"
    return NonFiniteError(
        f"sample {batch.start + bad} came out non-finite (NaN or inf), first {found} (forward step index, "
        f"0 = noisiest, of {sampler.num_steps}); nothing of its batch [{batch.start}, {batch.stop}) was stored or "
        "recorded. Check cfg_scale, the sampler and method settings and the weights (precision=fp32 rules out "
        "bf16 overflow)")


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


@dataclass
class Session:
    """What one sampling session of the group did: samples drawn, wall seconds, and who else used
    the device during batches that were to be timed (rank 0's view)."""

    drawn: int = 0
    seconds: float = 0.0
    shared: list[str] = field(default_factory=list)


def _sample_into(store: ShardStore, draw: Callable[[list[int], bool], Iterator[Batch]], grp: Group,
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
    barrier()
    session.seconds = time.perf_counter() - t0
    session.drawn = sum(_batch_len(s, store.batch_size, store.num_samples) for s in todo)
    return session


def manifest_config(plan: RunPlan) -> dict:
    """What a run folder's samples depend on, as its manifest records it: the sample setting
    (rfc.setting) and the method's configuration. A resume that changes any of it is refused."""
    return {**plan.setting, "method": OmegaConf.to_container(plan.cfg.method, resolve=True)}


def run(cfg: DictConfig, out_dir: str | Path, progress: bool = True, sweep: str | None = None,
        launcher: str = "basic", n_jobs: int | None = None) -> RunRecord | None:
    """Execute one configured run and hand its row to the configured loggers (CSV, W&B).

    Samples go to shards in ``out_dir`` as they are drawn: a rerun on the same folder draws only
    what is missing. Under torchrun every rank draws its share of the batches; rank 0 merges,
    scores and logs (other ranks return None). Latency is recorded only when the job had its
    device to itself (rfc.devices): one process, a launcher that runs jobs one at a time
    (``launcher``, Hydra's hydra/launcher choice, with joblib's ``n_jobs``), and no other job of
    the harness on the device during any timed batch."""
    grp = group()
    plan = plan_run(cfg, out_dir)
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
        with DeviceUse(plan.device) as use:
            return _run_locked(plan, store, loggers, grp, progress, sweep,
                               concurrency(launcher, n_jobs, grp.world_size), use)
    finally:
        lock.release()


def _run_locked(plan: RunPlan, store: ShardStore, loggers: list, grp: Group, progress: bool, sweep: str | None,
                busy: str | None, use: DeviceUse) -> RunRecord | None:
    cfg, m, device = plan.cfg, plan.cfg.model, plan.device
    torch.set_grad_enabled(False)
    model, denoiser = build_model(plan)  # unreadable or non-finite weights stop the run here
    vae = None
    if m.vae != "none":
        vae = load_vae(vae_folder(plan.paths["assets"], m.vae)) if m.vae_pretrained else random_vae(int(cfg.seed))
        vae = vae.to(device)
    resumed = _open_store(store, grp)
    method, sampler = plan.method, plan.sampler
    if cfg.compile:
        compile_for(model, method)
    entry = FullComputeEntry(store_root(plan.paths), plan.setting)
    # Full compute with no set in the store yet: this run's samples become the set. Its lock, held
    # while it samples, makes cached jobs of the setting wait for it rather than draw the set again.
    publish = grp.is_main and method.name == "none" and _claim(entry)

    def sample_into(target: ShardStore, meth: CacheMethod, timed: bool, desc: str) -> Session:
        def draw(starts: list[int], timed: bool) -> Iterator[Batch]:
            meth.attach(model)
            try:
                yield from generate_batches(model, sampler, denoiser, meth, seed=int(cfg.seed),
                                            num_samples=target.num_samples, batch_size=target.batch_size,
                                            starts=starts, device=device, vae=vae, progress=progress and grp.is_main,
                                            warmup_batches=int(cfg.eval.warmup_batches), timed=timed,
                                            precision=str(cfg.precision), device_use=use if timed else None,
                                            desc=desc)
            finally:
                meth.detach()

        return _sample_into(target, draw, grp, timed)

    try:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        session = sample_into(store, method, busy is None, "sampling")
        peak_gb = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
        if grp.is_main:
            samples, record, npz_path, grid_path = _merge_and_record(plan, store, denoiser, grp, busy, sweep, session,
                                                                     resumed, peak_gb)
            if publish:
                entry.publish(npz_path, source=f"method=none run {plan.out_dir}")
                LOG.info("published as the full-compute set %s (%s)", entry.id, entry.folder)
        pair, drawn_pair = None, False
        if plan.score and method.name != "none" and str(cfg.eval.paired) != "off":
            pair, drawn_pair = _full_compute_pair(
                entry, str(cfg.eval.paired), grp,
                lambda target: sample_into(target, NoCache(), False, "full compute (for pairing)"))
        if not grp.is_main:
            return None
        notes = [record.notes] if record.notes else []
        if plan.score:
            if pair is not None:
                notes.append(f"paired with full-compute set {pair.id} ({pair.folder}"
                             + (", drawn by this run)" if drawn_pair else ")"))
            elif method.name != "none" and str(cfg.eval.paired) == "find":
                notes.append(f"paired metrics missing: no full-compute set of this setting in {entry.folder.parent} "
                             "(eval.paired=find)")
            record = score(record, samples, plan, pair, notes, entry if publish else None)
    finally:
        if entry.held:
            entry.release()

    atomic_write_text(plan.out_dir / "record.json", json.dumps(record.as_dict(), indent=2) + "\n")
    print(f"samples: {npz_path}\ngrid:    {grid_path}")
    LOG.info("samples: %s; grid: %s; record: %s", npz_path, grid_path, plan.out_dir / "record.json")
    for logger in loggers:
        line = logger.log(record, plan.out_dir)
        print(line)
        LOG.info("%s", line)
    return record


def _claim(entry: FullComputeEntry) -> bool:
    """Take the store entry for this full-compute run to publish its samples into: only when no
    complete set is there and no other job is drawing one."""
    if entry.try_lock() is not None:
        return False
    if entry.complete():
        entry.release()
        return False
    return True


WAIT_POLL_S = 2.0  # how often a job waiting for a full-compute set checks the store's lock


def _lock_entry(entry: FullComputeEntry, grp: Group) -> None:
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


def _full_compute_pair(entry: FullComputeEntry, mode: str, grp: Group,
                       draw: Callable[[ShardStore], Session]) -> tuple[FullComputeEntry | None, bool]:
    """The full-compute set of this run's setting from the store: used when it is there; with
    ``eval.paired=auto`` drawn under the entry's lock when it is not (after waiting for any job
    already drawing it, and resuming a killed draw from its shards). Returns the entry (None when
    ``find`` found nothing) and whether this run drew it."""
    if broadcast(entry.complete() if grp.is_main else None):
        return entry, False
    if mode != "auto":
        return None, False
    _lock_entry(entry, grp)
    drew = False
    try:
        if not broadcast(entry.complete() if grp.is_main else None):
            n, batch = int(entry.setting["num_samples"]), int(entry.setting["batch_size"])
            shards = ShardStore(entry.folder, {**entry.setting, "method": "none"}, n, batch)
            shards.check()
            resumed = _open_store(shards, grp)
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


def _open_store(store: ShardStore, grp: Group) -> int:
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


def _merge_and_record(plan: RunPlan, store: ShardStore, denoiser: CFGDenoiser, grp: Group, busy: str | None,
                      sweep: str | None, session: Session, resumed: int,
                      peak_gb: float | None) -> tuple[SampleSet, RunRecord, Path, Path]:
    """Rank 0: merge the shards into samples.npz, grid and schedules, and fill the row's setting,
    accounting and timing columns (quality metrics come later)."""
    cfg, method = plan.cfg, plan.method
    samples = SampleSet.from_batches(store.load_all())
    npz_path = plan.out_dir / "samples.npz"
    atomic_savez(npz_path, arr_0=samples.images, arr_1=samples.labels)  # ADM layout: images, labels
    grid_path = save_grid(samples.images, plan.out_dir / "grid.png", n=int(cfg.eval.grid_size))
    schedules = [{"batch": b.start // plan.batch_size, "first_index": b.start, "full_steps": b.stats.full_indices}
                 for b in samples.batches]  # forward-order indices of the full steps
    atomic_write_text(plan.out_dir / "schedules.json", json.dumps(schedules) + "\n")

    weights = batch_sizes(plan.num_samples, plan.batch_size)

    def mean(values: list[float]) -> float:
        return float(np.average(values, weights=weights))

    d = plan.dit
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
    record = RunRecord(
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
        peak_memory_gb=peak_gb, processes=grp.world_size,
        extractor=get_extractor(plan.extractor).name if plan.score else None,
        cpu_threads=torch.get_num_threads() if plan.device.type == "cpu" else None,
        fused=None if method.name == "none" else bool(method.fused and method.can_fuse()),
        torch_version=torch.__version__, output_dir=str(plan.out_dir), notes="; ".join(notes) or None,
    )
    return samples, record, npz_path, grid_path


def score(record: RunRecord, samples: SampleSet, plan: RunPlan, pair: FullComputeEntry | None = None,
          notes: list[str] | None = None, publish: FullComputeEntry | None = None) -> RunRecord:
    """Quality metrics against the reference, and paired metrics against full compute: the run
    itself for method=none, else the full-compute set of the run's setting from the store
    (``pair``; its statistics are cached there per extractor). ``publish``: the store entry this
    full-compute run just published, which keeps the statistics computed here."""
    spec = get_extractor(plan.extractor)
    extract = spec.build(plan.paths, str(plan.device))
    feats = extract(samples.images)
    check_features(feats, spec.name, "the samples")
    ref = resolve_reference(str(plan.cfg.eval.reference), spec, extract, plan.paths)
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
    eid = extractor_id(spec, plan.paths)
    if publish is not None:  # the set's statistics are this run's: the same file, linked
        link_or_copy(plan.out_dir / "stats.npz", publish.stats_path(eid))

    pair_images = pair_stats = None
    if record.method == "none":
        pair_images, pair_stats = samples.images, own  # full compute is its own pair
    elif pair is not None:
        pair_images, pair_labels = pair.load()
        if not np.array_equal(pair_labels, samples.labels):
            raise RunError(f"the full-compute set {pair.samples} has other class labels than this run's samples "
                           f"although both claim setting {pair.id}; delete {pair.folder} and run again")
        pair_stats = pair.load_stats(eid)
        if pair_stats is None:
            pair_feats = extract(pair_images)
            check_features(pair_feats, spec.name, f"the full-compute set {pair.samples}")
            pair_stats = stats_of(pair_feats)
            save_stats(pair.stats_path(eid), pair_feats, spec.name, pair_stats)
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


def device_name(device: torch.device) -> str:
    """The device as the row names it: the GPU's name, or the CPU's architecture (its thread count
    is the row's cpu_threads: it changes the speed, not the samples)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.machine()})"
