"""eval/t2i.py: text-to-image metrics. No real weights exist here, so every path that needs them runs on
tiny random models placed in a throwaway Hugging Face cache or torch hub folder; the paths without
weights are checked for their messages. The CLIP score is checked against the papers' own pipeline
(torchmetrics' CLIPScore fed ToTensor floats through transformers' PIL CLIP image processor)."""

from __future__ import annotations

import json
import re
import sys
import types
import warnings
from importlib.machinery import ModuleSpec
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch

from eval import t2i
from eval.metrics import psnr_ssim
from rfc.utils.errors import ConfigError, RunError
from scripts.image_reward_reference import cache_repo

CPU = torch.device("cpu")
FLUX_DEV = "black-forest-labs/FLUX.1-dev"


@pytest.fixture
def hf_cache(tmp_path: Path, monkeypatch) -> Path:
    """An empty Hugging Face cache, the only one these tests see."""
    cache = tmp_path / "hf"
    cache.mkdir()
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture
def hub_dir(tmp_path: Path, monkeypatch) -> Path:
    """An empty torch hub folder (torch.hub.get_dir()), the only one these tests see."""
    folder = tmp_path / "torch-hub"
    monkeypatch.setattr(torch.hub, "_hub_dir", str(folder))
    return folder


FAKE_MODULE = "image_reward_stand_in_for_tests"


@pytest.fixture(autouse=True)
def no_image_reward(monkeypatch):
    """The image-reward package as absent, whatever this machine has installed: eval.t2i looks for a module
    name nothing installs, which the ImageReward tests then fill with a stand-in."""
    monkeypatch.setattr(t2i, "IMAGE_REWARD_MODULE", FAKE_MODULE)


# ---------------------------------------------------------------------------------------------------
# A tiny random CLIP: every letter is a token (no merges)


def tiny_clip() -> tuple[object, object, dict[str, int]]:
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for suffix in ("", "</w>"):
        for c in "abcdefghijklmnopqrstuvwxyz":
            vocab[c + suffix] = len(vocab)
    tokenizer = CLIPTokenizer(vocab=vocab, merges=[])
    text = dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=77, bos_token_id=0, pad_token_id=1,
                eos_token_id=2)  # 2: the legacy value openai/clip-vit-large-patch14 has (pools at argmax id)
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=224, patch_size=32)
    torch.manual_seed(0)
    model = CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=8)).eval()
    return model, tokenizer, vocab


def cache_clip(cache: Path) -> tuple[object, object]:
    """The tiny CLIP saved as openai/clip-vit-large-patch14 in ``cache``, with the repo's tokenizer files."""
    model, tokenizer, vocab = tiny_clip()
    snap = cache_repo(cache, t2i.CLIP_REPO, {"vocab.json": json.dumps(vocab), "merges.txt": "#version: 0.2\n"})
    model.save_pretrained(snap)
    tokenizer.save_pretrained(snap)
    return model, tokenizer


def images(n: int, h: int = 64, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, h, w, 3), dtype=np.uint8)


PROMPTS = ["a red cube on a blue sphere", "two cats", "a b c " * 40, "an astronaut riding a horse"]  # 3rd: > 77 tokens


# ---------------------------------------------------------------------------------------------------
# check_metrics


def test_names_and_missing_are_validated(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"eval\.t2i_metrics: unknown metric 'fid'.*psnr, ssim, lpips, image_reward, "
                                          r"clip"):
        t2i.check_metrics(["psnr", "fid"], "error", tmp_path)
    with pytest.raises(ConfigError, match=r"eval\.t2i_metrics must be a list"):
        t2i.check_metrics("clip", "error", tmp_path)
    with pytest.raises(ConfigError, match="twice"):
        t2i.check_metrics(["psnr", "psnr"], "error", tmp_path)
    with pytest.raises(ConfigError, match=r"eval\.missing_metrics must be one of error, skip, got 'ignore'"):
        t2i.check_metrics(["psnr"], "ignore", tmp_path)
    assert t2i.check_metrics(["psnr", "ssim"], "error", tmp_path) == {}  # no weights needed
    assert set(t2i.COLUMN) == set(t2i.T2I_METRICS)


