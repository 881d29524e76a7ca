"""ImageReward (Xu et al., 2023) through the image-reward package's own code, under transformers 5.

The metric is the package's: ``ImageReward.load`` builds its model (BLIP's ViT-L image encoder, a BERT
text encoder that cross-attends to the image, an MLP head) from THUDM/ImageReward's ImageReward.pt and
med_config.json, and ``model.score(prompt, image)`` gives one image's reward. image-reward 1.5, the
newest release, was written for the transformers 4 of its time (4.2x to 4.4x; 4.57 already lacks the
first name below) and relies on six things this project's transformers 5 no longer has or that the
package does not install. ``import_package`` supplies each exactly as the package expected it, and
nothing the score computes comes from anywhere but the package, torch and torchvision:

1. ``transformers.modeling_utils.apply_chunking_to_forward`` and ``prune_linear_layer``, imported by
   the text encoder (``models/BLIP/med.py``): transformers moved them to ``transformers.pytorch_utils``
   (the same functions). ``find_pruneable_heads_and_indices`` is gone; the package calls it only to
   prune attention heads, which scoring never does, so it stands in as a function that refuses.
   The three names exist in ``transformers.modeling_utils`` only while the package imports.
2. OpenAI's ``clip`` package, imported (not declared) by the package's CLIPScore and AestheticScore
   baselines, which this harness never loads. Where ``clip`` does not import (not installed, or the
   PyPI ``openai-clip`` 1.0.1, which needs ``pkg_resources`` that setuptools 81 dropped), a placeholder
   module that refuses any use stands in while the package imports and is removed after.
3. The tokenizer's ``additional_special_tokens_ids``, which ``init_tokenizer`` reads to find the id of
   the [ENC] token it adds (transformers 5 calls it ``extra_special_tokens_ids``): the package's
   ``BertTokenizer`` becomes a subclass that answers to the old name as well. It also loads
   bert-base-uncased (which the package names, with no way to pass a folder) from the Hugging Face
   cache only: a run never downloads, ``scripts/fetch_assets.py`` does.
4. ``init_weights()`` at the end of the text encoder's ``__init__`` (transformers 5 expects
   ``post_init()``, which sets the tied-weights table ``init_weights`` now reads): the first call runs
   ``post_init``. The weights it draws are replaced by the checkpoint's.
5. ``invert_attention_mask`` and ``get_head_mask``, which transformers 5 removed from its models: the
   text encoder's ``forward`` calls both. Given to the package's ``BertModel`` with transformers 4's
   behaviour (1 -> 0, 0 -> the dtype's minimum, broadcast over heads; no head mask -> one None per
   layer).
6. The import's side effects: the package turns off every warning of the process
   (``warnings.filterwarnings("ignore")`` in ``models/BLIP/blip.py``) and sets transformers' logging to
   errors only; both are restored after the import.

Checked: tests/test_image_reward.py builds a small random ImageReward, scores images with it here and
compares with what the unmodified package computed under transformers 4.43.4 (the version the papers'
environments pin) on the same weights and images: ``tests/data/image_reward_reference.json``, written
by ``scripts/image_reward_reference.py``.

``load`` also refuses a checkpoint that leaves any of the model's parameters at their random initial
values (the package loads with ``strict=False`` and says nothing), so a truncated or foreign file never
becomes a score.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.metadata
import io
import sys
import types
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rfc.utils.errors import RunError

if TYPE_CHECKING:
    import torch

MODULE = "ImageReward"  # what the image-reward package installs
DISTRIBUTION = "image-reward"
VERSION = "1.5"  # the release the adapters below are written for
INSTALL = 'pip install -e ".[imagereward]"'  # this project's extra: image-reward==1.5 and what it imports

_MOVED = ("apply_chunking_to_forward", "prune_linear_layer")  # to transformers.pytorch_utils
_REMOVED = "find_pruneable_heads_and_indices"
_ADAPTED = "_adapted_to_transformers_5"  # set on the package's med module once adapted


def installed_version() -> str | None:
    """The installed image-reward release, or None."""
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return None


def _no_head_pruning(*args: object, **kwargs: object) -> Any:
    raise NotImplementedError("image-reward: pruning attention heads needs find_pruneable_heads_and_indices, which "
                              "transformers 5 removed; scoring never prunes heads")


class _ClipPlaceholder(types.ModuleType):
    """Stands in for OpenAI's ``clip`` while image-reward imports: only its CLIP and aesthetic
    baselines use it, and any use says so."""

    def __getattr__(self, name: str) -> Any:
        raise AttributeError(f"OpenAI's clip package is not installed: image-reward's CLIPScore and AestheticScore "
                             f"need it (clip.{name}); ImageReward itself does not")


def _clip_imports() -> bool:
    try:
        importlib.import_module("clip")
    except Exception:  # absent, or openai-clip without pkg_resources: either way unusable
        sys.modules.pop("clip", None)
        return False
    return True


@contextlib.contextmanager
def _import_shims() -> Iterator[None]:
    """Adapters 1, 2 and 6 of the module docstring, for the duration of the package's import."""
    import transformers
    import transformers.modeling_utils as modeling_utils
    import transformers.pytorch_utils as pytorch_utils

    added = []
    for name in _MOVED:
        if not hasattr(modeling_utils, name):
            setattr(modeling_utils, name, getattr(pytorch_utils, name))
            added.append(name)
    if not hasattr(modeling_utils, _REMOVED):
        setattr(modeling_utils, _REMOVED, _no_head_pruning)
        added.append(_REMOVED)
    placeholder = None if _clip_imports() else _ClipPlaceholder("clip")
    if placeholder is not None:
        sys.modules["clip"] = placeholder
    verbosity = transformers.logging.get_verbosity()
    try:
        with warnings.catch_warnings():  # the package's filterwarnings("ignore") ends with this block
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)
        if placeholder is not None and sys.modules.get("clip") is placeholder:
            del sys.modules["clip"]
        for name in added:
            delattr(modeling_utils, name)


