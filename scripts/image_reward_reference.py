"""The ImageReward reference that tests/test_image_reward.py holds this harness to.

image-reward 1.5 runs here under transformers 5 through the adapters of ``eval/image_reward.py``. To
show that they leave the metric as the package computes it, this script builds a small random
ImageReward (the package's own classes with its text encoder cut to one layer and its ViT-L to one
32-wide block, deterministic weights drawn with numpy), scores a few fixed images with the
unmodified package in an environment where it imports as released, and writes the scores, the
tokenizer's ids and the weights' digest to ``tests/data/image_reward_reference.json``. The test builds
the same model from the same functions and compares.

The environment the committed reference came from (a virtual environment beside this project's, same
torch 2.14.1 and torchvision 0.29.1)::

    pip install "transformers==4.43.4" "diffusers==0.30.3" image-reward==1.5 openai-clip "setuptools<81"
    python scripts/image_reward_reference.py

(transformers 4.43 is what the papers' environments pin; 4.57 already lacks a name the package
imports; diffusers 0.30 is one that imports beside it, for the package's ReFL module; openai-clip 1.0.1
needs setuptools' pkg_resources.) The script imports the package plainly, never through this harness's
adapters, so it stops where the package does not import as released. Only torch, numpy, PIL and the
package are imported, so it runs wherever the package does.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import importlib
import importlib.metadata
import io
import json
import os
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
REFERENCE = ROOT / "tests" / "data" / "image_reward_reference.json"
IMAGE_REWARD_REPO = "THUDM/ImageReward"
TOKENIZER_REPO = "bert-base-uncased"  # BLIP's init_tokenizer loads it by name

# A word-piece vocabulary small enough to keep the text encoder tiny: the specials, whole words the
# prompts use, and every letter alone and as a continuation, so that any lowercase word tokenises.
LETTERS = "abcdefghijklmnopqrstuvwxyz"
WORDS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "red", "cube", "on", "blue", "sphere", "two", "cats", "the",
         "an", "astronaut", "riding", "horse", ",", ".", "!", *LETTERS, *(f"##{c}" for c in LETTERS))
PROMPTS = ("a red cube on a blue sphere", "Two CATS, on the mat!", "an astronaut riding a horse in a café",
           "the quick brown fox jumps over the lazy dog near the river bank at dawn while birds sing")  # > 35 tokens
IMAGE_SHAPE = (len(PROMPTS), 48, 80, 3)  # not square: the package's resize and centre crop both act
IMAGE_SEED = 0
WEIGHT_SEED = 0


def cache_repo(cache: Path, repo_id: str, files: dict[str, bytes | str]) -> Path:
    """Lay out ``files`` as the main revision of ``repo_id`` in the Hugging Face cache ``cache``;
    returns the snapshot folder."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    sha = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    snap = repo / "snapshots" / sha
    for name, data in files.items():
        (snap / name).parent.mkdir(parents=True, exist_ok=True)
        (snap / name).write_bytes(data if isinstance(data, bytes) else data.encode())
    return snap


def med_config() -> dict[str, Any]:
    """THUDM/ImageReward's med_config.json cut to one layer: the hidden size stays 768 because the
    package's reward head is MLP(768); the vocabulary is WORDS plus the [DEC] and [ENC] tokens
    ``init_tokenizer`` adds."""
    return {"architectures": ["BertModel"], "attention_probs_dropout_prob": 0.1, "hidden_act": "gelu",
            "hidden_dropout_prob": 0.1, "hidden_size": 768, "initializer_range": 0.02, "intermediate_size": 64,
            "layer_norm_eps": 1e-12, "max_position_embeddings": 40, "model_type": "bert", "num_attention_heads": 12,
            "num_hidden_layers": 1, "pad_token_id": 0, "type_vocab_size": 2, "vocab_size": len(WORDS) + 2,
            "encoder_width": 768, "add_cross_attention": True}


@contextlib.contextmanager
def small_vit(package: Any) -> Iterator[None]:
    """The package's BLIP builds a ViT-L (300 M parameters) whatever the config says: while this is
    active it builds one 32-wide block of the same VisionTransformer class instead."""
    blip_pretrain = package.models.BLIP.blip_pretrain
    vit = package.models.BLIP.vit

    def create_vit(name: str, image_size: int, use_grad_checkpointing: bool = False, ckpt_layer: int = 0,
                   drop_path_rate: float = 0) -> tuple[Any, int]:
        return vit.VisionTransformer(img_size=image_size, patch_size=16, embed_dim=32, depth=1, num_heads=2), 32

    saved = blip_pretrain.create_vit
    blip_pretrain.create_vit = create_vit
    try:
        yield
    finally:
        blip_pretrain.create_vit = saved


