"""HunyuanVideo as the harness sees it: diffusers' HunyuanVideoTransformer3DModel, unmodified, behind
the model side of the cache protocol (rfc.cache.base.MODEL_PROTOCOL), as FLUX.1 is (rfc/models/flux.py).

The transformer keeps its own weights, class and ``state_dict``; this file only says how one of its
forwards splits into embed / blocks / head:

- ``embed(x, t, y)``: video latents (B, 16, f, h, w) through the transformer's 3-D patch embedding
  (1 x 2 x 2 patches, frame-major token order); ``y`` holds each sample's prompt index, looked up in the
  encoded prompt table (the LLaMA token embeddings with their attention mask, and the pooled CLIP
  vector); ``t`` is the pipeline's timestep (0..1000, unscaled: HunyuanVideoPipeline hands the
  scheduler's value to the transformer as it is). The text tokens go through the token refiner
  (``context_embedder``, a small transformer over the text conditioned on the timestep) here, at every
  step, full or cached: the official TaylorSeer HunyuanVideo code caches only the double- and
  single-stream blocks too. The residual stream is image tokens then text tokens, (B, n_img + n_txt,
  C), the order HunyuanVideo's attention and its single-stream blocks use; ``c`` is the
  time + guidance + pooled-text embedding. The attention mask hides each prompt's padding tokens as
  keys, as the transformer's own forward builds it.
- ``blocks``: the double-stream blocks (20 in HunyuanVideo), then the single-stream blocks (40). A
  double-stream block has two sites, ``attn`` (the joint attention: ``to_out`` on the image tokens,
  ``to_add_out`` on the text tokens) and ``mlp`` (``ff`` on the image tokens, ``ff_context`` on the
  text tokens); a single-stream block has one, ``total`` (``proj_out`` of the attention and the MLP side
  by side), as on FLUX.1.
- ``head``: ``norm_out`` and ``proj_out`` on the image tokens, unpatchified to (B, 16, f, h, w), fp32.

The image and text tokens of a double-stream block are modulated by different adaLN vectors, so its
shift / scale / gate are per token (B, T, C). Every module is called on the same token spans as the
transformer's own forward calls it, so ``forward`` equals it bit for bit (tests/test_hunyuan_video.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from rfc.models import flux
from rfc.models.dit import BranchModulation
from rfc.models.flux import GroupedModulation
from rfc.models.hub import hf_snapshot
from rfc.utils.modulation import TokenSpans

LATENT_CHANNELS = 16  # HunyuanVideo's causal 3-D VAE: 16 channels, 8x spatial and 4x temporal downsampling
VAE_DOWNSAMPLE = 8
VAE_TEMPORAL = 4


@dataclass(frozen=True)
class HunyuanVideoConfig:
    """Everything that fixes a HunyuanVideo transformer's shapes and a run's token counts."""

    height: int = 544  # pixels
    width: int = 960
    frames: int = 61  # pixel frames: 4k + 1 (the VAE keeps the first frame and packs the rest by 4)
    hidden_size: int = 3072
    num_heads: int = 24
    depth_double: int = 20
    depth_single: int = 40
    refiner_depth: int = 2
    text_tokens: int = 256  # the pipeline's max_sequence_length for the LLaMA prompt
    text_dim: int = 4096
    pooled_dim: int = 768
    guidance_embeds: bool = True  # HunyuanVideo-T2V: distilled guidance is a model input
    rope_axes: tuple[int, int, int] = (16, 56, 56)  # frames, height, width: sums to the head size
    in_channels: int = LATENT_CHANNELS
    num_classes: int = 0  # no class labels: y is a prompt index

    @property
    def latent_frames(self) -> int:
        return (self.frames - 1) // VAE_TEMPORAL + 1

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.height // VAE_DOWNSAMPLE, self.width // VAE_DOWNSAMPLE

    @property
    def image_tokens(self) -> int:
        h, w = self.latent_size
        return self.latent_frames * (h // 2) * (w // 2)

    @property
    def num_tokens(self) -> int:
        """Tokens of the residual stream: image then text."""
        return self.image_tokens + self.text_tokens

    @property
    def depth(self) -> int:
        return self.depth_double + self.depth_single


class PromptTable(nn.Module):
    """Encoded prompts, one row per prompt index: LLaMA token embeddings (P, L, D) with their
    attention mask (P, L) (1 for a prompt's tokens, 0 for its padding) and pooled CLIP vectors
    (P, D_pool). A sample's ``y`` is its row. Buffers, not parameters: they are inputs."""

    def __init__(self, embeds: torch.Tensor, mask: torch.Tensor, pooled: torch.Tensor) -> None:
        super().__init__()
        if not embeds.shape[0] == mask.shape[0] == pooled.shape[0] or embeds.shape[:2] != mask.shape:
            raise ValueError(f"prompt table: embeddings {tuple(embeds.shape)}, mask {tuple(mask.shape)} and pooled "
                             f"{tuple(pooled.shape)} do not describe the same prompts")
        self.register_buffer("embeds", embeds, persistent=False)
        self.register_buffer("mask", mask, persistent=False)
        self.register_buffer("pooled", pooled, persistent=False)

    def __len__(self) -> int:
        return int(self.embeds.shape[0])


def random_prompt_table(prompts: Sequence[str], tokens: int, dim: int, pooled_dim: int) -> PromptTable:
    """The tiny model's stand-in for the text encoders: each prompt's embeddings drawn from a
    generator seeded by its text, and a mask covering one token per word plus the template's two
    (at most ``tokens``), so that padding is real: a prompt always gets the same conditioning."""
    embeds, masks, pooled = [], [], []
    for prompt in prompts:
        g = flux.prompt_generator(prompt)
        embeds.append(torch.randn(tokens, dim, generator=g))
        pooled.append(torch.randn(pooled_dim, generator=g))
        mask = torch.zeros(tokens)
        mask[: min(tokens, len(prompt.split()) + 2)] = 1
        masks.append(mask)
    return PromptTable(torch.stack(embeds), torch.stack(masks), torch.stack(pooled))


@dataclass
class StepContext:
    """What one forward's blocks share besides (x, c): the rotary embedding of the image positions,
    the number of image tokens and the attention mask over the stream (set by ``embed``)."""

    rope: tuple[torch.Tensor, torch.Tensor] | None = None
    n_img: int = 0
    mask: torch.Tensor | None = None  # (B, 1, 1, n_img + n_txt) bool: False for a prompt's padding

    @property
    def n_txt(self) -> int:
        """Text tokens of the stream (0 before the first ``embed``)."""
        return self.mask.shape[-1] - self.n_img if self.mask is not None else 0


class JointAttention(flux.JointAttention):
    """A double-stream block's attention as one branch of the concatenated stream: input
    (B, n_img + n_txt, C) modulated tokens, output the image part (``to_out``) and the text part
    (``to_add_out``) side by side (FLUX.1's, on an image-then-text stream with a padding mask)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = self.ctx.n_img
        img, txt = self.inner(hidden_states=x[:, :n], encoder_hidden_states=x[:, n:], attention_mask=self.ctx.mask,
                              image_rotary_emb=self.ctx.rope)
        return torch.cat([img, txt], dim=1)

    def with_received(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``self(x)`` with an explicit softmax, and the attention each token receives (B, T): what
        token-wise caching (ToCa) scores tokens by."""
        n = self.ctx.n_img
        out, received = attention_with_received(self.inner, x, n, self.ctx.mask, self.ctx.rope)
        img = self.inner.to_out[1](self.inner.to_out[0](out[:, :n].contiguous()))
        return torch.cat([img, self.inner.to_add_out(out[:, n:].contiguous())], dim=1), received


class StreamMlp(flux.StreamMlp):
    """A double-stream block's two MLPs as one branch: ``ff`` on the image tokens, then ``ff_context``
    on the text tokens (FLUX.1's, with the other stream order)."""

    def spans(self, tokens: int) -> tuple[tuple[int, int, nn.Module], ...]:
        """(first, end, MLP) of each token group of a ``tokens``-long stream, the image MLP first."""
        n = self.ctx.n_img
        return (0, n, self.ff_img), (n, tokens, self.ff_txt)


class SingleTotal(flux.SingleTotal):
    """A single-stream block's whole output before its gate: proj_out([attn(x), gelu(proj_mlp(x))]),
    the attention over image then text tokens (the rotary embedding on the image tokens only);
    FLUX.1's ``from_attention``."""

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, n = self.block, self.ctx.n_img
        img, txt = b.attn(hidden_states=x[:, :n], encoder_hidden_states=x[:, n:], attention_mask=self.ctx.mask,
                          image_rotary_emb=self.ctx.rope)
        return torch.cat([img, txt], dim=1)

    def with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``self(x)`` with its attention computed by an explicit softmax, the attention output
        before proj_out (B, T, C) and the attention each token receives (B, T): what ToCa keeps."""
        attn, received = attention_with_received(self.block.attn, x, self.ctx.n_img, self.ctx.mask, self.ctx.rope)
        return self.from_attention(x, attn), attn, received


def attention_with_received(attn: nn.Module, x: torch.Tensor, n_img: int, mask: torch.Tensor | None,
                            rope: tuple[torch.Tensor, torch.Tensor] | None) -> tuple[torch.Tensor, torch.Tensor]:
    """diffusers' HunyuanVideoAttnProcessor2_0 on the stream x = [image, text] (B, T, C) with the
    softmax written out: the attention output before any output projection (B, T, C), image then text
    tokens, and the attention each token receives (B, T). Everything but the softmax is the module's
    own: its projections (the text tokens through the ``add_*`` ones where the block has them), RMS
    norms on q and k, diffusers' ``apply_rotary_emb`` on the image tokens only, the padding mask on
    the keys. The map follows the official FLUX ToCa code (no HunyuanVideo ToCa exists): q k^T, times
    1/sqrt(D), softmax over keys; ``received`` is its mean over heads, then over queries. Equal to
    the fused module's output to rounding (tests: 1e-5)."""
    import math

    from diffusers.models.embeddings import apply_rotary_emb

    def heads(t: torch.Tensor) -> torch.Tensor:
        return t.unflatten(-1, (attn.heads, -1))

    img, txt = x[:, :n_img], x[:, n_img:]
    if attn.add_q_proj is None:  # a single-stream block: one set of projections for every token
        q, k, v = heads(attn.to_q(x)), heads(attn.to_k(x)), heads(attn.to_v(x))
        q, k = attn.norm_q(q), attn.norm_k(k)
    else:
        q, k, v = heads(attn.to_q(img)), heads(attn.to_k(img)), heads(attn.to_v(img))
        q, k = attn.norm_q(q), attn.norm_k(k)
        tq, tk, tv = heads(attn.add_q_proj(txt)), heads(attn.add_k_proj(txt)), heads(attn.add_v_proj(txt))
        tq, tk = attn.norm_added_q(tq), attn.norm_added_k(tk)
        q, k, v = torch.cat([q, tq], dim=1), torch.cat([k, tk], dim=1), torch.cat([v, tv], dim=1)
    if rope is not None:
        q = torch.cat([apply_rotary_emb(q[:, :n_img], rope, sequence_dim=1), q[:, n_img:]], dim=1)
        k = torch.cat([apply_rotary_emb(k[:, :n_img], rope, sequence_dim=1), k[:, n_img:]], dim=1)
    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, H, T, D)
    scores = torch.matmul(q, k.transpose(-2, -1)) * (1 / math.sqrt(q.shape[-1]))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = scores.softmax(dim=-1)
    out = torch.matmul(probs, v).transpose(1, 2).flatten(2, 3).to(q.dtype)
    return out, probs.mean(dim=1).mean(dim=1)