def _transformers_major() -> int:
    import transformers

    return int(transformers.__version__.split(".")[0])


def _adapt_classes(module_name: str) -> None:
    """Adapters 3, 4 and 5 of the module docstring, on the package's own classes, under transformers 5
    or later only (image-reward 1.5's layout; another layout has nothing here to adapt)."""
    import torch
    from transformers import PreTrainedModel

    blip = sys.modules.get(f"{module_name}.models.BLIP.blip")
    med = sys.modules.get(f"{module_name}.models.BLIP.med")
    if blip is None or med is None or _transformers_major() < 5 or getattr(med, _ADAPTED, False):
        return

    class BlipBertTokenizer(blip.BertTokenizer):
        """BertTokenizer answering transformers 4's name for the added special tokens' ids, loaded
        from the Hugging Face cache only (the package asks for bert-base-uncased by name)."""

        @classmethod
        def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
            return super().from_pretrained(*args, **{**kwargs, "local_files_only": True})

        @property
        def additional_special_tokens_ids(self) -> list[int]:
            return self.extra_special_tokens_ids

    BlipBertTokenizer.__qualname__ = BlipBertTokenizer.__name__ = blip.BertTokenizer.__name__
    blip.BertTokenizer = BlipBertTokenizer

    def init_weights(self: Any) -> None:
        """transformers 4's call at the end of __init__, run as transformers 5's post_init (which
        itself calls init_weights again, then with the table that needs)."""
        if "all_tied_weights_keys" in vars(self):
            PreTrainedModel.init_weights(self)
        else:
            self.post_init()

    def invert_attention_mask(self: Any, mask: torch.Tensor) -> torch.Tensor:
        """transformers 4: a (batch, keys) or (batch, queries, keys) mask of ones and zeros as an
        additive one broadcast over heads, 0 where attended, the dtype's minimum where not."""
        extended = mask[:, None, :, :] if mask.dim() == 3 else mask[:, None, None, :]
        extended = extended.to(dtype=self.dtype)
        return (1.0 - extended) * torch.finfo(self.dtype).min

    def get_head_mask(self: Any, head_mask: torch.Tensor | None, num_layers: int) -> list[None]:
        """transformers 4 without a head mask: one None per layer (scoring never passes one)."""
        if head_mask is not None:
            raise NotImplementedError("image-reward under transformers 5: head masks are not supported")
        return [None] * num_layers

    med.BertPreTrainedModel.init_weights = init_weights
    if not hasattr(med.BertModel, "invert_attention_mask"):
        med.BertModel.invert_attention_mask = invert_attention_mask
    if not hasattr(med.BertModel, "get_head_mask"):
        med.BertModel.get_head_mask = get_head_mask
    setattr(med, _ADAPTED, True)


@contextlib.contextmanager
def quiet() -> Iterator[None]:
    """transformers' logging at errors only while the package's model runs: its text encoder builds
    transformers' output classes with ``past_key_values``, which transformers 5 calls deprecated in a
    warning nobody can act on (the package's import set errors-only for the whole process; here it
    lasts while scoring)."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def import_package(module_name: str = MODULE) -> types.ModuleType:
    """The image-reward package, imported with the adapters of the module docstring. Raises
    ImportError (or whatever the import raises) when it cannot be imported, and an ImportError for
    another release of image-reward than the one the adapters are written for."""
    version = installed_version() if module_name == MODULE else None
    if version is not None and version != VERSION:
        raise ImportError(f"image-reward {version} is installed; this harness scores with {VERSION}, the release its "
                          f"transformers 5 adapters are written for")
    with _import_shims():  # cheap once imported: import_module then returns the loaded package
        package = importlib.import_module(module_name)
    _adapt_classes(module_name)
    return package


def missing_parameters(model: Any, checkpoint: Path) -> list[str]:
    """The model's parameters that ``checkpoint`` (a state dict) does not hold with their shape."""
    import torch

    state = torch.load(checkpoint, map_location="cpu", mmap=True, weights_only=True)
    if not isinstance(state, dict):
        return [name for name, _ in model.named_parameters()]
    return [name for name, p in model.named_parameters()
            if name not in state or tuple(getattr(state[name], "shape", ())) != tuple(p.shape)]


def load(checkpoint: Path, med_config: Path, device: torch.device, module_name: str = MODULE) -> Any:
    """The package's ImageReward model from local files (``ImageReward.load``: nothing is downloaded),
    in eval mode on ``device``; a RunError naming the file when the checkpoint does not fill every
    parameter of the model. The package's own prints ("load checkpoint from ...") are dropped."""
    import torch

    package = import_package(module_name)
    with contextlib.redirect_stdout(io.StringIO()):
        model = package.load(str(checkpoint), device=device, med_config=str(med_config))
    if isinstance(model, torch.nn.Module):  # the package's model (a stand-in in some tests is not)
        missing = missing_parameters(model, checkpoint)
        if missing:
            raise RunError(f"{checkpoint}: not an ImageReward checkpoint for this model: {len(missing)} of its "
                           f"parameters are missing or of another shape (first: {missing[0]}); fetch it again with "
                           f"`python scripts/fetch_assets.py image-reward`")
    return model