def test_columns_are_result_row_fields():
    from rfc.run.row import RunRecord

    assert set(t2i.COLUMN.values()) <= set(RunRecord.columns())


@pytest.mark.parametrize(("metric", "needle"), [
    ("clip", "openai/clip-vit-large-patch14 is not in the Hugging Face cache .*`python scripts/fetch_assets.py "
             "clip-vit-large-patch14`"),
    ("lpips", "AlexNet weights .*alexnet-owt-7be5be79.pth are missing.*`python scripts/fetch_assets.py lpips`"),
    ("image_reward", r"the image-reward package is not installed.*`pip install -e \"\.\[imagereward\]\"`"),
])
def test_missing_weights_error_in_one_line(hf_cache, hub_dir, tmp_path: Path, metric: str, needle: str):
    with pytest.raises(ConfigError) as info:
        t2i.check_metrics(["psnr", metric], "error", tmp_path)
    msg = str(info.value)
    assert "\n" not in msg and msg.startswith(f"eval.t2i_metrics: cannot score {metric}:")
    assert re.search(needle, msg), msg
    assert "eval.missing_metrics=skip" in msg


def test_missing_weights_skip_returns_reasons(hf_cache, hub_dir, tmp_path: Path):
    skipped = t2i.check_metrics(list(t2i.T2I_METRICS), "skip", tmp_path)
    assert set(skipped) == {"lpips", "image_reward", "clip"}
    assert all(r.startswith(f"{m} not scored: ") and "\n" not in r for m, r in skipped.items())
    assert "fetch_assets.py clip-vit-large-patch14" in skipped["clip"]


def test_check_is_a_file_check(hf_cache, hub_dir, tmp_path: Path):
    import time

    cache_clip(hf_cache)
    start = time.perf_counter()
    assert t2i.check_metrics(["psnr", "ssim", "clip"], "error", tmp_path) == {}
    assert t2i.check_metrics(list(t2i.T2I_METRICS), "skip", tmp_path).keys() == {"lpips", "image_reward"}
    assert time.perf_counter() - start < 1.0


def test_clip_weights_half_fetched_are_missing(hf_cache, tmp_path: Path):
    cache_repo(hf_cache, t2i.CLIP_REPO, {"config.json": "{}", "vocab.json": "{}", "merges.txt": ""})
    skipped = t2i.check_metrics(["clip"], "skip", tmp_path)
    assert "model.safetensors missing" in skipped["clip"]


# ---------------------------------------------------------------------------------------------------
# CLIP score: the papers' protocol


def test_clip_pixels_are_the_papers_processor_bit_for_bit():
    """The PIL CLIP image processor (transformers 4.x's default, kept in 5 as CLIPImageProcessorPil) on
    ToTensor floats, as torchmetrics passes them, is what clip_pixel_values computes."""
    from torchvision.transforms import ToTensor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    processor = CLIPImageProcessorPil()  # CLIP's defaults: shortest edge 224, bicubic, crop 224, 1/255, mean/std
    for shape in [(64, 96), (1024, 1024), (300, 250), (224, 224)]:
        img = images(1, *shape, seed=sum(shape))[0]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = processor(images=[ToTensor()(img)], return_tensors="pt")["pixel_values"][0]
        assert torch.equal(t2i.clip_pixel_values(img), expected), shape


def test_clip_pixels_are_rescaled_twice():
    """The finding: CLIP sees a nearly black image, each channel confined to a band 1/255/std wide."""
    mean, std = torch.tensor(t2i.CLIP_MEAN)[:, None, None], torch.tensor(t2i.CLIP_STD)[:, None, None]
    black = t2i.clip_pixel_values(np.zeros((224, 224, 3), np.uint8))
    white = t2i.clip_pixel_values(np.full((224, 224, 3), 255, np.uint8))
    torch.testing.assert_close(black, (-mean / std).expand(3, 224, 224))
    torch.testing.assert_close(white - black, (1 / 255 / std).expand(3, 224, 224))
    assert float(white[0, 0, 0] - black[0, 0, 0]) == pytest.approx(0.0146, abs=1e-4)  # red: 1/255/0.2686


