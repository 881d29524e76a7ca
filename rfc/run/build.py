"""Build: a run's config -> the objects it runs with (device, the model's family and architecture,
method, sampler, precision, model). Every check that can fail (missing checkpoint, VAE, classifier, bad sizes,
unwritable outputs) runs in plan_run, before the model is built or the first sample is drawn,
so a mistake costs seconds, not a sampling job.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from torch import nn

from eval import registry
from eval.extractors import check_reference, get_extractor
from eval.t2i import check_metrics
from rfc.cache import CacheMethod
from rfc.cache.base import block_branches
from rfc.models.family import ModelFamily, family_of
from rfc.models.prompts import PromptSet
from rfc.samplers.sampling import CFGDenoiser, Sampler
from rfc.utils.distributed import group
from rfc.utils.errors import ConfigError
from rfc.utils.files import check_writable_file, digest_memo
from rfc.utils.invariance import batch_invariance
from rfc.utils.validate import as_bool, as_float, as_int, check_arguments

LOG = logging.getLogger("rfc")
MIN_SCORED_SAMPLES = 2  # a covariance needs two samples
MAX_SEED = 2**63 - 1  # torch generators take 64-bit seeds


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


def model_config(m: DictConfig) -> Any:
    """The architecture of a model config (its family's ``arch``), every size checked."""
    return family_of(m).arch(m)


PRECISIONS = ("fp32", "tf32", "bf16", "bf16-autocast")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ConfigError(f"precision must be one of {PRECISIONS}, got {precision!r}")


def apply_precision(model: torch.nn.Module, precision: str) -> torch.nn.Module:
    """The weights' side of a precision mode, applied once after loading, before any sampling.
    ``bf16``: every parameter and buffer converted to bfloat16 in place (the model casts its input
    latents to the weights' dtype and returns fp32, so the sampler, guidance and VAE stay fp32).
    fp32, tf32 and bf16-autocast keep the fp32 weights: the model is returned untouched."""
    check_precision(precision)
    if precision == "bf16":
        model.to(torch.bfloat16)
    return model


def batch_invariant_rows(cfg: DictConfig) -> int:
    """``batch_invariant``: 0 (off) or the rows per tile of rfc.utils.invariance.FixedShapes."""
    return as_int(cfg.get("batch_invariant", 0), "batch_invariant", 0)


@contextlib.contextmanager
def precision_mode(precision: str, device: torch.device, batch_invariant: int = 0) -> Iterator[None]:
    """Numerics of the sampling loop. fp32: exact fp32 matmuls. tf32 (default): fp32 storage with
    TF32 tensor-core matmuls and convolutions on GPUs that have them (on a CPU it equals fp32).
    bf16: the weights are stored in bfloat16 (apply_precision, once); no autocast here, TF32 flags
    as for tf32 (they only touch what stays fp32). bf16-autocast: fp32 weights, autocast of matmuls
    and attention to bfloat16 (every forward re-casts the weights); the residual stream, the
    sampler and the cache keep their own dtypes. ``batch_invariant`` > 0: linear layers, batched
    matmuls, attention, convolutions and group norms run on tiles of that many rows
    (rfc.utils.invariance), so a sample's numbers do not depend on its batch. The previous global
    settings are restored afterwards."""
    check_precision(precision)
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    tf32 = precision != "fp32"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    try:
        with batch_invariance(batch_invariant):
            if precision == "bf16-autocast":
                with torch.autocast(device.type, dtype=torch.bfloat16):
                    yield
            else:
                yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def compile_for(model: nn.Module, method: CacheMethod) -> None:
    """``compile=true``: torch.compile what runs (state_dict unchanged). Full compute compiles the
    whole forward. A method with step programs (FORA, TaylorSeer, RFC's fused configurations)
    compiles them: each full and each cached step is one graph, as fast as the plain compiled
    forward plus the method's own stores. The others (ToCa, RFC's per-site variants) route the
    blocks per site, so their attention and MLP modules are compiled instead."""
    if method.computes_everything:
        model.compile(dynamic=False)
        return
    method.compile = True
    if method.fused and method.can_fuse():
        return
    for block in model.blocks:
        for branch in block_branches(block):
            getattr(block, branch).compile(dynamic=False)


@dataclass
class RunPlan:
    """Validated settings of a run, derived from the config before any heavy work."""

    cfg: DictConfig
    device: torch.device
    arch: Any  # the model's architecture, from its family (rfc.models.family.ModelFamily.arch)
    num_samples: int
    batch_size: int
    score: bool
    extractor: str | None
    out_dir: Path
    method: CacheMethod
    sampler: Sampler
    paths: dict = field(default_factory=dict)
    setting: dict = field(default_factory=dict)  # rfc.run.setting.SAMPLE_KEYS -> value: what fixes the samples
    prompts: PromptSet | None = None  # text-to-image models: sample i's prompt is prompts.for_samples(n)[i]
    skipped_metrics: dict = field(default_factory=dict)  # text-to-image metric -> why it is not computed
    family: ModelFamily | None = None  # the model's family (from the model config when not given)
    notes: list[str] = field(default_factory=list)  # what the row's notes must say of the setting (the family's)

    def __post_init__(self) -> None:
        if self.family is None:
            self.family = family_of(self.cfg.model)

    @property
    def text_to_image(self) -> bool:
        return self.prompts is not None


def plan_run(cfg: DictConfig, out_dir: str | Path) -> RunPlan:
    """Validate the config and check every input and output file; raises before anything
    expensive, naming the key or file at fault. What depends on the model (its sizes, weights,
    decoder, conditioning) is its family's to check (rfc.models.family)."""
    ev, m = cfg.eval, cfg.model
    num_samples = as_int(ev.num_samples, "eval.num_samples", 1)
    batch_size = as_int(ev.batch_size, "eval.batch_size", 1)
    as_int(cfg.seed, "seed", 0, MAX_SEED)
    as_int(ev.warmup_batches, "eval.warmup_batches", 0)
    as_int(ev.grid_size, "eval.grid_size", 1)
    as_float(cfg.cfg_scale, "cfg_scale")
    as_bool(cfg.compile, "compile")
    score = as_bool(ev.score, "eval.score")
    if ev.paired is False:  # YAML reads a bare off as false
        ev.paired = "off"
    if str(ev.paired) not in ("auto", "find", "off"):
        raise ConfigError(f"eval.paired must be auto, find or off, got {ev.paired!r}")
    check_precision(str(cfg.get("precision", "tf32")))
    batch_invariant_rows(cfg)
    family = family_of(m)
    arch = family.arch(m)
    paths = OmegaConf.to_container(cfg.paths, resolve=True)
    prompts = family.prompts(cfg)
    text = prompts is not None
    if score and not text and num_samples < MIN_SCORED_SAMPLES:
        raise ConfigError(f"eval.num_samples={num_samples} is too few to score (FID needs a covariance of at least "
                          f"{MIN_SCORED_SAMPLES} samples): raise it or set eval.score=false")
    device = resolve_device(str(cfg.device), group().local_rank)
    check_arguments(cfg.method, "method")
    check_arguments(cfg.sampler, "sampler")
    family.check(cfg, arch, paths, score)
    method = build(cfg.method, "method")
    try:
        method.check_model_family(family.name, family.model_class)
    except ValueError as err:
        raise ConfigError(str(err)) from err
    sampler = build(cfg.sampler, "sampler", **family.sampler_args(arch))
    extractor, skipped = None, {}
    if score and text:
        names = list(cfg.eval.get("t2i_metrics") or registry.names(family.row_kind))
        skipped = check_metrics(names, str(cfg.eval.missing_metrics), Path(paths["assets"]), family.row_kind)
    elif score:
        extractor = str(ev.extractor)
        get_extractor(extractor).check(paths)
        check_reference(str(ev.reference), get_extractor(extractor))
    out = prepare_outputs(cfg, out_dir, paths)
    if not m.pretrained:
        _note(f"model.pretrained=false: {family.random_note(m)}"
              + ("" if score else "; quality metrics skipped (eval.score=false)"))
    notes = family.notes(cfg, arch)
    for line in notes:
        _note(line)
    plan = RunPlan(cfg, device, arch, num_samples, batch_size, score, extractor, out, method, sampler, paths,
                   prompts=prompts, skipped_metrics=skipped, family=family, notes=notes)
    plan.setting = sample_setting(plan)
    return plan


def _note(text: str) -> None:
    """A note for the person at the terminal (stdout), kept in run.log too."""
    print(f"note: {text}")
    LOG.info("note: %s", text)


def prepare_outputs(cfg: DictConfig, out_dir: str | Path, paths: dict) -> Path:
    """The run folder, created, and every file the run will write checked writable."""
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ConfigError(f"cannot create the run folder {out} ({err.strerror or err})") from err
    check_writable_file(out / "record.json", "the run folder's")
    if cfg.logger.get("csv"):
        check_writable_file(cfg.paths.runs_csv, "paths.runs_csv")
    check_writable_file(digest_memo(paths), "paths.store's")  # full-compute sets, statistics, digests
    return out


def sample_setting(plan: RunPlan) -> dict[str, object]:
    """The run's values of rfc.run.setting.SAMPLE_KEYS: what every sample's numbers depend on. The row
    records them column by column, the shard manifest refuses a resume that changes one, and the
    full-compute store files this setting's set under their id. The model's side (its name,
    weights by content or by their random init, decoder, guidance, prompts) is its family's."""
    cfg, sampler = plan.cfg, plan.sampler
    own = plan.family.setting(cfg, plan.arch, plan.paths)
    setting = dict(model=own.pop("model"), arch=own.pop("arch"), image_size=own.pop("image_size"),
                   vae=own.pop("vae"), sampler=sampler.name,
                   sampler_params=json.dumps(sampler.params(), sort_keys=True), respacing=sampler.respacing,
                   num_steps=sampler.num_steps, cfg_scale=own.pop("cfg_scale"),
                   guided_channels=own.pop("guided_channels"), checkpoint=own.pop("checkpoint"), seed=int(cfg.seed),
                   num_samples=plan.num_samples, batch_size=plan.batch_size, device=device_name(plan.device),
                   precision_mode=str(cfg.precision), compile=as_bool(cfg.compile, "compile"))
    rows = batch_invariant_rows(cfg)
    if rows:  # only when set, as the optional keys are: every earlier manifest, shard and id stays valid
        setting["batch_invariant"] = rows
    return {**setting, **own}


def build_model(plan: RunPlan) -> tuple[torch.nn.Module, CFGDenoiser]:
    """The planned model on its device (built and checked by its family in fp32, then converted
    by apply_precision for the run's precision) and its guidance wrapper."""
    texts = plan.prompts.prompts[:plan.num_samples] if plan.prompts is not None else None
    model = plan.family.build(plan.cfg, plan.arch, plan.device, texts)
    model = apply_precision(model, str(plan.cfg.precision))
    return model, CFGDenoiser(model, **plan.family.guidance(plan.cfg, plan.arch))


def build_vae(plan: RunPlan) -> torch.nn.Module | None:
    """The planned decoder on the run's device (fetched weights, or random ones seeded by the run's
    seed), or None for a pixel-space model."""
    return plan.family.build_vae(plan.cfg, plan.paths, plan.device)


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


def device_name(device: torch.device) -> str:
    """The device as the row names it: the GPU's name, or the CPU's architecture (its thread count
    is the row's cpu_threads: it changes the speed, not the samples)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.machine()})"
