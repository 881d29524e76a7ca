"""Text-to-image quality metrics for FLUX rows: PSNR, SSIM and LPIPS of each image against the
full-compute image of the same noise, ImageReward and CLIP score of each image against its prompt.

Weights are never downloaded here (``scripts/fetch_assets.py`` does that). ``check_metrics`` runs
before sampling and only looks for files; a metric whose weights are absent stops the run
(``eval.missing_metrics=error``) or is left empty with the reason in the row's notes (``skip``), so
no number ever comes from random or half-fetched weights. Where each metric's weights are looked up:

- ``lpips``: torchvision's AlexNet in torch hub's checkpoint folder,
  ``<torch.hub.get_dir()>/checkpoints/alexnet-owt-7be5be79.pth`` (``$TORCH_HOME/hub``, by default
  ``~/.cache/torch/hub``), where torchvision's loader finds it; the LPIPS linear layers ship inside
  torchmetrics (``functional/image/lpips_models/alex.pth``). ``fetch_assets.py lpips``.
- ``clip``: the Hugging Face cache (``HF_HOME`` / ``HF_HUB_CACHE``), openai/clip-vit-large-patch14:
  config.json, model.safetensors (or pytorch_model.bin), vocab.json, merges.txt.
  ``fetch_assets.py clip-vit-large-patch14``.
- ``image_reward``: the ``image-reward`` package (1.5, this project's ``imagereward`` extra), and in the
  Hugging Face cache THUDM/ImageReward's ImageReward.pt and med_config.json plus bert-base-uncased's
  tokenizer, which BLIP loads by name. ``fetch_assets.py image-reward``. image-reward 1.5 was written
  for transformers 4; ``eval.image_reward`` imports it under transformers 5 with six small adapters
  (what transformers moved or removed, OpenAI's ``clip`` it imports but does not declare) that leave
  its arithmetic untouched (tested against the unmodified package under transformers 4.43).
  ``check_metrics`` tries the import and reports a failure as it would missing weights.
- ``psnr``, ``ssim``: no weights.

PSNR and SSIM are ``eval.metrics.psnr_ssim``'s, so that DiT and FLUX rows mean the same thing (mean
per image, data range 255, 11-pixel Gaussian SSIM window), computed on the run's device
(``psnr_ssim_on``: psnr_ssim's float64 SSIM takes ~20 s per 1024x1024 image on a CPU). LPIPS is
torchmetrics' AlexNet LPIPS on [0, 1] floats (``normalize=True``), mean over images. ImageReward is
the package's ``score(prompt, PIL image)`` per image, mean over images. Every metric network runs
in fp32 with TF32 off, whatever the run's precision mode, so that a metric does not depend on how
the samples were drawn.

CLIP score, on the papers' scale
--------------------------------
RFC's Table 2 (CLIP 17.07 for FLUX.1-dev full compute on DrawBench) follows ToCa's and TaylorSeer's
evaluation script (ToCa's ``PixArt-alpha-ToCa-tools/clip_score.py``): torchmetrics' ``CLIPScore``
with openai/clip-vit-large-patch14, each image given as torchvision ``ToTensor()`` floats in [0, 1]
with its prompt, one ``update`` per image, ``compute()`` per batch of images, and the mean of those
(equal batches: the mean over images).

What that computes: torchmetrics hands the float tensors unchanged to transformers' CLIPProcessor.
Its image processor (the PIL one in the transformers 4.x releases the papers used; their
environments pin 4.43) resizes the shortest edge to 224 with PIL bicubic (a [0, 1] float image is
multiplied by 255 into uint8 for PIL and divided back, which is exact for ``ToTensor`` input),
centre-crops 224, then rescales by 1/255 a second time (transformers 4.x only logs "It looks like you
are trying to rescale already rescaled images") and normalises with CLIP's mean and std. CLIP
therefore sees ``(x / 255 - mean) / std`` with x in [0, 1]: every channel stays within
``[-mean/std, (1/255 - mean)/std]``, red within [-1.7923, -1.7777] instead of [-1.7923, 1.9303]. That
is a nearly black image carrying the picture at 1/255 of its contrast: the image embedding is
dominated by the black image and depends on the picture only through a small perturbation, which is
why the papers' CLIP numbers are about 17 rather than on the usual CLIP-score scale (images scaled
once), with which they are not comparable; differences between methods shrink on the papers' one.
(No number was measured here: the weights cannot be downloaded on the machine this was written on.)
torchmetrics sums 100 * cos per image without clamping and clamps only the mean at 0; so does
``clip_score``.

``clip_score`` computes that protocol itself rather than through torchmetrics, for two reasons. With
transformers 5 (installed here) torchmetrics 1.9's CLIPScore cannot run: ``get_image_features`` now
returns a ModelOutput, and torchmetrics calls ``.norm`` on it (AttributeError). And transformers 5's
CLIPProcessor loads the torchvision image processor, which also rescales twice but resizes floats
with torchvision's antialiased bicubic: pixel values differ from the papers' PIL path by up to 5e-5
for 1024x1024 images and 1.6e-3 for upscaled small ones, on a signal only 0.0146 wide.
``clip_pixel_values`` reproduces the PIL path bit for bit (the tests compare it with transformers'
``CLIPImageProcessorPil`` on ``ToTensor`` input, and the score with torchmetrics' CLIPScore driven by
that processor); prompts are tokenised one at a time with padding and cut to the text model's 77
positions, as torchmetrics does (a longer prompt loses its end-of-text token, as in the papers).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from eval import image_reward, registry
from eval.registry import MISSING_CHOICES as MISSING_CHOICES  # re-exported: eval.missing_metrics' choices
from eval.registry import T2I, T2V, MetricInputs
from rfc.models.hub import FLUX_FETCH_NAME as FLUX_FETCH_NAME  # re-exported: fetch_assets and tests read them here
from rfc.models.hub import FLUX_FILES as FLUX_FILES
from rfc.models.hub import FLUX_WEIGHTS as FLUX_WEIGHTS
from rfc.models.hub import flux_weights_missing as flux_weights_missing
from rfc.models.hub import hub_cache, hub_file, hub_missing
from rfc.utils.errors import RunError, reason
from rfc.utils.progress import bar

if TYPE_CHECKING:
    import numpy as np
    import torch

KEY = "eval.t2i_metrics"  # the config key that lists a text-to-image row's metrics


def __getattr__(name: str) -> object:
    """The text-to-image metrics as the registry (eval.registry) has them now: ``T2I_METRICS``
    their names, ``COLUMN`` name -> row column, ``PAIRED`` those measured against full compute."""
    if name == "T2I_METRICS":
        return tuple(m.name for m in registry.metrics(T2I))
    if name == "COLUMN":
        return {m.name: m.column for m in registry.metrics(T2I)}
    if name == "PAIRED":
        return tuple(m.name for m in registry.metrics(T2I) if m.paired)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


FETCH = "python scripts/fetch_assets.py"
FETCH_NAME = {"lpips": "lpips", "clip": "clip-vit-large-patch14", "image_reward": "image-reward"}

CLIP_REPO = "openai/clip-vit-large-patch14"
CLIP_FILES = ("config.json", "vocab.json", "merges.txt")
CLIP_WEIGHTS = ("model.safetensors", "pytorch_model.bin")  # either; from_pretrained prefers the first
CLIP_SIZE = 224  # the processor's shortest edge and centre crop for ViT-L/14
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

IMAGE_REWARD_REPO = "THUDM/ImageReward"
IMAGE_REWARD_FILES = ("ImageReward.pt", "med_config.json")
BLIP_TOKENIZER_REPO = "bert-base-uncased"  # BLIP's init_tokenizer: BertTokenizer.from_pretrained('bert-base-uncased')
BLIP_TOKENIZER_FILES = ("vocab.txt", "tokenizer_config.json")
IMAGE_REWARD_INSTALL = image_reward.INSTALL
IMAGE_REWARD_MODULE = image_reward.MODULE  # what the image-reward package installs

ALEXNET_FILE = "alexnet-owt-7be5be79.pth"  # torchvision's AlexNet_Weights.IMAGENET1K_V1 (= DEFAULT)
ALEXNET_URL = f"https://download.pytorch.org/models/{ALEXNET_FILE}"

_CHUNK = 4  # images per LPIPS update


# ---------------------------------------------------------------------------------------------------
# Offline lookups (file checks only: they run before sampling)


def alexnet_checkpoint() -> Path:
    """Where torchvision keeps (and LPIPS loads) AlexNet's ImageNet weights: torch hub's checkpoints."""
    import torch

    return Path(torch.hub.get_dir()) / "checkpoints" / ALEXNET_FILE


def _lpips_layers() -> Path | None:
    """The LPIPS linear layers torchmetrics ships (functional/image/lpips_models/alex.pth)."""
    spec = importlib.util.find_spec("torchmetrics")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(list(spec.submodule_search_locations)[0]) / "functional" / "image" / "lpips_models" / "alex.pth"


def _clip_weights() -> Path | None:
    return next((p for p in (hub_file(CLIP_REPO, w) for w in CLIP_WEIGHTS) if p is not None), None)


def weights_missing(metric: str) -> tuple[str, str] | None:
    """(what is missing, the command that fixes it) for a metric whose weights are not on this
    machine, else None: the registry's ``check`` of lpips, clip and image_reward."""
    if metric in ("psnr", "ssim"):
        return None
    fetch = f"{FETCH} {FETCH_NAME[metric]}"
    if metric == "lpips":
        layers = _lpips_layers()
        if layers is None or not layers.is_file():
            return f"torchmetrics' LPIPS layers {layers} are missing", "pip install --force-reinstall torchmetrics"
        if not alexnet_checkpoint().is_file():
            return f"torchvision's AlexNet weights {alexnet_checkpoint()} are missing", fetch
        return None
    if metric == "clip":
        missing = hub_missing(CLIP_REPO, CLIP_FILES) + ([] if _clip_weights() else [CLIP_WEIGHTS[0]])
        if missing:
            return f"{CLIP_REPO} is not in the Hugging Face cache {hub_cache()} ({', '.join(missing)} missing)", fetch
        return None
    if metric == "image_reward":
        if importlib.util.find_spec(IMAGE_REWARD_MODULE) is None:
            return "the image-reward package is not installed", IMAGE_REWARD_INSTALL
        for repo, files in ((IMAGE_REWARD_REPO, IMAGE_REWARD_FILES), (BLIP_TOKENIZER_REPO, BLIP_TOKENIZER_FILES)):
            missing = hub_missing(repo, files)
            if missing:
                return f"{repo} is not in the Hugging Face cache {hub_cache()} ({', '.join(missing)} missing)", fetch
        try:  # last: importing the package takes seconds, and is pointless without its weights
            image_reward.import_package(IMAGE_REWARD_MODULE)
        except Exception as err:  # any import failure makes the metric unavailable
            return f"the image-reward package does not import ({reason(err)})", IMAGE_REWARD_INSTALL
        return None
    raise ValueError(f"unknown text-to-image metric {metric!r}")


