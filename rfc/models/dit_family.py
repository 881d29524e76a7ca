"""DiT as a model family: a class-conditional latent (or pixel-space) image transformer, guided by
classifier-free guidance on its first ``guided_channels`` channels, decoded by Stable Diffusion's
VAE (or not at all in pixel space), two sites per block (attention, MLP)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig
from torch import nn

from rfc.models.dit import DiT, DiTConfig, dit_config
from rfc.models.family import ModelFamily, random_weights_id, register_family
from rfc.models.flops import CostModel, dit_cost
from rfc.models.load import build_dit, checkpoint_keys, require_file, stated_resolution
from rfc.models.vae import LATENT_DOWNSAMPLE, check_vae_folder, load_vae, random_vae, vae_folder
from rfc.utils.errors import ConfigError
from rfc.utils.files import digest_memo, memo_digest
from rfc.utils.validate import as_bool, as_float, as_int

VAE_CHOICES = ("ema", "mse", "none")


def dit_arch(m: DictConfig) -> DiTConfig:
    """DiTConfig from configs/model/dit-*.yaml: a named arch ("DiT-XL/2") or explicit sizes."""
    if m.vae not in VAE_CHOICES:
        raise ConfigError(f"model.vae must be one of {VAE_CHOICES}, got {m.vae!r}")
    latent = m.vae != "none"
    image_size = as_int(m.image_size, "model.image_size", 1)
    if latent and image_size % LATENT_DOWNSAMPLE:
        raise ConfigError(
            f"model.image_size {image_size} is not a multiple of {LATENT_DOWNSAMPLE} (the VAE's downsampling)"
        )
    input_size = image_size // LATENT_DOWNSAMPLE if latent else image_size
    common = dict(
        input_size=input_size,
        in_channels=as_int(m.in_channels, "model.in_channels", 1),
        num_classes=as_int(m.num_classes, "model.num_classes", 1),
        learn_sigma=as_bool(m.learn_sigma, "model.learn_sigma"),
        class_dropout_prob=as_float(m.class_dropout_prob, "model.class_dropout_prob", 0.0, 1.0),
    )
    if m.get("arch"):
        config = dit_config(m.arch, **common)
    else:
        config = DiTConfig(
            patch_size=as_int(m.patch_size, "model.patch_size", 1),
            hidden_size=as_int(m.hidden_size, "model.hidden_size", 1),
            depth=as_int(m.depth, "model.depth", 1),
            num_heads=as_int(m.num_heads, "model.num_heads", 1),
            **common,
        )
    if config.input_size % config.patch_size:
        raise ConfigError(
            f"model.image_size {image_size} gives a {config.input_size}-pixel input, which patch size "
            f"{config.patch_size} does not divide"
        )
    if config.hidden_size % config.num_heads:
        raise ConfigError(
            f"model.hidden_size {config.hidden_size} is not divisible by model.num_heads {config.num_heads}"
        )
    return config


def vae_name(m: DictConfig) -> str | None:
    return None if m.vae == "none" else f"sd-vae-ft-{m.vae}" + ("" if m.vae_pretrained else " (random)")


@register_family
class DiTFamily(ModelFamily):
    """configs/model/dit-*.yaml (no ``family`` key, or ``family: dit``)."""

    name: ClassVar[str] = "dit"
    tiny: ClassVar[str] = "dit-tiny"
    model_class: ClassVar[type[nn.Module]] = DiT

    def arch(self, m: DictConfig) -> DiTConfig:
        return dit_arch(m)

    def check(self, cfg: DictConfig, arch: DiTConfig, paths: Mapping[str, Any], score: bool) -> None:
        m = cfg.model
        if as_int(m.guided_channels, "model.guided_channels") < 1 or int(m.guided_channels) > arch.in_channels:
            raise ConfigError(f"model.guided_channels must be in 1..{arch.in_channels}, got {m.guided_channels}")
        if as_float(cfg.cfg_scale, "cfg_scale") > 1.0 and arch.class_dropout_prob <= 0:
            raise ConfigError("guidance needs a null class: model.class_dropout_prob must be > 0 when cfg_scale > 1")
        if m.pretrained:
            require_file(m.checkpoint, f"{m.name} checkpoint (model.checkpoint)")
            stated = stated_resolution(m.checkpoint)
            if stated is not None and stated != int(m.image_size):
                raise ConfigError(f"model.checkpoint {m.checkpoint} is a {stated} px checkpoint (its name says so) "
                                  f"and model.image_size is {m.image_size}: set model.image_size={stated}, or use "
                                  f"a {m.image_size} px checkpoint")
        if m.vae != "none" and m.vae_pretrained:
            check_vae_folder(vae_folder(paths["assets"], m.vae))

    def notes(self, cfg: DictConfig, arch: DiTConfig) -> list[str]:
        """The native resolution of a checkpoint is its pos_embed's (a checkpoint of another
        resolution is then refused as a shape mismatch) or the NNNxNNN in its file name (refused
        in ``check``); when it has neither, the run goes on and every row says so."""
        m = cfg.model
        if not m.pretrained or stated_resolution(m.checkpoint) is not None:
            return []
        if "pos_embed" in checkpoint_keys(m.checkpoint):
            return []
        return [f"native resolution unknown: checkpoint {Path(str(m.checkpoint)).name} has no pos_embed and its name "
                f"states no resolution; sampled at {m.image_size} px"]

    def random_note(self, m: DictConfig) -> str:
        vae_note = "" if m.vae == "none" else (" and a random VAE" if not m.vae_pretrained else "")
        return f"random DiT weights{vae_note} (timing is real, images are not)"

    def setting(self, cfg: DictConfig, arch: DiTConfig, paths: Mapping[str, Any]) -> dict[str, object]:
        """Weights by the checkpoint's sha256 (memoized in the store), random ones by their init and
        architecture."""
        m = cfg.model
        if m.pretrained:
            weights = "sha256:" + memo_digest(m.checkpoint, digest_memo(paths))[:16]
        else:
            weights = random_weights_id(m.init, dataclasses.asdict(arch))
        return dict(
            model=str(m.name),
            arch=str(m.get("arch") or "custom"),
            image_size=int(m.image_size),
            vae=vae_name(m),
            cfg_scale=float(cfg.cfg_scale),
            guided_channels=int(m.guided_channels),
            checkpoint=weights,
        )

    def build(self, cfg: DictConfig, arch: DiTConfig, device: torch.device, prompts: list[str] | None) -> DiT:
        m = cfg.model
        return build_dit(arch, m.checkpoint if m.pretrained else None, init=m.init, seed=int(cfg.seed)).to(device)

    def build_vae(self, cfg: DictConfig, paths: Mapping[str, Any], device: torch.device) -> nn.Module | None:
        m = cfg.model
        if m.vae == "none":
            return None
        vae = load_vae(vae_folder(paths["assets"], m.vae)) if m.vae_pretrained else random_vae(int(cfg.seed))
        return vae.to(device)

    def sampler_args(self, arch: DiTConfig) -> dict[str, object]:
        return {"learn_sigma": arch.learn_sigma}

    def latent_shape(self, arch: DiTConfig) -> tuple[int, ...]:
        return (arch.in_channels, arch.input_size, arch.input_size)

    def sites(self, arch: DiTConfig) -> tuple[str, ...]:
        return ("attn", "mlp") * arch.depth

    def cost(self, arch: DiTConfig) -> CostModel:
        return dit_cost(arch.num_tokens, arch.hidden_size, arch.num_heads, arch.depth)