class DoubleStreamBlock(flux.DoubleStreamBlock):
    """diffusers' HunyuanVideoTransformerBlock over the concatenated stream, with two sites: FLUX.1's
    double-stream block (the same module names and arithmetic) on an image-then-text stream."""

    def __init__(self, block: nn.Module, ctx: StepContext) -> None:
        self.block, self.ctx = block, ctx
        self.attn = JointAttention(block.attn, ctx)
        self.mlp = StreamMlp(block.ff_context, block.ff, ctx)

    def modulation(self, c: torch.Tensor) -> tuple[BranchModulation, BranchModulation]:
        """Per-token shift, scale and gate of the attention and of the MLP site (TokenSpans: the image
        tokens' vectors, then the text tokens')."""
        b, n_img, n_txt = self.block, self.ctx.n_img, self.ctx.n_txt
        img = b.norm1.linear(b.norm1.silu(c)).chunk(6, dim=1)
        txt = b.norm1_context.linear(b.norm1_context.silu(c)).chunk(6, dim=1)
        vec = [TokenSpans((i, t), (n_img, n_txt)) for i, t in zip(img, txt, strict=True)]  # image tokens first
        return BranchModulation(*vec[:3]), BranchModulation(*vec[3:])


class SingleStreamBlock(flux.SingleStreamBlock):
    """diffusers' HunyuanVideoSingleTransformerBlock with one site (total): FLUX.1's single-stream
    block with HunyuanVideo's attention (rotary embedding on the image tokens, padding mask)."""

    def __init__(self, block: nn.Module, ctx: StepContext) -> None:
        self.block, self.ctx = block, ctx
        self.total = SingleTotal(block, ctx)