def check_metrics(names: Sequence[str], missing: str, assets: Path, kind: str = T2I) -> dict[str, str]:
    """Validate ``eval.t2i_metrics`` and find, before any sampling, the metrics that cannot be
    scored on this machine: weights (or the image-reward package) not available offline.

    ``missing`` is ``eval.missing_metrics``: "error" raises a one-line ConfigError naming the
    metric, what is missing and the command that fetches it; "skip" returns {metric: reason} for the
    caller to pass to ``score_t2i`` (which leaves those columns empty and returns the reasons as
    note lines). File checks only, no model is loaded (image_reward tries to import its package,
    since an installed package that cannot import is as unusable as a missing one). ``assets`` is
    the run's assets folder: none of these weights live there (each sits where its own library's
    loader looks, see the module docstring); it is taken so that every checker is called alike.
    The names and checks are the registry's (eval.registry), so a registered metric is checked too;
    ``kind``: the rows' kind, T2I or (a text-to-video family's) T2V."""
    del assets
    return registry.check_metrics(names, missing, kind, KEY)


# ---------------------------------------------------------------------------------------------------
# The metrics


@contextlib.contextmanager
def _exact_fp32(device: torch.device) -> Iterator[None]:
    """fp32 matmuls and convolutions (TF32 off, no autocast) for metric networks, restored after."""
    import torch

    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        with torch.no_grad(), torch.autocast(device.type, enabled=False):
            yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def clip_pixel_values(image: np.ndarray) -> torch.Tensor:
    """CLIP's (3, 224, 224) float32 input for one uint8 (H, W, 3) image, as the papers' pipeline
    makes it (ToTensor floats through the transformers 4.x PIL CLIPImageProcessor): shortest edge
    to 224 with PIL bicubic, centre crop 224, 1/255 applied twice (each in float64, stored as
    float32, as transformers' ``rescale`` does), then (x - mean) / std in float32. See the module
    docstring for why the second 1/255 is kept: it is what the papers' numbers measure."""
    import numpy as np
    import torch
    from PIL import Image

    h, w = image.shape[:2]
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(CLIP_SIZE * long / short)
    height, width = (new_long, CLIP_SIZE) if w <= h else (CLIP_SIZE, new_long)
    resized = np.asarray(Image.fromarray(image).resize((width, height), resample=Image.BICUBIC))
    top, left = (height - CLIP_SIZE) // 2, (width - CLIP_SIZE) // 2
    x = resized[top:top + CLIP_SIZE, left:left + CLIP_SIZE]
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)  # PIL round trip back to [0, 1]
    x = (x.astype(np.float64) * (1 / 255)).astype(np.float32)  # the processor's own rescale: again
    x = (x - np.asarray(CLIP_MEAN, np.float32)) / np.asarray(CLIP_STD, np.float32)
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))