class TensorFeatures(torch.nn.Module):
    """transformers 4.x's get_*_features contract (a tensor), which torchmetrics 1.9 relies on."""

    def __init__(self, model):
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, pixel_values):
        return self.model.get_image_features(pixel_values=pixel_values).pooler_output

    def get_text_features(self, input_ids, attention_mask):
        return self.model.get_text_features(input_ids=input_ids, attention_mask=attention_mask).pooler_output


def test_clip_score_is_the_papers_torchmetrics_score():
    """ToCa's clip_score.py: CLIPScore, ToTensor() images, one update per image, compute() at the end."""
    from torchmetrics.multimodal.clip_score import CLIPScore
    from torchvision.transforms import ToTensor
    from transformers import CLIPProcessor
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    model, tokenizer, _ = tiny_clip()
    imgs = images(len(PROMPTS), 80, 72)
    processor = CLIPProcessor(image_processor=CLIPImageProcessorPil(), tokenizer=tokenizer)
    metric = CLIPScore(model_name_or_path=lambda: (TensorFeatures(model), processor))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the long prompt's truncation warning
        for img, prompt in zip(imgs, PROMPTS, strict=True):
            metric.update(ToTensor()(img).unsqueeze(0).float(), prompt)
        expected = float(metric.compute())
    ours = t2i.clip_score(imgs, PROMPTS, model, tokenizer, CPU)
    assert ours == pytest.approx(expected, abs=1e-4)


class FixedCosines(torch.nn.Module):
    """A stand-in CLIP whose image i has cosine cosines[i] with every prompt."""

    def __init__(self, cosines):
        super().__init__()
        self.config = types.SimpleNamespace(text_config=types.SimpleNamespace(max_position_embeddings=77))
        self.images = iter(torch.tensor([[c, (1 - c * c) ** 0.5]]) for c in cosines)

    def get_image_features(self, pixel_values):
        return next(self.images)

    def get_text_features(self, input_ids, attention_mask):
        return torch.tensor([[2.0, 0.0]])


def test_clip_score_clamps_the_mean_not_each_image():
    """torchmetrics sums 100 * cos per image and clamps only the mean at 0."""
    _, tokenizer, _ = tiny_clip()
    assert t2i.clip_score(images(2), ["a", "b"], FixedCosines([0.9, -0.5]), tokenizer, CPU) == pytest.approx(20)
    assert t2i.clip_score(images(2), ["a", "b"], FixedCosines([0.5, -0.9]), tokenizer, CPU) == 0.0
    with pytest.raises(ValueError, match="one prompt per image"):
        t2i.clip_score(images(2), ["a"], FixedCosines([0.5]), tokenizer, CPU)


def test_score_t2i_loads_clip_from_the_cache(hf_cache, tmp_path: Path):
    model, tokenizer = cache_clip(hf_cache)
    imgs = images(3)
    skipped = t2i.check_metrics(["clip"], "error", tmp_path)
    values, notes = t2i.score_t2i(imgs, PROMPTS[:3], None, ["clip"], skipped, CPU, tmp_path)
    assert notes == [] and set(values) == {"clip_score"}
    assert values["clip_score"] == pytest.approx(t2i.clip_score(imgs, PROMPTS[:3], model, tokenizer, CPU), abs=1e-5)


def test_clip_without_weights_never_scores(hf_cache, tmp_path: Path):
    with pytest.raises(RunError, match="fetch_assets.py clip-vit-large-patch14"):
        t2i.score_t2i(images(2), PROMPTS[:2], None, ["clip"], {}, CPU, tmp_path)


# ---------------------------------------------------------------------------------------------------
# PSNR / SSIM / LPIPS


def test_alexnet_file_is_what_torchvision_loads():
    import torchvision

    assert torchvision.models.AlexNet_Weights.DEFAULT.url == t2i.ALEXNET_URL


