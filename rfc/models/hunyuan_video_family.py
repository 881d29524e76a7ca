"""HunyuanVideo as a model family: a text-to-video transformer conditioned on prompts (sample i drawn
for prompt i), its guidance distilled into the model's input, its causal 3-D VAE (a sample is a video,
(C, F, H, W) in latent space and (F, H, W, 3) once decoded), and FLUX.1's block structure:
double-stream blocks with two sites (joint attention, MLPs) and single-stream blocks with one
(``total``), each priced as FLUX's (the token refiner, like FLUX's embedders, is not counted)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import torch
from omegaconf import DictConfig
from torch import nn

from rfc.models.family import PromptFamily, register_family
from rfc.models.flops import CostModel, flux_cost
from rfc.models.hub import hunyuan_weights_missing
from rfc.models.hunyuan_video import (
    VAE_TEMPORAL,
    HunyuanVideoConfig,
    HunyuanVideoModel,
    encode_prompts,
    load_transformer,
    load_vae,
    random_prompt_table,
    random_transformer,
    random_vae,
)
from rfc.utils.errors import ConfigError, MissingAssetError
from rfc.utils.validate import as_bool, as_float, as_int


def hunyuan_arch(m: DictConfig) -> HunyuanVideoConfig:
    """HunyuanVideoConfig from configs/model/hunyuan-video*.yaml, every size checked."""
    sizes = {}
    for key in ("height", "width"):
        sizes[key] = as_int(m[key], f"model.{key}", 16)
        if sizes[key] % 16:
            raise ConfigError(f"model.{key} {sizes[key]} is not a multiple of 16 (the VAE's 8x downsampling, then "
                              f"2x2 patches)")
    frames = as_int(m.frames, "model.frames", 1)
    if (frames - 1) % VAE_TEMPORAL:
        latent = (frames - 1) // VAE_TEMPORAL + 1
        raise ConfigError(f"model.frames {frames} is not 4k + 1 (the VAE keeps the first frame and packs the others "
                          f"by {VAE_TEMPORAL}): HunyuanVideoPipeline would sample {latent} latent frames and decode "
                          f"{VAE_TEMPORAL * (latent - 1) + 1}; ask for that many")
    config = HunyuanVideoConfig(
        **sizes, frames=frames,
        hidden_size=as_int(m.hidden_size, "model.hidden_size", 1),
        num_heads=as_int(m.num_heads, "model.num_heads", 1),
        depth_double=as_int(m.depth_double, "model.depth_double", 1),
        depth_single=as_int(m.depth_single, "model.depth_single", 0),
        refiner_depth=as_int(m.refiner_depth, "model.refiner_depth", 1),
        text_tokens=as_int(m.text_tokens, "model.text_tokens", 1),
        text_dim=as_int(m.text_dim, "model.text_dim", 1),
        pooled_dim=as_int(m.pooled_dim, "model.pooled_dim", 1),
        guidance_embeds=as_bool(m.guidance_embeds, "model.guidance_embeds"),
        rope_axes=tuple(int(a) for a in m.rope_axes),
    )
    if config.hidden_size % config.num_heads:
        raise ConfigError(f"model.hidden_size {config.hidden_size} is not divisible by model.num_heads "
                          f"{config.num_heads}")
    if len(config.rope_axes) != 3 or sum(config.rope_axes) != config.hidden_size // config.num_heads:
        raise ConfigError(f"model.rope_axes {list(config.rope_axes)} must be 3 sizes (frames, height, width) summing "
                          f"to the head size {config.hidden_size // config.num_heads}")
    if config.guidance_embeds:
        as_float(m.guidance, "model.guidance", 0.0)
    return config


@register_family
class HunyuanVideoFamily(PromptFamily):
    """configs/model/hunyuan-video*.yaml (``family: hunyuan_video``)."""

    name: ClassVar[str] = "hunyuan_video"
    tiny: ClassVar[str] = "hunyuan-video-tiny"
    model_class: ClassVar[type[nn.Module]] = HunyuanVideoModel
    row_kind: ClassVar[str] = "t2v"

    def arch(self, m: DictConfig) -> HunyuanVideoConfig:
        return hunyuan_arch(m)

    def check(self, cfg: DictConfig, arch: HunyuanVideoConfig, paths: Mapping[str, Any], score: bool) -> None:
        """The weights are the Hugging Face cache's (never downloaded here): an incomplete folder
        is named, with the fetch command, before anything is loaded."""
        m = cfg.model
        if m.pretrained or m.vae_pretrained:
            missing = hunyuan_weights_missing(str(m.repo))
            if missing is not None:
                raise MissingAssetError(f"missing {m.name} weights: {missing}")

    def random_note(self, m: DictConfig) -> str:
        return "random HunyuanVideo weights, VAE and prompt embeddings (timing is real, videos are not)"

    def setting(self, cfg: DictConfig, arch: HunyuanVideoConfig, paths: Mapping[str, Any]) -> dict[str, object]:
        """As FLUX.1's, with the video's geometry in ``arch`` (frames x height x width: two runs of
        other lengths or sizes never share a setting), its height as ``image_size`` and its frame
        count as ``frames`` (what makes a row a video row)."""
        m = cfg.model
        weights = self.weights_id(m, dataclasses.asdict(arch))
        return dict(
            model=str(m.name),
            arch=f"{m.arch} {arch.frames}x{arch.height}x{arch.width}",
            image_size=arch.height,
            vae=f"{m.repo}/vae" if m.vae_pretrained else "hunyuan-video-vae (random)",
            cfg_scale=float(m.guidance) if arch.guidance_embeds else None,
            guided_channels=None,
            checkpoint=weights,
            prompts=self.prompts(cfg).id,
            frames=arch.frames,
        )

    def build(self, cfg: DictConfig, arch: HunyuanVideoConfig, device: torch.device,
              prompts: list[str] | None) -> HunyuanVideoModel:
        """The transformer (the Hugging Face snapshot, or random weights seeded by the run's seed)
        and the prompt table of the run's prompts (HunyuanVideo's LLaMA and CLIP encoders, or
        per-prompt random embeddings). Under precision=bf16 the snapshot loads in bfloat16 directly."""
        m = cfg.model
        texts = list(prompts or [])
        dtype = self.load_dtype(cfg)
        if m.pretrained:
            transformer = load_transformer(str(m.repo), dtype)
            table = encode_prompts(str(m.repo), texts, arch.text_tokens, device, dtype)
        else:
            transformer = random_transformer(arch, int(cfg.seed))
            table = random_prompt_table(texts, arch.text_tokens, arch.text_dim, arch.pooled_dim)
        guidance = float(m.guidance) if arch.guidance_embeds else None
        return HunyuanVideoModel(transformer, table, arch, guidance).to(device)

    def build_vae(self, cfg: DictConfig, paths: Mapping[str, Any], device: torch.device) -> nn.Module:
        m = cfg.model
        return (load_vae(str(m.repo)) if m.vae_pretrained else random_vae(int(cfg.seed))).to(device)

    def latent_shape(self, arch: HunyuanVideoConfig) -> tuple[int, ...]:
        return (arch.in_channels, arch.latent_frames, *arch.latent_size)

    def sites(self, arch: HunyuanVideoConfig) -> tuple[str, ...]:
        return ("attn", "mlp") * arch.depth_double + ("total",) * arch.depth_single

    def cost(self, arch: HunyuanVideoConfig) -> CostModel:
        return flux_cost(arch.image_tokens, arch.text_tokens, arch.hidden_size, arch.num_heads, arch.depth_double,
                         arch.depth_single)
