"""One run: build model, method and sampler from the config, generate a sample set with paired
randomness, score it, and record one row.

Every check that can fail (missing checkpoint, VAE, classifier, bad sizes) runs before the
first sample is drawn, so a mistake costs seconds, not a sampling job.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm

from eval.extractors import get_extractor
from eval.fid import feature_statistics, frechet_distance
from eval.loggers import append_csv
from rfc.cache import CacheMethod, MethodStats
from rfc.images import save_grid, to_uint8_nhwc
from rfc.models.dit import DiT, DiTConfig, dit_config
from rfc.models.load import build_dit, require_file
from rfc.models.vae import LATENT_DOWNSAMPLE, check_vae_folder, decode, load_vae, random_vae, vae_folder
from rfc.record import RunRecord, git_sha
from rfc.samplers.sampling import CFGDenoiser, Sampler
from rfc.seeding import SampleStreams

REPO_ROOT = Path(__file__).resolve().parents[1]
VAE_CHOICES = ("ema", "mse", "none")


# --------------------------------------------------------------------------------------------
# Config -> objects
# --------------------------------------------------------------------------------------------


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
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
    dit = model_config(m)
    if int(m.guided_channels) < 1 or int(m.guided_channels) > dit.in_channels:
        raise ValueError(f"model.guided_channels must be in 1..{dit.in_channels}, got {m.guided_channels}")
    if float(cfg.cfg_scale) > 1.0 and dit.class_dropout_prob <= 0:
        raise ValueError("guidance needs a null class: model.class_dropout_prob must be > 0 when cfg_scale > 1")
    device = resolve_device(str(cfg.device))
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
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return RunPlan(cfg, device, dit, int(ev.num_samples), int(ev.batch_size), score, extractor, out, method,
                   sampler, paths)


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
    stats: list[MethodStats]  # per batch: the method's accounting (per sample)
    latencies: list[float]  # per batch: seconds in the sampling loop (VAE excluded)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def generate(model: DiT, sampler: Sampler, denoiser: CFGDenoiser, method: CacheMethod, *, seed: int,
             indices: range, batch_size: int, device: torch.device, vae: torch.nn.Module | None = None,
             progress: bool = True) -> SampleSet:
    """Sample ``indices`` in batches; sample i's label and noise come from stream (seed, i)."""
    cfg = model.config
    shape = (cfg.in_channels, cfg.input_size, cfg.input_size)
    images, labels, stats, latencies = [], [], [], []
    bar = tqdm(total=len(indices), unit="img", desc="sampling", disable=not progress)
    for start in range(0, len(indices), batch_size):
        batch = indices[start : start + batch_size]
        streams = SampleStreams(seed, batch, device)
        y = streams.labels(cfg.num_classes)
        x = streams.randn(shape)
        method.reset()
        _sync(device)
        t0 = time.perf_counter()
        x = sampler.sample(denoiser, x, y, noise=streams.noise_source(shape), listener=method)
        _sync(device)
        latencies.append(time.perf_counter() - t0)
        stats.append(method.stats())
        if vae is not None:
            x = decode(vae, x)
        images.append(to_uint8_nhwc(x))
        labels.append(y.cpu().numpy())
        bar.update(len(batch))
    bar.close()
    return SampleSet(np.concatenate(images), np.concatenate(labels).astype(np.int64), stats, latencies)


# --------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------


def _timed_median(latencies: list[float]) -> tuple[float, float]:
    """Median and spread of the batch latencies, the first batch excluded as warm-up when
    there are several (it pays one-time allocation and kernel-selection costs)."""
    timed = latencies[1:] if len(latencies) > 1 else latencies
    return statistics.median(timed), max(timed) - min(timed)