def _features(out: Any) -> torch.Tensor:
    """get_*_features' projected embedding: a tensor before transformers 5, a ModelOutput since."""
    return out if hasattr(out, "norm") else out.pooler_output


def clip_score(images: np.ndarray, prompts: Sequence[str], model: Any, tokenizer: Any,
               device: torch.device) -> float:
    """The papers' CLIP score of uint8 (N, H, W, 3) ``images`` against ``prompts`` with a loaded
    transformers CLIPModel and its tokenizer: mean over images of 100 * cos(image, prompt)
    embeddings, clamped at 0 (see the module docstring for the scale). One image and one prompt
    at a time, as the papers' script updates torchmetrics; the model runs in fp32 on ``device``."""
    import torch

    if len(images) != len(prompts) or len(images) == 0:
        raise ValueError(f"CLIP score needs one prompt per image, got {len(images)} images and {len(prompts)} prompts")
    model = model.to(device=device, dtype=torch.float32).eval()
    max_len = model.config.text_config.max_position_embeddings
    total = 0.0
    with _exact_fp32(device):
        for image, prompt in bar(iterable=zip(images, prompts, strict=True), total=len(images), unit="img",
                                 desc="CLIP score", secondary=True):
            pixels = clip_pixel_values(image)[None].to(device)
            img = _features(model.get_image_features(pixel_values=pixels))
            tokens = tokenizer(prompt, padding=True, return_tensors="pt")
            txt = _features(model.get_text_features(input_ids=tokens["input_ids"][:, :max_len].to(device),
                                                    attention_mask=tokens["attention_mask"][:, :max_len].to(device)))
            img, txt = img / img.norm(p=2, dim=-1, keepdim=True), txt / txt.norm(p=2, dim=-1, keepdim=True)
            total += float(100 * (img * txt).sum())
    return max(total / len(images), 0.0)


