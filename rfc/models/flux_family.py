"""FLUX.1 as a model family: a text-to-image transformer conditioned on prompts (sample i drawn
for prompt i), its guidance distilled into the model's input (no classifier-free guidance), its
16-channel VAE, double-stream blocks with two sites (joint attention, MLPs) and single-stream
blocks with one (``total``), each priced at its own cost."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig
from torch import nn

from rfc.models.family import PromptFamily, register_family
from rfc.models.flops import CostModel, flux_cost
from rfc.models.flux import (
    FluxConfig,
    FluxModel,
    encode_prompts,
    load_flux_vae,
    load_transformer,
    random_flux_vae,
    random_prompt_table,
    random_transformer,
)
from rfc.models.hub import flux_weights_missing
from rfc.utils.errors import ConfigError, MissingAssetError
from rfc.utils.validate import as_bool, as_float, as_int


def flux_arch(m: DictConfig) -> FluxConfig:
    """FluxConfig from configs/model/flux-*.yaml, every size checked."""
    image_size = as_int(m.image_size, "model.image_size", 16)
    if image_size % 16:
        raise ConfigError(
            f"model.image_size {image_size} is not a multiple of 16 (the VAE's 8x downsampling, then 2x2 packing)"
        )
    config = FluxConfig(
        image_size=image_size,
        hidden_size=as_int(m.hidden_size, "model.hidden_size", 1),
        num_heads=as_int(m.num_heads, "model.num_heads", 1),
        depth_double=as_int(m.depth_double, "model.depth_double", 0),
        depth_single=as_int(m.depth_single, "model.depth_single", 0),
        text_tokens=as_int(m.text_tokens, "model.text_tokens", 1),
        text_dim=as_int(m.text_dim, "model.text_dim", 1),
        pooled_dim=as_int(m.pooled_dim, "model.pooled_dim", 1),
        guidance_embeds=as_bool(m.guidance_embeds, "model.guidance_embeds"),
    )
    if config.depth_double < 1:
        raise ConfigError(
            "model.depth_double must be >= 1: RFC's schedule and TeaCache read block 0's input, which is "
            "a double-stream block's"
        )
    if config.hidden_size % config.num_heads:
        raise ConfigError(
            f"model.hidden_size {config.hidden_size} is not divisible by model.num_heads {config.num_heads}"
        )
    if sum(int(a) for a in m.axes_dims_rope) != config.hidden_size // config.num_heads:
        raise ConfigError(
            f"model.axes_dims_rope {list(m.axes_dims_rope)} must sum to the head size "
            f"{config.hidden_size // config.num_heads}"
        )
    if config.guidance_embeds:
        as_float(m.guidance, "model.guidance", 0.0)
    return config


@register_family
class FluxFamily(PromptFamily):
    """configs/model/flux-*.yaml (``family: flux``)."""

    name: ClassVar[str] = "flux"
    tiny: ClassVar[str] = "flux-tiny"
    model_class: ClassVar[type[nn.Module]] = FluxModel
    row_kind: ClassVar[str] = "t2i"

    def arch(self, m: DictConfig) -> FluxConfig:
        return flux_arch(m)

    def check(self, cfg: DictConfig, arch: FluxConfig, paths: Mapping[str, Any], score: bool) -> None:
        """The weights are the Hugging Face cache's (never downloaded here): an incomplete folder
        is named before anything is loaded."""
        m = cfg.model
        if m.pretrained:
            missing = flux_weights_missing(str(m.repo))
            if missing is not None:
                raise MissingAssetError(f"missing {m.name} weights: {missing}")

    def random_note(self, m: DictConfig) -> str:
        return "random FLUX weights, VAE and prompt embeddings (timing is real, images are not)"

    def setting(self, cfg: DictConfig, arch: FluxConfig, paths: Mapping[str, Any]) -> dict[str, object]:
        """The weights are the Hugging Face snapshot (repo@commit) or the random init of the
        architecture; cfg_scale records the distilled guidance (the model's input), guided_channels
        is empty; the prompt set is its own key."""
        m = cfg.model
        weights = self.weights_id(m, {**dataclasses.asdict(arch), "axes_dims_rope": list(m.axes_dims_rope)})
        return dict(
            model=str(m.name),
            arch=str(m.arch),
            image_size=int(m.image_size),
            vae=f"{m.repo}/vae" if m.vae_pretrained else "flux-vae (random)",
            cfg_scale=float(m.guidance) if arch.guidance_embeds else None,
            guided_channels=None,
            checkpoint=weights,
            prompts=self.prompts(cfg).id,
        )

    def build(self, cfg: DictConfig, arch: FluxConfig, device: torch.device, prompts: list[str] | None) -> FluxModel:
        """The transformer (the Hugging Face snapshot, or random weights seeded by the run's seed)
        and the prompt table of the run's prompts (FLUX.1's text encoders, or per-prompt random
        embeddings). Under precision=bf16 the snapshot loads in bfloat16 directly."""
        m = cfg.model
        texts = list(prompts or [])
        dtype = self.load_dtype(cfg)
        if m.pretrained:
            transformer = load_transformer(str(m.repo), dtype)
            table = encode_prompts(str(m.repo), texts, arch.text_tokens, device, dtype)
        else:
            transformer = random_transformer(arch, list(m.axes_dims_rope), int(cfg.seed))
            table = random_prompt_table(texts, arch.text_tokens, arch.text_dim, arch.pooled_dim)
        return FluxModel(transformer, table, arch, float(m.guidance) if arch.guidance_embeds else None).to(device)

    def build_vae(self, cfg: DictConfig, paths: Mapping[str, Any], device: torch.device) -> nn.Module:
        m = cfg.model
        return (load_flux_vae(str(m.repo)) if m.vae_pretrained else random_flux_vae(int(cfg.seed))).to(device)

    def latent_shape(self, arch: FluxConfig) -> tuple[int, ...]:
        return (arch.in_channels, arch.input_size, arch.input_size)

    def sites(self, arch: FluxConfig) -> tuple[str, ...]:
        return ("attn", "mlp") * arch.depth_double + ("total",) * arch.depth_single

    def cost(self, arch: FluxConfig) -> CostModel:
        return flux_cost(
            arch.image_tokens, arch.text_tokens, arch.hidden_size, arch.num_heads, arch.depth_double, arch.depth_single
        )