def test_paired_metrics(hub_dir, tmp_path: Path):
    import torchvision
    from torchmetrics.image import LearnedPerceptualImagePatchSimilarity

    (hub_dir / "checkpoints").mkdir(parents=True)
    torch.manual_seed(0)
    state = torchvision.models.alexnet(weights=None).state_dict()
    # LPIPS uses only the convolutions; the classifier (58M numbers) is stored as one broadcast zero
    state.update({k: torch.zeros(1).expand(v.shape) for k, v in state.items() if k.startswith("classifier")})
    torch.save(state, hub_dir / "checkpoints" / t2i.ALEXNET_FILE)
    imgs, ref = images(6), images(6, seed=1)
    ref[2] = imgs[2]  # one identical pair
    values, notes = t2i.score_t2i(imgs, ["p"] * 6, ref, ["psnr", "ssim", "lpips"], {}, CPU, tmp_path)
    assert notes == []
    psnr, ssim = psnr_ssim(imgs, ref)  # the DiT rows' definition, on the whole set at once
    assert values["psnr"] == psnr == float("inf") and values["ssim"] == pytest.approx(ssim, rel=1e-12)
    lpips = LearnedPerceptualImagePatchSimilarity(net_type="alex", normalize=True)
    as_float = [torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 for x in (imgs, ref)]
    per_image = [float(lpips(a[None], b[None])) for a, b in zip(*as_float, strict=True)]
    assert per_image[2] == pytest.approx(0, abs=1e-6)
    assert values["lpips"] == pytest.approx(np.mean(per_image), rel=1e-5)


@pytest.mark.parametrize("shape", [(5, 64, 64), (3, 40, 56), (2, 8, 8)])
def test_psnr_ssim_are_the_dit_rows(shape):
    imgs, ref = images(*shape), images(*shape, seed=1)
    ref[1] = imgs[1]
    for pair in ((imgs, ref), (imgs[:1], ref[:1])):  # with and without an identical pair (infinite PSNR)
        psnr, ssim = t2i.psnr_ssim_on(*pair, CPU)
        expected = psnr_ssim(*pair)
        assert psnr == pytest.approx(expected[0], rel=1e-12) and ssim == pytest.approx(expected[1], rel=1e-12)


def test_lpips_never_downloads(hub_dir, tmp_path: Path):
    with pytest.raises(RunError, match="alexnet-owt-7be5be79.pth are missing.*fetch_assets.py lpips"):
        t2i.lpips_score(images(1), images(1), CPU)
    assert not (hub_dir / "checkpoints" / t2i.ALEXNET_FILE).exists()


def test_unpaired_and_skipped_metrics_are_empty_with_notes(tmp_path: Path):
    skipped = {"clip": "clip not scored: openai/clip-vit-large-patch14 is not in the Hugging Face cache"}
    values, notes = t2i.score_t2i(images(2), ["a", "b"], None, ["psnr", "ssim", "clip"], skipped, CPU, tmp_path)
    assert values == {"psnr": None, "ssim": None, "clip_score": None}
    assert notes == [skipped["clip"], "psnr, ssim not scored: no full-compute images of the same noise to compare with"]


def test_inputs_are_checked(tmp_path: Path):
    with pytest.raises(ValueError, match="uint8"):
        t2i.score_t2i(images(2).astype(np.float32), ["a", "b"], None, ["psnr"], {}, CPU, tmp_path)
    with pytest.raises(ValueError, match="one prompt per image"):
        t2i.score_t2i(images(2), ["a"], None, ["psnr"], {}, CPU, tmp_path)
    with pytest.raises(ValueError, match="do not pair"):
        t2i.score_t2i(images(2), ["a", "b"], images(2, 32, 32), ["psnr"], {}, CPU, tmp_path)
    with pytest.raises(ConfigError, match="unknown metric"):
        t2i.score_t2i(images(2), ["a", "b"], None, ["fid"], {}, CPU, tmp_path)


# ---------------------------------------------------------------------------------------------------
# ImageReward


def fake_image_reward(monkeypatch) -> list:
    """An importable stand-in for the image-reward package: load() records its arguments, score() is
    the image's mean pixel plus the prompt's length."""
    calls: list = []

    class Model:
        def score(self, prompt, image):
            return float(np.asarray(image).mean()) + len(prompt)

    def load(name, device, med_config):
        calls.append((name, device, med_config))
        return Model()

    module = types.ModuleType(FAKE_MODULE)
    module.__spec__ = ModuleSpec(FAKE_MODULE, None)
    module.load = load
    monkeypatch.setitem(sys.modules, FAKE_MODULE, module)
    return calls


