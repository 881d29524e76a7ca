"""rfc.utils.invariance.FixedShapes: a row's result does not depend on how many rows share its call.

Each operation the mode tiles is called on a batch and on every prefix of it; a row's output must
be the same bits whatever the batch (the tile shape never changes), and equal to the untiled
operation to rounding (1e-5: the tiles may take another kernel than the whole batch would).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from rfc.models.family import family_of
from rfc.utils.invariance import FixedShapes, batch_invariance

SIZES = (1, 2, 5, 13)  # batches smaller than, equal to and larger than a tile, and ragged


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


class Shapes(TorchFunctionMode):
    """Records the shapes the tiled operations are called with (beneath FixedShapes)."""

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[tuple[tuple[int, ...], ...]] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in TILED:
            self.seen.add(tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor)))
        return func(*args, **(kwargs or {}))


TILED = {F.linear, torch.matmul, torch.Tensor.matmul, torch.Tensor.__matmul__, torch.bmm,
         F.scaled_dot_product_attention, F.conv2d, F.group_norm}


def check(op, inputs: list[torch.Tensor], rows: int) -> None:
    """``op`` on the first n entries of ``inputs`` for every n in SIZES, under FixedShapes(rows):
    every call of the underlying kernel has one shape, each entry's output is the same bits in
    every batch, and close to the untiled output."""
    with Shapes() as shapes, FixedShapes(rows):
        whole = op(*inputs)
        for n in SIZES:
            part = op(*(t[:n] for t in inputs))
            assert torch.equal(part, whole[:n]), n
    assert len(shapes.seen) == 1, shapes.seen
    torch.testing.assert_close(whole, op(*inputs), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("rows", [1, 7, 64])
def test_linear_layers_see_one_row_count(rows):
    layer = torch.nn.Linear(48, 40)
    check(layer, [torch.randn(13, 9, 48, generator=gen())], rows)
    weight = torch.randn(48, 40, generator=gen(1))
    check(lambda x: x @ weight, [torch.randn(13, 9, 48, generator=gen(2))], rows)


def test_batched_matmuls_and_attention_see_one_batch_size():
    q, k, v = (torch.randn(13, 4, 9, 16, generator=gen(i)) for i in range(3))
    check(lambda a, b: torch.matmul(a, b.transpose(-2, -1)), [q, k], 72)
    check(lambda a, b: torch.bmm(a, b.transpose(1, 2)), [q.flatten(0, 1), k.flatten(0, 1)], 18)
    check(F.scaled_dot_product_attention, [q, k, v], 72)
    mask = torch.randn(13, 1, 9, 9, generator=gen(4))
    check(lambda a, b, c, m: F.scaled_dot_product_attention(a, b, c, m), [q, k, v, mask], 72)


def test_convolutions_see_one_batch_size():
    conv = torch.nn.Conv2d(3, 8, kernel_size=3, padding=1)
    check(conv, [torch.randn(13, 3, 6, 6, generator=gen())], 100)
    with FixedShapes(100):  # an unbatched input has no batch to tile
        unbatched = conv(torch.randn(3, 6, 6, generator=gen(1)))
    assert unbatched.shape == (8, 6, 6)


def test_group_norms_see_one_batch_size():
    norm = torch.nn.GroupNorm(4, 16)
    check(norm, [torch.randn(13, 16, 6, 6, generator=gen()) * 3 + 1], 96)


@pytest.mark.parametrize("model", ["flux-tiny", "hunyuan-video-tiny"])
def test_a_latent_decodes_to_the_same_image_alone_and_in_a_batch(make_cfg, model):
    """The decoders (diffusers' AutoencoderKL and HunyuanVideo's causal 3D VAE, random weights):
    sample 1 decoded alone equals it decoded in a batch of 3, bit for bit, under the mode (on this
    CPU the VAE's GroupNorm alone differs at batch 1 by about 1e-6 without it)."""
    cfg = make_cfg(f"model={model}")
    family = family_of(cfg.model)
    vae = family.build_vae(cfg, {"assets": "unused"}, torch.device("cpu"))
    latents = torch.randn(3, *family.latent_shape(family.arch(cfg.model)), generator=gen())
    alone = latents[1:2].clone()
    with torch.no_grad(), FixedShapes(1024):
        assert torch.equal(family.decode(vae, alone), family.decode(vae, latents)[1:2])


def test_rows_must_be_a_positive_integer_and_zero_is_off():
    for bad in (0, -3, True, 2.0):
        with pytest.raises(ValueError, match="positive number of rows"):
            FixedShapes(bad)
    x = torch.randn(3, 5, generator=gen())
    layer = torch.nn.Linear(5, 2)
    with batch_invariance(0):
        assert torch.equal(layer(x), F.linear(x, layer.weight, layer.bias))
