"""Build: a run's config -> the objects it runs with (device, DiT config, method, sampler,
precision, model). Every check that can fail (missing checkpoint, VAE, classifier, bad sizes,
unwritable outputs) runs in plan_run, before the model is built or the first sample is drawn,
so a mistake costs seconds, not a sampling job.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from eval.extractors import check_reference, get_extractor
from rfc.cache import CacheMethod, NoCache
from rfc.cache.base import block_branches
from rfc.models.dit import DiT, DiTConfig, dit_config
from rfc.models.flux import FluxConfig
from rfc.models.load import MissingAssetError, build_dit, require_file
from rfc.models.prompts import PromptSet, load_prompts
from rfc.models.vae import LATENT_DOWNSAMPLE, check_vae_folder, load_vae, random_vae, vae_folder
from rfc.samplers.sampling import CFGDenoiser, Sampler
from rfc.utils.distributed import group
from rfc.utils.errors import ConfigError
from rfc.utils.files import check_writable_file, digest_memo, memo_digest
from rfc.utils.validate import as_bool, as_float, as_int, check_arguments

LOG = logging.getLogger("rfc")
VAE_CHOICES = ("ema", "mse", "none")
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


def is_flux(m: DictConfig) -> bool:
    """A FLUX.1 text-to-image model (configs/model/flux-*.yaml), else a class-conditional DiT."""
    return str(m.get("family", "dit")) == "flux"


def flux_config(m: DictConfig) -> FluxConfig:
    """FluxConfig from configs/model/flux-*.yaml, every size checked."""
    image_size = as_int(m.image_size, "model.image_size", 16)
    if image_size % 16:
        raise ConfigError(f"model.image_size {image_size} is not a multiple of 16 (the VAE's 8x downsampling, then "
                          "2x2 packing)")
    config = FluxConfig(image_size=image_size, hidden_size=as_int(m.hidden_size, "model.hidden_size", 1),
                        num_heads=as_int(m.num_heads, "model.num_heads", 1),
                        depth_double=as_int(m.depth_double, "model.depth_double", 0),
                        depth_single=as_int(m.depth_single, "model.depth_single", 0),
                        text_tokens=as_int(m.text_tokens, "model.text_tokens", 1),
                        text_dim=as_int(m.text_dim, "model.text_dim", 1),
                        pooled_dim=as_int(m.pooled_dim, "model.pooled_dim", 1),
                        guidance_embeds=as_bool(m.guidance_embeds, "model.guidance_embeds"))
    if config.depth_double < 1:
        raise ConfigError("model.depth_double must be >= 1: RFC's schedule and TeaCache read block 0's input, which is "
                          "a double-stream block's")
    if config.hidden_size % config.num_heads:
        raise ConfigError(f"model.hidden_size {config.hidden_size} is not divisible by model.num_heads "
                          f"{config.num_heads}")
    if sum(int(a) for a in m.axes_dims_rope) != config.hidden_size // config.num_heads:
        raise ConfigError(f"model.axes_dims_rope {list(m.axes_dims_rope)} must sum to the head size "
                          f"{config.hidden_size // config.num_heads}")
    if config.guidance_embeds:
        as_float(m.guidance, "model.guidance", 0.0)
    return config


def model_config(m: DictConfig) -> DiTConfig | FluxConfig:
    """DiTConfig from configs/model/*.yaml: a named arch ("DiT-XL/2") or explicit sizes; a FLUX
    model's FluxConfig."""
    if is_flux(m):
        return flux_config(m)
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
        for branch in block_branches(block):
            getattr(block, branch).compile(dynamic=False)


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
    setting: dict = field(default_factory=dict)  # rfc.run.setting.SAMPLE_KEYS -> value: what fixes the samples
    prompts: PromptSet | None = None  # text-to-image models: sample i's prompt is prompts.for_samples(n)[i]
    skipped_metrics: dict = field(default_factory=dict)  # text-to-image metric -> why it is not computed

    @property
    def text_to_image(self) -> bool:
        return self.prompts is not None


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
    if is_flux(m):
        return plan_flux_run(cfg, out_dir, dit, num_samples, batch_size, score)
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
    out = prepare_outputs(cfg, out_dir, paths)
    if not m.pretrained:
        vae_note = "" if m.vae == "none" else (" and a random VAE" if not m.vae_pretrained else "")
        _note(f"model.pretrained=false: random DiT weights{vae_note} (timing is real, images are not)"
              + ("" if score else "; quality metrics skipped (eval.score=false)"))
    plan = RunPlan(cfg, device, dit, num_samples, batch_size, score, extractor, out, method, sampler, paths)
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


def plan_flux_run(cfg: DictConfig, out_dir: str | Path, flux: FluxConfig, num_samples: int, batch_size: int,
                  score: bool) -> RunPlan:
    """plan_run for a FLUX model: its prompts, weights (the Hugging Face cache; never downloaded
    here) and metric weights are checked before anything is built."""
    m = cfg.model
    prompts = load_prompts(str(cfg.get("prompts") or "drawbench"))
    device = resolve_device(str(cfg.device), group().local_rank)
    check_arguments(cfg.method, "method")
    check_arguments(cfg.sampler, "sampler")
    if m.pretrained:
        from eval.t2i import flux_weights_missing

        missing = flux_weights_missing(str(m.repo))
        if missing is not None:
            raise MissingAssetError(f"missing {m.name} weights: {missing}")
    method = build(cfg.method, "method")
    try:
        method.check_model_family("flux")
    except ValueError as err:
        raise ConfigError(str(err)) from err
    sampler = build(cfg.sampler, "sampler")
    paths = OmegaConf.to_container(cfg.paths, resolve=True)
    skipped = {}
    if score:
        from eval.t2i import T2I_METRICS, check_metrics

        names = list(cfg.eval.get("t2i_metrics") or T2I_METRICS)
        skipped = check_metrics(names, str(cfg.eval.missing_metrics), Path(paths["assets"]))
    out = prepare_outputs(cfg, out_dir, paths)
    if not m.pretrained:
        _note("model.pretrained=false: random FLUX weights, VAE and prompt embeddings (timing is real, images "
              "are not)" + ("" if score else "; quality metrics skipped (eval.score=false)"))
    plan = RunPlan(cfg, device, flux, num_samples, batch_size, score, None, out, method, sampler, paths,
                   prompts=prompts, skipped_metrics=skipped)
    plan.setting = sample_setting(plan)
    return plan


def vae_name(m: DictConfig) -> str | None:
    return None if m.vae == "none" else f"sd-vae-ft-{m.vae}" + ("" if m.vae_pretrained else " (random)")


def sample_setting(plan: RunPlan) -> dict[str, object]:
    """The run's values of rfc.run.setting.SAMPLE_KEYS: what every sample's numbers depend on. The row
    records them column by column, the shard manifest refuses a resume that changes one, and the
    full-compute store files this setting's set under their id. Weights are named by content (the
    checkpoint's sha256, memoized in the store), random weights by their init and architecture
    (the seed is its own key)."""
    cfg, m = plan.cfg, plan.cfg.model
    if plan.text_to_image:
        return flux_setting(plan)
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


def flux_setting(plan: RunPlan) -> dict[str, object]:
    """sample_setting of a FLUX run: the weights are the Hugging Face snapshot (repo@commit) or
    the random init of the architecture; cfg_scale records the distilled guidance (the model's
    input), guided_channels is empty; the prompt set is its own key."""
    from rfc.models.flux import hf_snapshot

    cfg, m, sampler = plan.cfg, plan.cfg.model, plan.sampler
    if m.pretrained:
        weights = f"hf:{m.repo}@{Path(hf_snapshot(str(m.repo))).name[:12]}"
    else:
        arch = json.dumps({**dataclasses.asdict(plan.dit), "axes_dims_rope": list(m.axes_dims_rope)}, sort_keys=True)
        weights = f"random:{m.init}:{hashlib.sha256(arch.encode()).hexdigest()[:8]}"
    guidance = float(m.guidance) if plan.dit.guidance_embeds else None
    return dict(model=str(m.name), arch=str(m.arch), image_size=int(m.image_size),
                vae=f"{m.repo}/vae" if m.vae_pretrained else "flux-vae (random)", sampler=sampler.name,
                sampler_params=json.dumps(sampler.params(), sort_keys=True), respacing=None,
                num_steps=sampler.num_steps, cfg_scale=guidance, guided_channels=None, checkpoint=weights,
                seed=int(cfg.seed), num_samples=plan.num_samples, batch_size=plan.batch_size,
                device=device_name(plan.device), precision_mode=str(cfg.precision),
                compile=as_bool(cfg.compile, "compile"), prompts=plan.prompts.id)


def build_flux(plan: RunPlan) -> tuple[torch.nn.Module, CFGDenoiser]:
    """The planned FLUX model on its device: the transformer (the Hugging Face snapshot, or random
    weights seeded by the run's seed), the prompt table of the run's prompts (FLUX.1's text
    encoders, or per-prompt random embeddings), and a guidance wrapper without CFG (FLUX.1-dev's
    guidance is distilled into the model's input)."""
    from rfc.models.flux import FluxModel, encode_prompts, load_transformer, random_prompt_table, random_transformer

    m, flux = plan.cfg.model, plan.dit
    texts = plan.prompts.prompts[:plan.num_samples]
    dtype = torch.bfloat16 if str(plan.cfg.precision) == "bf16" else torch.float32
    if m.pretrained:
        transformer = load_transformer(str(m.repo), dtype)
        table = encode_prompts(str(m.repo), texts, flux.text_tokens, plan.device, dtype)
    else:
        transformer = random_transformer(flux, list(m.axes_dims_rope), int(plan.cfg.seed))
        table = random_prompt_table(texts, flux.text_tokens, flux.text_dim, flux.pooled_dim)
    model = FluxModel(transformer, table, flux, float(m.guidance) if flux.guidance_embeds else None)
    model = apply_precision(model.to(plan.device), str(plan.cfg.precision))
    return model, CFGDenoiser(model, 1.0, null_class=0, guided_channels=flux.in_channels)


def build_model(plan: RunPlan) -> tuple[DiT, CFGDenoiser]:
    """The planned DiT on its device (checkpoint or random init, loaded and checked in fp32, then
    converted by apply_precision for the run's precision) and its guidance wrapper."""
    m = plan.cfg.model
    if plan.text_to_image:
        return build_flux(plan)
    model = build_dit(plan.dit, m.checkpoint if m.pretrained else None, init=m.init, seed=int(plan.cfg.seed))
    model = apply_precision(model.to(plan.device), str(plan.cfg.precision))
    denoiser = CFGDenoiser(model, float(plan.cfg.cfg_scale), null_class=plan.dit.num_classes,
                           guided_channels=int(m.guided_channels))
    return model, denoiser


def build_vae(plan: RunPlan) -> torch.nn.Module | None:
    """The planned VAE on the run's device (fetched weights, or random ones seeded by the run's
    seed), or None for a pixel-space model."""
    cfg, m = plan.cfg, plan.cfg.model
    if plan.text_to_image:
        from rfc.models.flux import load_flux_vae, random_flux_vae

        return (load_flux_vae(str(m.repo)) if m.vae_pretrained else random_flux_vae(int(cfg.seed))).to(plan.device)
    vae = None
    if m.vae != "none":
        vae = load_vae(vae_folder(plan.paths["assets"], m.vae)) if m.vae_pretrained else random_vae(int(cfg.seed))
        vae = vae.to(plan.device)
    return vae


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