def test_image_reward_from_cached_files(hf_cache, monkeypatch, tmp_path: Path):
    calls = fake_image_reward(monkeypatch)
    skipped = t2i.check_metrics(["image_reward"], "skip", tmp_path)
    assert "THUDM/ImageReward is not in the Hugging Face cache" in skipped["image_reward"]
    assert "fetch_assets.py image-reward" in skipped["image_reward"]
    snap = cache_repo(hf_cache, t2i.IMAGE_REWARD_REPO, {"ImageReward.pt": b"x", "med_config.json": "{}"})
    assert "bert-base-uncased" in t2i.check_metrics(["image_reward"], "skip", tmp_path)["image_reward"]
    cache_repo(hf_cache, t2i.BLIP_TOKENIZER_REPO, {"vocab.txt": "[PAD]\n", "tokenizer_config.json": "{}"})
    assert t2i.check_metrics(["image_reward"], "error", tmp_path) == {}
    imgs = images(3)
    values, notes = t2i.score_t2i(imgs, ["ab", "c", ""], None, ["image_reward"], {}, CPU, tmp_path)
    assert notes == [] and calls == [(str(snap / "ImageReward.pt"), CPU, str(snap / "med_config.json"))]
    assert values["image_reward"] == pytest.approx(np.mean([imgs[0].mean() + 2, imgs[1].mean() + 1, imgs[2].mean()]))


def test_image_reward_that_does_not_import(hf_cache, monkeypatch, tmp_path: Path):
    cache_repo(hf_cache, t2i.IMAGE_REWARD_REPO, {"ImageReward.pt": b"x", "med_config.json": "{}"})
    cache_repo(hf_cache, t2i.BLIP_TOKENIZER_REPO, {"vocab.txt": "[PAD]\n", "tokenizer_config.json": "{}"})
    module = types.ModuleType(FAKE_MODULE)
    module.__spec__ = ModuleSpec(FAKE_MODULE, None)
    monkeypatch.setitem(sys.modules, FAKE_MODULE, module)
    real_import = t2i.importlib.import_module

    def broken(name, *args):
        if name == FAKE_MODULE:
            raise ImportError("cannot import name 'apply_chunking_to_forward' from 'transformers.modeling_utils'")
        return real_import(name, *args)

    monkeypatch.setattr(t2i.importlib, "import_module", broken)
    with pytest.raises(ConfigError, match=r"image-reward package does not import \(ImportError: cannot import name "
                                          r"'apply_chunking_to_forward'.*pip install -e \"\.\[imagereward\]\""):
        t2i.check_metrics(["image_reward"], "error", tmp_path)


# ---------------------------------------------------------------------------------------------------
# FLUX weights


def flux_files() -> dict[str, str]:
    files = {f: "{}" for f in t2i.FLUX_FILES}
    files["tokenizer_2/spiece.model"] = "x"
    for component, stem in t2i.FLUX_WEIGHTS.items():
        files[f"{component}/config.json"] = "{}"
        if component in ("transformer", "text_encoder_2"):  # sharded, as in the FLUX repositories
            shards = [f"{stem}-0000{i}-of-00002.safetensors" for i in (1, 2)]
            files[f"{component}/{stem}.safetensors.index.json"] = json.dumps(
                {"weight_map": {"a": shards[0], "b": shards[1], "c": shards[1]}})
            files.update({f"{component}/{s}": "w" for s in shards})
        else:
            files[f"{component}/{stem}.safetensors"] = "w"
    return files


def test_flux_weights_missing(hf_cache):
    msg = t2i.flux_weights_missing(FLUX_DEV)
    assert msg is not None and "\n" not in msg
    assert "black-forest-labs/FLUX.1-dev is not complete" in msg and "`python scripts/fetch_assets.py flux-dev`" in msg
    assert "fetch_assets.py flux-schnell" in t2i.flux_weights_missing("black-forest-labs/FLUX.1-schnell")
    files = flux_files()
    snap = cache_repo(hf_cache, FLUX_DEV, files)
    assert t2i.flux_weights_missing(FLUX_DEV) is None
    (snap / "transformer" / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()  # an interrupted download
    msg = t2i.flux_weights_missing(FLUX_DEV)
    assert "transformer/diffusion_pytorch_model-00002-of-00002.safetensors missing" in msg
    (snap / "vae" / "config.json").unlink()
    assert "and 1 more" in t2i.flux_weights_missing(FLUX_DEV)