def load_clip(device: torch.device) -> tuple[Any, Any]:
    """CLIPModel and tokenizer from the cached openai/clip-vit-large-patch14 snapshot (a local
    folder, so nothing is downloaded); a RunError if it vanished since check_metrics."""
    import torch
    from transformers import CLIPModel, CLIPTokenizer

    problem = weights_missing("clip")
    if problem is not None:
        raise RunError(f"cannot score clip: {problem[0]}; fetch it with `{problem[1]}`")
    folder = hub_file(CLIP_REPO, "config.json").parent  # type: ignore[union-attr]
    model = CLIPModel.from_pretrained(folder, local_files_only=True, dtype=torch.float32)
    return model.to(device).eval(), CLIPTokenizer.from_pretrained(folder, local_files_only=True)


def lpips_score(images: np.ndarray, reference: np.ndarray, device: torch.device) -> float:
    """Mean LPIPS (AlexNet, torchmetrics) of uint8 NHWC ``images`` against their pairs, both passed
    as [0, 1] floats (normalize=True). Refuses (RunError) rather than let torchvision download
    AlexNet when it is not in torch hub's checkpoint folder."""
    import torch
    from torchmetrics.image import LearnedPerceptualImagePatchSimilarity

    if images.shape != reference.shape:
        raise ValueError(f"paired images differ in shape: {images.shape} vs {reference.shape}")
    problem = weights_missing("lpips")
    if problem is not None:
        raise RunError(f"cannot score lpips: {problem[0]}; fetch it with `{problem[1]}`")
    metric = LearnedPerceptualImagePatchSimilarity(net_type="alex", reduction="mean", normalize=True).to(device)
    with _exact_fp32(device):
        for s in bar(iterable=range(0, len(images), _CHUNK), unit="chunk", desc="LPIPS", secondary=True):
            x = torch.from_numpy(images[s:s + _CHUNK]).to(device).permute(0, 3, 1, 2).float() / 255
            y = torch.from_numpy(reference[s:s + _CHUNK]).to(device).permute(0, 3, 1, 2).float() / 255
            metric.update(x, y)
        return float(metric.compute())


