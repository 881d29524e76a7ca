"""A model family added from this file alone: a small transformer (non-square latents, its own
embedding and head, no VAE) behind the model protocol, registered as a family, and run through
the runner end to end with FORA and RFC, fused and per site. Nothing outside this file knows it."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar, NamedTuple

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf
from torch import nn

from rfc.models.family import ModelFamily, families, family_of, register_family, unregister_family
from rfc.models.flops import CostModel, dit_cost
from rfc.run.build import plan_run
from rfc.run.runner import run

# ---- the model -----------------------------------------------------------------------------------


@dataclass(frozen=True)
class ToyConfig:
    in_channels: int = 2
    height: int = 4
    width: int = 6  # not square: generate takes the family's latent shape as it is
    hidden_size: int = 32
    num_heads: int = 2
    depth: int = 3
    num_classes: int = 3

    @property
    def num_tokens(self) -> int:
        return self.height * self.width


class Modulation(NamedTuple):
    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


class ToyAttention(nn.Module):
    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, C))


def computed(b, x, norm, shift, scale, module):
    return module(norm(x) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1))


class ToyBlock(nn.Module):
    branches = ("attn", "mlp")

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.norm2 = nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)
        self.attn = ToyAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(approximate="tanh"), nn.Linear(4 * dim, dim))
        self.ada = nn.Linear(dim, 6 * dim)

    @property
    def norms(self):
        return self.norm1, self.norm2

    def modulation(self, c):
        chunks = self.ada(F.silu(c)).chunk(6, dim=1)
        return Modulation(*chunks[:3]), Modulation(*chunks[3:])

    def run(self, x, c, branch):
        attn, mlp = self.modulation(c)
        x = x + attn.gate.unsqueeze(1) * branch(0, x, self.norm1, attn.shift, attn.scale, self.attn)
        return x + mlp.gate.unsqueeze(1) * branch(1, x, self.norm2, mlp.shift, mlp.scale, self.mlp)


class StackedModulation(nn.Module):
    """Every site's modulation vectors ``kinds`` at once, (B, sites, kinds, C), as step programs ask."""

    def __init__(self, blocks: nn.ModuleList, kinds: tuple[str, ...]) -> None:
        super().__init__()
        self.blocks, self.kinds = list(blocks), kinds

    def forward(self, c):
        sites = [torch.stack([getattr(m, k) for k in self.kinds], 1) for b in self.blocks for m in b.modulation(c)]
        return torch.stack(sites, 1)


class ToyTransformer(nn.Module):
    """Latents (B, C, H, W), one token per position, class labels (row num_classes: the null class)."""

    def __init__(self, config: ToyConfig) -> None:
        super().__init__()
        C = config.hidden_size
        self.config = config
        self.x_in = nn.Linear(config.in_channels, C)
        self.pos = nn.Parameter(0.1 * torch.randn(1, config.num_tokens, C))
        self.t_in = nn.Linear(16, C)
        self.y_in = nn.Embedding(config.num_classes + 1, C)
        self.blocks = nn.ModuleList(ToyBlock(C, config.num_heads) for _ in range(config.depth))
        self.norm_out = nn.LayerNorm(C)
        self.out = nn.Linear(C, config.in_channels)

    def embed(self, x, t, y):
        tokens = self.x_in(x.to(self.weight_dtype).flatten(2).transpose(1, 2)) + self.pos
        freqs = torch.exp(-math.log(1000) * torch.arange(8, device=x.device) / 8)
        angles = t.float()[:, None] * freqs[None]
        c = self.t_in(torch.cat([angles.sin(), angles.cos()], 1).to(self.weight_dtype)) + self.y_in(y)
        return tokens, c

    def head(self, tokens, c):
        cfg = self.config
        out = self.out(self.norm_out(tokens)).transpose(1, 2)
        return out.reshape(out.shape[0], cfg.in_channels, cfg.height, cfg.width).float()

    @property
    def token_shape(self):
        return self.config.num_tokens, self.config.hidden_size

    @property
    def weight_dtype(self):
        return self.x_in.weight.dtype

    def stacked_modulation(self, kinds):
        return StackedModulation(self.blocks, kinds)

    def forward(self, x, t, y):
        tokens, c = self.embed(x, t, y)
        for block in self.blocks:
            tokens = block.run(tokens, c, computed)
        return self.head(tokens, c)


