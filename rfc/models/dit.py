"""DiT: Scalable Diffusion Models with Transformers (Peebles & Xie, 2023), written for this harness.

One file, top to bottom: embedders, the adaLN-Zero block, the final layer, the model, the
size registry. Parameter names follow the official release exactly (``blocks.{i}.attn.qkv``,
``y_embedder.embedding_table`` ...) so the released checkpoints load without renaming, and
``pos_embed`` is a persistent buffer so it appears in ``state_dict`` like the official
(frozen) parameter does.

The file holds no caching code: caching methods attach to built instances at run time and use
what the model exposes by name (see ``DiT``).
Shapes in comments: B batch, T tokens, C hidden size, H heads, D = C / H head size.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from rfc.utils.modulation import modulate

# --------------------------------------------------------------------------------------------
# Embedders
# --------------------------------------------------------------------------------------------


class PatchEmbed(nn.Module):
    """Image (B, c, H, W) -> tokens (B, T, C) with one strided conv, as timm's PatchEmbed."""

    def __init__(self, img_size: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, h, w) -> (B, T, C)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps -> (B, C): sinusoidal features followed by a two-layer MLP."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
        """(B,) possibly fractional timesteps -> (B, dim) [cos | sin] features (official order)."""
        half = dim // 2
        freqs = torch.exp(
            -math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half
        )
        args = t[:, None].float() * freqs[None]  # (B, half)
        embedding = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        if dim % 2:
            embedding = torch.cat([embedding, torch.zeros_like(embedding[:, :1])], dim=-1)
        return embedding

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = self.timestep_embedding(t, self.frequency_embedding_size)
        return self.mlp(t_freq.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels -> (B, C). Row ``num_classes`` is the null class used by guidance and by
    label dropout during training (only present when dropout_prob > 0, as in the release)."""

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float) -> None:
        super().__init__()
        use_cfg_embedding = int(dropout_prob > 0)
        self.embedding_table = nn.Embedding(num_classes + use_cfg_embedding, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob

    def token_drop(self, labels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Replace each label by the null class with probability dropout_prob (training only)."""
        drop = torch.rand(labels.shape, generator=generator, device=labels.device) < self.dropout_prob
        return torch.where(drop, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        return self.embedding_table(labels)


# --------------------------------------------------------------------------------------------
# Transformer block
# --------------------------------------------------------------------------------------------


class Attention(nn.Module):
    """Multi-head self-attention with timm's parameter names (qkv, proj)."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        assert dim % num_heads == 0, "hidden size must be divisible by the number of heads"
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=True)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, H, T, D)
        x = F.scaled_dot_product_attention(q, k, v)  # (B, H, T, D)
        return self.proj(x.transpose(1, 2).reshape(B, T, C))


class Mlp(nn.Module):
    """Two-layer MLP with tanh-approximated GELU (the release's choice)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU(approximate="tanh")
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class BranchModulation(NamedTuple):
    """The adaLN vectors of one branch, (B, C) each: its input is modulate(norm(x), shift, scale),
    its output enters the residual stream times gate."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


BranchFn = Callable[[int, torch.Tensor, nn.Module, torch.Tensor, torch.Tensor, nn.Module], torch.Tensor]
"""(branch b: 0 attention / 1 MLP, residual stream x, its norm, shift, scale, the branch module)
-> the branch output before its gate."""


def compute_branch(b: int, x: torch.Tensor, norm: nn.Module, shift: torch.Tensor, scale: torch.Tensor,
                   module: nn.Module) -> torch.Tensor:
    """A branch computed on every token: module(modulate(norm(x), shift, scale))."""
    return module(modulate(norm(x), shift, scale))


class DiTBlock(nn.Module):
    """adaLN-Zero block. The conditioning vector c yields six per-sample vectors: shift, scale
    and gate for the attention branch and for the MLP branch."""

    branches = ("attn", "mlp")  # its sites, in execution order

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    @property
    def norms(self) -> tuple[nn.Module, nn.Module]:
        """The layer norms in front of the attention and the MLP branch."""
        return self.norm1, self.norm2

    def modulation(self, c: torch.Tensor) -> tuple[BranchModulation, BranchModulation]:
        """c (B, C) -> (shift, scale, gate) of the attention branch and of the MLP branch, each (B, C)."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        return BranchModulation(shift_msa, scale_msa, gate_msa), BranchModulation(shift_mlp, scale_mlp, gate_mlp)

    def run(self, x: torch.Tensor, c: torch.Tensor, branch: BranchFn) -> torch.Tensor:
        """The block with each branch computed by ``branch(b, x, norm, shift, scale, module)``
        (b = 0 attention, 1 MLP): the residual update x + gate * branch output, in the official
        order. Caching methods pass their own ``branch``; ``forward`` passes the plain one."""
        attn, mlp = self.modulation(c)
        x = x + attn.gate.unsqueeze(1) * branch(0, x, self.norm1, attn.shift, attn.scale, self.attn)
        x = x + mlp.gate.unsqueeze(1) * branch(1, x, self.norm2, mlp.shift, mlp.scale, self.mlp)
        return x  # (B, T, C)

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        return self.run(x, c, compute_branch)


class FinalLayer(nn.Module):
    """adaLN-modulated norm and a linear map from tokens to patches of the output channels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))  # (B, T, p*p*out)


class StackedModulation(nn.Module):
    """The adaLN vectors ``kinds`` (of shift, scale, gate) of every site (attention and MLP of
    every block, in execution order) from one matmul of the blocks' stacked weights, copied once
    when built. forward(c) -> (B, sites, len(kinds), C); the values equal each block's own
    ``modulation(c)`` (the same rows of the same weights)."""

    def __init__(self, blocks: nn.ModuleList, kinds: tuple[str, ...]) -> None:
        super().__init__()
        unknown = set(kinds) - set(BranchModulation._fields)
        if unknown or not kinds:
            raise ValueError(f"modulation kinds must be among {BranchModulation._fields}, got {kinds}")
        chunks = [3 * branch + BranchModulation._fields.index(k) for branch in (0, 1) for k in kinds]
        lin = [b.adaLN_modulation[1] for b in blocks]
        C = lin[0].in_features
        with torch.no_grad():
            w = torch.cat([layer.weight.view(6, C, C)[chunks] for layer in lin]).reshape(-1, C)
            b = torch.cat([layer.bias.view(6, C)[chunks] for layer in lin]).reshape(-1)
        self.register_buffer("weight", w.clone(), persistent=False)
        self.register_buffer("bias", b.clone(), persistent=False)
        self.sites, self.kinds, self.hidden = 2 * len(blocks), kinds, C

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        return F.linear(F.silu(c), self.weight, self.bias).view(c.shape[0], self.sites, len(self.kinds), self.hidden)


# --------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DiTConfig:
    """Everything that fixes the parameter shapes of a DiT."""

    input_size: int = 32  # latent (or pixel) side length
    patch_size: int = 2
    in_channels: int = 4
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    class_dropout_prob: float = 0.1  # > 0 adds the null-class row needed by guidance
    num_classes: int = 1000
    learn_sigma: bool = True

    @property
    def out_channels(self) -> int:
        return self.in_channels * 2 if self.learn_sigma else self.in_channels

    @property
    def num_tokens(self) -> int:
        return (self.input_size // self.patch_size) ** 2


class DiT(nn.Module):
    """Class-conditional diffusion transformer.

    ``forward(x, t, y)`` maps a noisy input (B, c, S, S), integer (or float) timesteps (B,) and
    labels (B,) to (B, out_channels, S, S): the predicted noise, followed by the variance
    interpolation values when ``learn_sigma`` is set.

    What caching methods use, by name (the model side of the cache protocol, rfc.cache.base):
    ``embed`` -> (tokens, c), ``blocks`` (each with ``modulation(c)`` and ``run(x, c, branch)``),
    ``head(tokens, c)``, ``stacked_modulation(kinds)``, ``token_shape`` and ``weight_dtype``. A
    branch is a site: site 2i is block i's attention, 2i + 1 its MLP.
    """

    def __init__(self, config: DiTConfig) -> None:
        super().__init__()
        if config.input_size % config.patch_size:
            raise ValueError(f"input_size {config.input_size} is not divisible by patch_size {config.patch_size}")
        self.config = config
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.patch_size = config.patch_size
        self.num_heads = config.num_heads
        self.num_classes = config.num_classes
        C = config.hidden_size

        self.x_embedder = PatchEmbed(config.input_size, config.patch_size, config.in_channels, C)
        self.t_embedder = TimestepEmbedder(C)
        self.y_embedder = LabelEmbedder(config.num_classes, C, config.class_dropout_prob)
        # Fixed sin-cos table; persistent so state_dict carries it like the official frozen parameter.
        pos = get_2d_sincos_pos_embed(C, self.x_embedder.grid_size)
        self.register_buffer("pos_embed", torch.tensor(pos, dtype=torch.float32).unsqueeze(0), persistent=True)
        self.blocks = nn.ModuleList(
            [DiTBlock(C, config.num_heads, mlp_ratio=config.mlp_ratio) for _ in range(config.depth)]
        )
        self.final_layer = FinalLayer(C, config.patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        """The release's training init: Xavier linears, N(0, 0.02) embeddings, adaLN-Zero
        (modulation and output layers start at zero, so every block starts as the identity)."""

        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.constant_(module.bias, 0)

        self.apply(_basic_init)
        w = self.x_embedder.proj.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.constant_(self.x_embedder.proj.bias, 0)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.constant_(block.adaLN_modulation[-1].weight, 0)
            nn.init.constant_(block.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].weight, 0)
        nn.init.constant_(self.final_layer.adaLN_modulation[-1].bias, 0)
        nn.init.constant_(self.final_layer.linear.weight, 0)
        nn.init.constant_(self.final_layer.linear.bias, 0)

    def initialize_dense(self, generator: torch.Generator | None = None, std: float = 0.02) -> None:
        """Give the zero-initialised layers small random values.

        With the training init every block is the identity and the output is zero, which makes a
        random-weight model useless for exercising caches or comparing outputs. Latency does not
        depend on weight values, so benchmarks can use either init.
        """
        with torch.no_grad():
            layers = [b.adaLN_modulation[-1] for b in self.blocks]
            layers += [self.final_layer.adaLN_modulation[-1], self.final_layer.linear]
            for layer in layers:
                layer.weight.normal_(0.0, std, generator=generator)
                layer.bias.normal_(0.0, std, generator=generator)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, T, p*p*c) -> (B, c, S, S)."""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(x.shape[0], c, h * p, w * p)

    def embed(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, T, C) with positions added, and the conditioning vector c (B, C). The input
        is cast to the weights' dtype, so a model stored in bf16 takes the sampler's fp32 latents."""
        tokens = self.x_embedder(x.to(self.x_embedder.proj.weight.dtype)) + self.pos_embed  # (B, T, C)
        c = self.t_embedder(t) + self.y_embedder(y)  # (B, C)
        return tokens, c

    def head(self, tokens: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """Final layer and unpatchify: tokens (B, T, C) -> (B, out_channels, S, S), in fp32 whatever
        the weights' dtype (the sampler's arithmetic stays fp32; a no-op for fp32 weights)."""
        return self.unpatchify(self.final_layer(tokens, c)).float()

    @property
    def token_shape(self) -> tuple[int, int]:
        """(T, C): tokens per sample and hidden size, the shape of every branch output but the batch."""
        return int(self.pos_embed.shape[1]), int(self.pos_embed.shape[2])

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype the weights are stored in (bfloat16 under precision=bf16)."""
        return self.x_embedder.proj.weight.dtype

    def stacked_modulation(self, kinds: tuple[str, ...]) -> StackedModulation:
        """The adaLN vectors ``kinds`` (a subset of shift, scale, gate) of every site from one
        matmul, for step programs that need them all at once (see StackedModulation)."""
        return StackedModulation(self.blocks, kinds)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        tokens, c = self.embed(x, t, y)
        for block in self.blocks:
            tokens = block(tokens, c)
        return self.head(tokens, c)


# --------------------------------------------------------------------------------------------
# Fixed 2-D sin-cos position table (MAE's recipe, which the release uses)
# --------------------------------------------------------------------------------------------


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """(grid_size**2, embed_dim) table: half the channels encode the row, half the column."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.meshgrid(grid_w, grid_h)  # w goes first, as in the release
    grid = np.stack(grid, axis=0).reshape(2, 1, grid_size, grid_size)
    emb_h = _1d_sincos(embed_dim // 2, grid[0])
    emb_w = _1d_sincos(embed_dim // 2, grid[1])
    return np.concatenate([emb_h, emb_w], axis=1)


def _1d_sincos(embed_dim: int, pos: np.ndarray) -> np.ndarray:
    assert embed_dim % 2 == 0
    omega = np.arange(embed_dim // 2, dtype=np.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000**omega
    out = np.einsum("m,d->md", pos.reshape(-1).astype(np.float64), omega)
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)


# --------------------------------------------------------------------------------------------
# Registry: depth / hidden / heads of the published sizes, crossed with patch 2, 4, 8
# --------------------------------------------------------------------------------------------

DIT_SIZES: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
}

DIT_MODELS: tuple[str, ...] = tuple(f"DiT-{s}/{p}" for s in DIT_SIZES for p in (2, 4, 8))


def dit_config(arch: str, **overrides: object) -> DiTConfig:
    """Config of a named architecture ("DiT-XL/2"); overrides set input_size, in_channels ..."""
    try:
        size, patch = arch.removeprefix("DiT-").split("/")
        depth, hidden, heads = DIT_SIZES[size]
        patch_size = int(patch)
    except (ValueError, KeyError):
        raise ValueError(f"unknown DiT architecture {arch!r}; known: {', '.join(DIT_MODELS)}") from None
    if patch_size not in (2, 4, 8):
        raise ValueError(f"unknown DiT architecture {arch!r}; known: {', '.join(DIT_MODELS)}")
    fields = dict(depth=depth, hidden_size=hidden, num_heads=heads, patch_size=patch_size)
    fields.update(overrides)  # type: ignore[arg-type]
    return DiTConfig(**fields)  # type: ignore[arg-type]