def random_state(model: Any) -> dict[str, Any]:
    """Deterministic weights for every floating tensor of ``model``'s state dict, drawn with numpy
    (the same on any machine and torch): layer-norm scales near 1, biases and embeddings small,
    matrices scaled by 1/sqrt(fan-in) so activations stay of order one; integer buffers kept."""
    import torch

    rng = np.random.default_rng(WEIGHT_SEED)
    state = {}
    for name, tensor in sorted(model.state_dict().items()):
        if not tensor.is_floating_point():
            state[name] = tensor.clone()
            continue
        noise = rng.standard_normal(tuple(tensor.shape))
        module = name.rsplit(".", 2)[-2].lower()
        if module.startswith(("norm", "layernorm")) and name.endswith(".weight"):
            values = 1 + 0.1 * noise
        elif tensor.dim() >= 2 and not name.endswith(("pos_embed", "cls_token", "embeddings.weight")):
            values = noise / np.sqrt(int(np.prod(tensor.shape[1:])))
        else:
            values = 0.02 * noise
        state[name] = torch.from_numpy(values.astype(np.float32))
    return state


def state_digest(state: dict[str, Any]) -> str:
    """sha256 over the state dict's names, shapes and float32 bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(state):
        tensor = state[name].detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}\n".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()


def write_assets(cache: Path, package: Any) -> tuple[Path, Path, str]:
    """Put the small ImageReward into the Hugging Face cache ``cache`` as THUDM/ImageReward
    (ImageReward.pt, med_config.json) with its tokenizer as bert-base-uncased; returns the
    checkpoint, the config and the weights' digest. Must run inside ``small_vit(package)``, with
    ``cache`` being the cache transformers reads."""
    import torch

    vocab = "\n".join(WORDS) + "\n"
    tokenizer_config = json.dumps({"do_lower_case": True})
    cache_repo(cache, TOKENIZER_REPO, {"vocab.txt": vocab, "tokenizer_config.json": tokenizer_config})
    snap = cache_repo(cache, IMAGE_REWARD_REPO, {"med_config.json": json.dumps(med_config())})
    model_class = importlib.import_module(f"{package.__name__}.ImageReward").ImageReward  # the package's own name
    model = model_class(med_config=str(snap / "med_config.json"))
    state = random_state(model)
    buffer = io.BytesIO()
    torch.save(state, buffer)
    cache_repo(cache, IMAGE_REWARD_REPO, {"ImageReward.pt": buffer.getvalue()})
    return snap / "ImageReward.pt", snap / "med_config.json", state_digest(state)


def images() -> np.ndarray:
    """The scored images: uint8 noise of IMAGE_SHAPE from IMAGE_SEED."""
    return np.random.default_rng(IMAGE_SEED).integers(0, 256, IMAGE_SHAPE, dtype=np.uint8)


def scores(model: Any, batch: np.ndarray, prompts: tuple[str, ...]) -> list[float]:
    """The package's ``score(prompt, PIL image)`` for each image, in fp32 without gradients."""
    import torch
    from PIL import Image

    with torch.no_grad():
        return [float(model.score(p, Image.fromarray(img))) for img, p in zip(batch, prompts, strict=True)]


def token_ids(model: Any) -> list[list[int]]:
    """The ids the package's tokenizer gives each prompt (padded and cut to 35, as ``score`` asks)."""
    return [model.blip.tokenizer(p, padding="max_length", truncation=True, max_length=35)["input_ids"]
            for p in PROMPTS]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=REFERENCE, help=f"where to write (default {REFERENCE})")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        os.environ["HF_HUB_CACHE"], os.environ["HF_HUB_OFFLINE"] = tmp, "1"  # before transformers reads them
        try:
            import ImageReward as package
        except Exception as err:
            print(f"image_reward_reference: image-reward does not import here unmodified ({type(err).__name__}: "
                  f"{err}); run this where it does (see the module docstring)", file=sys.stderr)
            return 1
        with small_vit(package):
            ckpt, config, digest = write_assets(Path(tmp), package)
            with contextlib.redirect_stdout(io.StringIO()):
                model = package.load(str(ckpt), device="cpu", med_config=str(config))
        reference = {
            "made_by": "scripts/image_reward_reference.py",
            "versions": {name: importlib.metadata.version(name) for name in
                         ("image-reward", "transformers", "torch", "torchvision", "timm", "tokenizers")},
            "weights_sha256": digest,
            "prompts": list(PROMPTS),
            "image_shape": list(IMAGE_SHAPE),
            "image_seed": IMAGE_SEED,
            "input_ids": token_ids(model),
            "scores": scores(model, images(), PROMPTS),
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    lines = [f" {json.dumps(key)}: {json.dumps(value)}" for key, value in reference.items()]
    args.out.write_text("{\n" + ",\n".join(lines) + "\n}\n")
    print(f"wrote {args.out}: scores {[round(s, 6) for s in reference['scores']]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
