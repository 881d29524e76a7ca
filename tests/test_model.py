"""The DiT file: official key set and shapes, the whole family, forward shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from rfc.models.dit import DIT_MODELS, DiT, DiTConfig, dit_config


def official_xl2_shapes() -> dict[str, tuple[int, ...]]:
    """Key -> shape of the released DiT-XL-2-256x256.pt, written out from the specification."""
    C, depth, p, cin, cout = 1152, 28, 2, 4, 8
    shapes: dict[str, tuple[int, ...]] = {
        "pos_embed": (1, 256, C),
        "x_embedder.proj.weight": (C, cin, p, p),
        "x_embedder.proj.bias": (C,),
        "t_embedder.mlp.0.weight": (C, 256),
        "t_embedder.mlp.0.bias": (C,),
        "t_embedder.mlp.2.weight": (C, C),
        "t_embedder.mlp.2.bias": (C,),
        "y_embedder.embedding_table.weight": (1001, C),
        "final_layer.linear.weight": (p * p * cout, C),
        "final_layer.linear.bias": (p * p * cout,),
        "final_layer.adaLN_modulation.1.weight": (2 * C, C),
        "final_layer.adaLN_modulation.1.bias": (2 * C,),
    }
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({
            b + "attn.qkv.weight": (3 * C, C), b + "attn.qkv.bias": (3 * C,),
            b + "attn.proj.weight": (C, C), b + "attn.proj.bias": (C,),
            b + "mlp.fc1.weight": (4 * C, C), b + "mlp.fc1.bias": (4 * C,),
            b + "mlp.fc2.weight": (C, 4 * C), b + "mlp.fc2.bias": (C,),
            b + "adaLN_modulation.1.weight": (6 * C, C), b + "adaLN_modulation.1.bias": (6 * C,),
        })
    return shapes


def test_xl2_on_meta_has_official_keys_shapes_and_675m_params():
    with torch.device("meta"):
        model = DiT(dit_config("DiT-XL/2", input_size=32))
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == official_xl2_shapes()
    n_params = sum(p.numel() for p in model.parameters())
    assert round(n_params / 1e6) == 675, n_params


@pytest.mark.parametrize("arch", DIT_MODELS)
@pytest.mark.parametrize("image_size", [256, 512])
def test_whole_family_builds(arch, image_size):
    cfg = dit_config(arch, input_size=image_size // 8)
    with torch.device("meta"):
        model = DiT(cfg)
    assert model.pos_embed.shape == (1, (image_size // 8 // cfg.patch_size) ** 2, cfg.hidden_size)
    assert len(model.blocks) == cfg.depth


def test_unknown_arch_is_a_clear_error():
    with pytest.raises(ValueError, match="DiT-XL/2"):
        dit_config("DiT-M/2")
    with pytest.raises(ValueError, match="unknown DiT architecture"):
        dit_config("DiT-S/3")


def test_forward_shape_and_configurable_channels():
    cfg = DiTConfig(input_size=8, patch_size=2, in_channels=3, hidden_size=64, depth=2, num_heads=4,
                    num_classes=7, learn_sigma=False)
    model = DiT(cfg)
    out = model(torch.randn(5, 3, 8, 8), torch.randint(0, 1000, (5,)), torch.randint(0, 7, (5,)))
    assert out.shape == (5, 3, 8, 8)
    assert model.y_embedder.embedding_table.num_embeddings == 8  # null class row


def test_training_init_is_identity_blocks_and_zero_output():
    model = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                          num_classes=10)).eval()
    x = torch.randn(2, 1, 8, 8)
    out = model(x, torch.tensor([10, 500]), torch.tensor([1, 2]))
    assert torch.count_nonzero(out) == 0  # adaLN-Zero: final layer starts at zero
    model.initialize_dense(torch.Generator().manual_seed(0))
    assert torch.count_nonzero(model(x, torch.tensor([10, 500]), torch.tensor([1, 2]))) > 0


def test_pos_embed_is_the_2d_sincos_table():
    model = DiT(DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=16, depth=1, num_heads=2,
                          num_classes=10))
    pe = model.pos_embed[0].numpy()  # (16 tokens, 16 channels)
    # token (row r, col c): the first half encodes c?  Official: first half from grid[0] = w (column).
    omega = 1.0 / 10000 ** (np.arange(4) / 4.0)
    r, c = 2, 3
    tok = r * 4 + c
    first = np.concatenate([np.sin(c * omega), np.cos(c * omega)])
    second = np.concatenate([np.sin(r * omega), np.cos(r * omega)])
    np.testing.assert_allclose(pe[tok], np.concatenate([first, second]), atol=1e-6)