def image_reward_score(images: np.ndarray, prompts: Sequence[str], device: torch.device) -> float:
    """Mean ImageReward of each image with its prompt: the package's model loaded from the cached
    THUDM/ImageReward files (local paths, so the package downloads nothing; ``eval.image_reward.load``),
    ``score(prompt, PIL image)`` per image in fp32."""
    from PIL import Image

    problem = weights_missing("image_reward")
    if problem is not None:
        raise RunError(f"cannot score image_reward: {problem[0]}; fix: `{problem[1]}`")
    ckpt, med_config = (hub_file(IMAGE_REWARD_REPO, f) for f in IMAGE_REWARD_FILES)
    model = image_reward.load(ckpt, med_config, device, IMAGE_REWARD_MODULE)  # type: ignore[arg-type]
    with _exact_fp32(device), image_reward.quiet():
        scores = [float(model.score(p, Image.fromarray(img)))
                  for img, p in bar(iterable=zip(images, prompts, strict=True), total=len(images), unit="img",
                                    desc="ImageReward", secondary=True)]
    return sum(scores) / len(scores)


def psnr_ssim_on(images: np.ndarray, reference: np.ndarray, device: torch.device) -> tuple[float, float]:
    """``eval.metrics.psnr_ssim`` (the DiT rows' PSNR and SSIM) on ``device``, one image at a time
    on a CPU (SSIM of one 1024x1024 image: 22 s and 6 GB there), eight on a GPU."""
    from eval.metrics import psnr_ssim

    return psnr_ssim(images, reference, device, chunk=1 if device.type == "cpu" else 8)


def score_t2i(images: np.ndarray, prompts: Sequence[str], reference: np.ndarray | None, names: Sequence[str],
              skipped: Mapping[str, str], device: torch.device,
              assets: Path) -> tuple[dict[str, float | None], list[str]]:
    """Score a text-to-image sample set: {column: value} for every metric in ``names`` and the note
    lines for the row. ``images``: uint8 (N, H, W, 3), or videos (N, F, H, W, 3): a text-to-video row
    (eval.registry.T2V: PSNR, SSIM and LPIPS per frame against the same frame of the full-compute
    video, VBench per video); ``prompts[i]``: sample i's prompt;
    ``reference``: the full-compute images of the same noise (same shape) or None; ``skipped``:
    ``check_metrics``' answer. A skipped metric, and a paired one (psnr, ssim, lpips) without a
    reference, is None with its reason in the notes; nothing is guessed. ``assets`` as in
    ``check_metrics``."""
    import numpy as np

    del assets
    kind = T2V if getattr(images, "ndim", 0) == 5 else T2I
    chosen = registry.check_names(names, kind, KEY)
    if not isinstance(images, np.ndarray) or images.dtype != np.uint8 or images.ndim not in (4, 5) or \
            images.shape[-1] != 3:
        raise ValueError(f"text-to-image metrics need uint8 (N, H, W, 3) images or (N, F, H, W, 3) videos, got "
                         f"{getattr(images, 'dtype', type(images).__name__)} {getattr(images, 'shape', '')}")
    if len(images) == 0 or len(prompts) != len(images):
        raise ValueError(f"text-to-image metrics need one prompt per image, got {len(images)} images "
                         f"and {len(prompts)} prompts")
    if reference is not None and (reference.shape != images.shape or reference.dtype != np.uint8):
        raise ValueError(f"the full-compute images ({reference.dtype} {reference.shape}) do not pair with "
                         f"the samples ({images.dtype} {images.shape})")
    inputs = MetricInputs(kind, images, device=device, prompts=prompts, pair=reference)
    return registry.compute(chosen, inputs, skipped)