def run(cfg: DictConfig, out_dir: str | Path, progress: bool = True) -> RunRecord:
    """Execute one configured run and append its row to ``paths.runs_csv``."""
    plan = plan_run(cfg, out_dir)
    m, device = cfg.model, plan.device
    torch.set_grad_enabled(False)

    model = build_dit(plan.dit, m.checkpoint if m.pretrained else None, init=m.init, seed=int(cfg.seed)).to(device)
    vae = None
    if m.vae != "none":
        vae = load_vae(vae_folder(plan.paths["assets"], m.vae)) if m.vae_pretrained else random_vae(int(cfg.seed))
        vae = vae.to(device)
    method, sampler = plan.method, plan.sampler
    denoiser = CFGDenoiser(model, float(cfg.cfg_scale), null_class=plan.dit.num_classes,
                           guided_channels=int(m.guided_channels))

    method.attach(model)
    try:
        samples = generate(model, sampler, denoiser, method, seed=int(cfg.seed), indices=range(plan.num_samples),
                           batch_size=plan.batch_size, device=device, vae=vae, progress=progress)
    finally:
        method.detach()

    npz_path = plan.out_dir / "samples.npz"
    np.savez(npz_path, arr_0=samples.images, arr_1=samples.labels)  # ADM layout: images, labels
    grid_path = save_grid(samples.images, plan.out_dir / "grid.png", n=int(cfg.eval.grid_size))
    schedules = [{"batch": b, "first_index": b * plan.batch_size, "full_steps": s.full_indices}
                 for b, s in enumerate(samples.stats)]  # forward-order indices of the full steps
    (plan.out_dir / "schedules.json").write_text(json.dumps(schedules) + "\n")

    weights = _batch_sizes(plan.num_samples, plan.batch_size)

    def mean(values: list[float]) -> float:
        return float(np.average(values, weights=weights))

    d = plan.dit
    flops = [s.flops(denoiser.batch_multiplier, d.num_tokens, d.hidden_size, d.num_heads) for s in samples.stats]
    latency, spread = _timed_median(samples.latencies)
    record = RunRecord(
        git_sha=git_sha(REPO_ROOT), model=str(m.name), arch=str(m.get("arch") or "custom"),
        image_size=int(m.image_size), method=method.name, method_params=json.dumps(method.params(), sort_keys=True),
        sampler=sampler.name, respacing=sampler.respacing, num_steps=sampler.num_steps,
        cfg_scale=float(cfg.cfg_scale), guided_channels=int(m.guided_channels), seed=int(cfg.seed),
        num_samples=plan.num_samples, batch_size=plan.batch_size,
        nfc=mean([s.full_steps for s in samples.stats]), tflops=mean(flops) / 1e12,
        full_sites=mean([s.full_sites for s in samples.stats]),
        cached_sites=mean([s.cached_sites for s in samples.stats]),
        partial_sites=mean([s.partial_sites for s in samples.stats]),
        cache_bytes=max(s.cache_bytes_peak for s in samples.stats),
        latency_s=latency, latency_spread_s=spread, images_per_s=plan.num_samples / sum(samples.latencies),
        vae=None if m.vae == "none" else f"sd-vae-ft-{m.vae}" + ("" if m.vae_pretrained else " (random)"),
        device=_device_name(device), dtype="fp32", torch_version=torch.__version__, output_dir=str(plan.out_dir),
    )
    if plan.score:
        record = score(record, samples, plan)

    (plan.out_dir / "record.json").write_text(json.dumps(record.as_dict(), indent=2) + "\n")
    csv_path = append_csv(plan.paths["runs_csv"], record)
    print(f"samples: {npz_path}\ngrid:    {grid_path}\nrow:     {csv_path} (run_id {record.run_id})")
    return record


def score(record: RunRecord, samples: SampleSet, plan: RunPlan) -> RunRecord:
    """Quality metrics in the extractor's feature space against its reference set."""
    spec = get_extractor(plan.extractor)
    extract = spec.build(plan.paths, str(plan.device))
    out = extract(samples.images)
    record.extractor, record.reference = spec.name, spec.reference
    if spec.reference_images is not None:
        ref = extract(spec.reference_images())
        record.fid = frechet_distance(*feature_statistics(out["features"]), *feature_statistics(ref["features"]))
    if "predictions" in out:
        record.class_acc = float((out["predictions"] == samples.labels).mean())
    return record


def _batch_sizes(n: int, batch_size: int) -> list[int]:
    return [min(batch_size, n - s) for s in range(0, n, batch_size)]


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.machine()}, {torch.get_num_threads()} threads)"