# ---- the family ----------------------------------------------------------------------------------


class ToyFamily(ModelFamily):
    name: ClassVar[str] = "toy"
    tiny: ClassVar[str] = "toy"
    model_class: ClassVar[type[nn.Module]] = ToyTransformer

    def arch(self, m: DictConfig) -> ToyConfig:
        return ToyConfig(in_channels=int(m.in_channels), height=int(m.height), width=int(m.width))

    def setting(self, cfg: DictConfig, arch: ToyConfig, paths: Mapping[str, Any]) -> dict[str, object]:
        return dict(
            model=str(cfg.model.name),
            arch="toy",
            image_size=arch.width,
            vae=None,
            cfg_scale=float(cfg.cfg_scale),
            guided_channels=int(cfg.model.guided_channels),
            checkpoint=f"random:toy:{cfg.seed}",
        )

    def build(self, cfg: DictConfig, arch: ToyConfig, device: torch.device, prompts: list[str] | None) -> nn.Module:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(cfg.seed))
            return ToyTransformer(arch).eval().requires_grad_(False).to(device)

    def sampler_args(self, arch: ToyConfig) -> dict[str, object]:
        return {"learn_sigma": False}

    def latent_shape(self, arch: ToyConfig) -> tuple[int, ...]:
        return (arch.in_channels, arch.height, arch.width)

    def sites(self, arch: ToyConfig) -> tuple[str, ...]:
        return ("attn", "mlp") * arch.depth

    def cost(self, arch: ToyConfig) -> CostModel:
        return dit_cost(arch.num_tokens, arch.hidden_size, arch.num_heads, arch.depth)


TOY_MODEL = dict(
    name="toy",
    family="toy",
    in_channels=2,
    height=4,
    width=6,
    guided_channels=2,
    pretrained=False,
    extractor=None,
    reference=None,
)


@pytest.fixture
def toy():
    register_family(ToyFamily)
    yield families()["toy"]
    unregister_family("toy")
    assert "toy" not in families()


def toy_cfg(make_cfg, *overrides: str) -> DictConfig:
    cfg = make_cfg(
        "eval=smoke", "eval.num_samples=4", "eval.batch_size=2", "eval.score=false", "sampler.num_steps=10", *overrides
    )
    cfg.model = OmegaConf.create(TOY_MODEL)
    return cfg


def test_the_family_is_found_from_the_model_config(toy, make_cfg):
    assert family_of(OmegaConf.create(TOY_MODEL)) is toy
    assert {"dit", "flux", "toy"} <= set(families())
    with pytest.raises(ValueError, match="model.family='nope' is not a registered model family"):
        family_of(OmegaConf.create({**TOY_MODEL, "family": "nope"}))


@pytest.mark.parametrize("method, fused", [("fora", True), ("fora", False), ("rfc", True), ("rfc", False)])
def test_fora_and_rfc_run_end_to_end_on_a_family_defined_here(toy, make_cfg, tmp_path, method, fused):
    full = run(toy_cfg(make_cfg, "method=none"), tmp_path / "none", progress=False)
    cfg = toy_cfg(
        make_cfg,
        f"method={method}",
        f"method.fused={str(fused).lower()}",
        *(["method.tau=1.0"] if method == "rfc" else []),
    )  # RFC's schedule: caching within 10 steps
    plan = plan_run(cfg, tmp_path / "plan")
    assert plan.family is toy and plan.arch == ToyConfig()
    rec = run(cfg, tmp_path / method, progress=False)
    assert rec.model == "toy" and rec.method == method and rec.fused is fused
    assert 0 < rec.nfc < 10 and rec.num_steps == 10
    assert 0 < rec.tflops < full.tflops  # cached steps cost less, priced by the family's cost model
    assert rec.full_sites + rec.cached_sites == 10 * 2 * ToyConfig().depth
    images = np.load(tmp_path / method / "samples.npz")["arr_0"]
    assert images.shape == (4, 4, 6, 2) and images.dtype == np.uint8  # (N, H, W, C): a 4x6 latent as it is
    reference = np.load(tmp_path / "none" / "samples.npz")["arr_0"]
    assert not np.array_equal(images, reference)  # cached steps changed the samples, a little
    assert np.abs(images.astype(int) - reference.astype(int)).mean() < 40
    assert (tmp_path / method / "grid.png").is_file()