def unpatchify(tokens: torch.Tensor, frames: int, h: int, w: int, p: int, p_t: int) -> torch.Tensor:
    """(B, f/p_t * h/p * w/p, C * p_t * p * p) -> (B, C, f, h, w): the transformer's own reshape."""
    B = tokens.shape[0]
    x = tokens.reshape(B, frames // p_t, h // p, w // p, -1, p_t, p, p)
    return x.permute(0, 4, 1, 5, 2, 6, 3, 7).flatten(6, 7).flatten(4, 5).flatten(2, 3)


class HunyuanVideoModel(flux.StreamModel):
    """HunyuanVideo's transformer with its prompt table and distilled guidance, behind the cache
    protocol. ``forward(x, t, y)``: latents (B, 16, f, h, w), the pipeline's timestep (B,), prompt
    indices (B,) -> the predicted velocity (B, 16, f, h, w) in fp32."""

    def __init__(self, transformer: nn.Module, prompts: PromptTable, config: HunyuanVideoConfig,
                 guidance: float | None) -> None:
        super().__init__()
        self.transformer = transformer
        self.prompt_table = prompts
        self.config = config
        self.guidance = guidance if config.guidance_embeds else None
        self.ctx = StepContext()
        blocks: list[DoubleStreamBlock | SingleStreamBlock] = [
            DoubleStreamBlock(b, self.ctx) for b in transformer.transformer_blocks]
        blocks += [SingleStreamBlock(b, self.ctx) for b in transformer.single_transformer_blocks]
        object.__setattr__(self, "blocks", blocks)  # views of the transformer's blocks, not submodules
        self._rope_key: tuple | None = None
        self._fhw = (config.latent_frames, *config.latent_size)
        self.step_counting = "up"  # the official HunyuanVideo caching code counts steps from 0, as FLUX's

    @property
    def prompt_count(self) -> int:
        return len(self.prompt_table)

    def rope(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Rotary embedding of the image positions (the transformer's own, once per shape)."""
        key = (tuple(x.shape[2:]), x.device)
        if self._rope_key != key:
            self._rope = self.transformer.rope(x)
            self._rope_key = key
        return self._rope

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, n_img + n_txt, C), image first, and the conditioning vector c (B, C)."""
        tr = self.transformer
        dtype = self.weight_dtype
        x = x.to(dtype)
        timestep = t.to(dtype)
        pooled = self.prompt_table.pooled[y].to(dtype)
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((x.shape[0],), self.guidance, device=x.device, dtype=dtype) * 1000.0
        c, _ = tr.time_text_embed(timestep, pooled, guidance)
        img = tr.x_embedder(x)
        mask = self.prompt_table.mask[y].to(dtype)
        txt = tr.context_embedder(self.prompt_table.embeds[y].to(dtype), timestep, mask)
        n_img, n_txt = img.shape[1], txt.shape[1]
        valid = n_img + mask.sum(dim=1, dtype=torch.int)  # as the transformer's forward: a prompt's tokens
        attend = torch.arange(n_img + n_txt, device=x.device).unsqueeze(0) < valid.unsqueeze(1)  # come first
        self.ctx.n_img, self.ctx.mask = n_img, attend[:, None, None, :]
        self.ctx.rope = self.rope(x)
        self._fhw = tuple(x.shape[2:])
        return torch.cat([img, txt], dim=1), c

    def head(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """norm_out and proj_out on the image tokens, unpatchified: (B, 16, f, h, w) in fp32."""
        tr = self.transformer
        out = tr.proj_out(tr.norm_out(tokens[:, : self.ctx.n_img], c))
        p, p_t = tr.config.patch_size, tr.config.patch_size_t
        return unpatchify(out, *self._fhw, p, p_t).float()

    @property
    def image_slice(self) -> slice:
        """The image tokens' positions in the stream (before the text tokens), for methods that
        measure the image stream (First-Block Cache, TeaCache)."""
        return slice(0, self.ctx.n_img if self.ctx.n_img else self.config.image_tokens)

    @property
    def token_shape(self) -> tuple[int, int]:
        return self.config.num_tokens, self.config.hidden_size

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.transformer.x_embedder.proj.weight.dtype

    @property
    def token_groups(self) -> tuple[int, int]:
        """The spans of the stream that share adaLN vectors in a double-stream block: the image
        tokens, then the text tokens (of the latest ``embed``)."""
        if self.ctx.mask is None:  # before the first embed: the configured sizes
            return self.config.image_tokens, self.config.text_tokens
        return self.ctx.n_img, self.ctx.n_txt

    def grouped_modulation(self, kinds: tuple[str, ...]) -> GroupedModulation:
        """The adaLN vectors ``kinds`` of every site per token group (image, text) from one matmul,
        for the step programs (rfc.cache.fused), as FLUX.1's (same module names, other order)."""
        return GroupedModulation(self.blocks, kinds, text_first=False)

    def stacked_modulation(self, kinds: tuple[str, ...]) -> nn.Module:
        raise NotImplementedError("HunyuanVideo modulates image and text tokens apart: step programs read "
                                  "grouped_modulation(kinds) (per token group) instead")

    def native_forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The same step through HunyuanVideoTransformer3DModel's own forward, called as
        HunyuanVideoPipeline calls it: what the cache hooks of diffusers and cache-dit wrap (peer
        methods). Equal to ``forward`` bit for bit."""
        dtype = self.weight_dtype
        guidance = None
        if self.guidance is not None:
            guidance = torch.full((x.shape[0],), self.guidance, device=x.device, dtype=dtype) * 1000.0
        table = self.prompt_table
        out = self.transformer(
            hidden_states=x.to(dtype), timestep=t.to(dtype), encoder_hidden_states=table.embeds[y].to(dtype),
            encoder_attention_mask=table.mask[y].to(dtype), pooled_projections=table.pooled[y].to(dtype),
            guidance=guidance, return_dict=False)[0]
        self._fhw = tuple(x.shape[2:])
        return out.float()


# --------------------------------------------------------------------------------------------
# Building: diffusers' modules, random (hunyuan-video-tiny) or from the Hugging Face cache
# --------------------------------------------------------------------------------------------


def random_transformer(config: HunyuanVideoConfig, seed: int) -> nn.Module:
    """A HunyuanVideoTransformer3DModel of ``config``'s sizes with diffusers' own random init, seeded."""
    from diffusers import HunyuanVideoTransformer3DModel

    head = config.hidden_size // config.num_heads
    if sum(config.rope_axes) != head:
        raise ValueError(f"model.rope_axes {list(config.rope_axes)} must sum to the head size {head} "
                         "(model.hidden_size / model.num_heads)")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return HunyuanVideoTransformer3DModel(
            in_channels=config.in_channels, out_channels=config.in_channels, num_attention_heads=config.num_heads,
            attention_head_dim=head, num_layers=config.depth_double, num_single_layers=config.depth_single,
            num_refiner_layers=config.refiner_depth, patch_size=2, patch_size_t=1, text_embed_dim=config.text_dim,
            pooled_projection_dim=config.pooled_dim, guidance_embeds=config.guidance_embeds,
            rope_axes_dim=tuple(config.rope_axes)).eval()


class HunyuanVideoVAE(nn.Module):
    """HunyuanVideo's causal 3-D VAE with the pipeline's latent scaling: decode_images(latents
    (B, 16, f, h, w)) -> videos (B, 3, 4(f - 1) + 1, 8h, 8w) in about [-1, 1], as HunyuanVideoPipeline
    decodes them (latents / scaling_factor, no shift)."""

    def __init__(self, vae: nn.Module) -> None:
        super().__init__()
        self.vae = vae

    def decode_images(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents / self.vae.config.scaling_factor
        return self.vae.decode(z.to(self.vae.dtype), return_dict=False)[0].float()


def random_vae(seed: int) -> HunyuanVideoVAE:
    """A small random AutoencoderKLHunyuanVideo with HunyuanVideo's latent layout (16 channels, 8x
    spatial and 4x temporal compression) and scaling: the tiny model's decoder (its videos are not
    meaningful, only their shape)."""
    from diffusers import AutoencoderKLHunyuanVideo

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = AutoencoderKLHunyuanVideo(latent_channels=LATENT_CHANNELS, block_out_channels=(8, 8, 8, 8),
                                        layers_per_block=1, norm_num_groups=4, mid_block_add_attention=False)
    return HunyuanVideoVAE(vae.eval())


def load_transformer(repo: str, dtype: torch.dtype) -> nn.Module:
    """The transformer from the Hugging Face cache (never downloads)."""
    from diffusers import HunyuanVideoTransformer3DModel

    return HunyuanVideoTransformer3DModel.from_pretrained(hf_snapshot(repo), subfolder="transformer",
                                                          torch_dtype=dtype).eval()


def load_vae(repo: str) -> HunyuanVideoVAE:
    """The VAE in fp32 from the Hugging Face cache, tiled as the pipeline recommends for memory."""
    from diffusers import AutoencoderKLHunyuanVideo

    vae = AutoencoderKLHunyuanVideo.from_pretrained(hf_snapshot(repo), subfolder="vae", torch_dtype=torch.float32)
    vae.enable_tiling()
    return HunyuanVideoVAE(vae.eval())


def encode_prompts(repo: str, prompts: Sequence[str], max_tokens: int, device: torch.device, dtype: torch.dtype,
                   batch: int = 8) -> PromptTable:
    """The prompts through HunyuanVideo's LLaMA and CLIP encoders (HunyuanVideoPipeline.encode_prompt,
    so the prompt template, its cropped prefix, tokenisation and mask are the pipeline's), once per
    run; the encoders are freed after."""
    from diffusers import HunyuanVideoPipeline

    outputs = flux.encode_in_batches(HunyuanVideoPipeline, repo, prompts, max_tokens, device, dtype, batch)
    embeds, pooled, masks = (torch.cat(part) for part in zip(*outputs, strict=True))
    return PromptTable(embeds, masks, pooled)


__all__ = ["HunyuanVideoConfig", "HunyuanVideoModel", "HunyuanVideoVAE", "PromptTable",
           "attention_with_received", "encode_prompts", "load_transformer", "load_vae", "random_prompt_table",
           "random_transformer", "random_vae", "unpatchify"]
