"""Offline lookups in the Hugging Face cache (file checks only: they run while a run is planned,
before anything is loaded or sampled, and never touch the network), and the completeness checks of
FLUX.1's and HunyuanVideo's diffusers folders. Here, below eval and the run layer, because a model family checks its
own weights (rfc.models.flux_family) and the metrics check theirs (eval.t2i) with the same lookups.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from rfc.utils.errors import reason

FETCH = "python scripts/fetch_assets.py"

FLUX_FETCH_NAME = {"black-forest-labs/FLUX.1-dev": "flux-dev", "black-forest-labs/FLUX.1-schnell": "flux-schnell"}
# diffusers folder of a FLUX repo: component -> stem of its weights file(s)
FLUX_WEIGHTS = {
    "transformer": "diffusion_pytorch_model",
    "vae": "diffusion_pytorch_model",
    "text_encoder": "model",
    "text_encoder_2": "model",
}
FLUX_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/vocab.json",
    "tokenizer/merges.txt",
    "tokenizer_2/tokenizer_config.json",
)


def hub_file(repo_id: str, filename: str) -> Path | None:
    """The cached file of ``repo_id``'s main revision in the Hugging Face cache, or None. Never
    touches the network: the runner must not download, and an answer is needed in milliseconds."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(repo_id, filename)
    return Path(found) if isinstance(found, str) else None  # None, or a sentinel for "known absent"


def hf_snapshot(repo: str) -> str:
    """The local folder of ``repo`` in the Hugging Face cache (never downloads)."""
    from huggingface_hub import snapshot_download

    return snapshot_download(repo, local_files_only=True)


def hub_missing(repo_id: str, filenames: Sequence[str]) -> list[str]:
    """The files of ``filenames`` not in the Hugging Face cache for ``repo_id``."""
    return [f for f in filenames if hub_file(repo_id, f) is None]


def hub_cache() -> Path:
    """The Hugging Face hub cache folder, for messages (HF_HUB_CACHE, else HF_HOME/hub)."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def flux_weights_missing(repo_id: str) -> str | None:
    """None when the diffusers folder of ``repo_id`` is complete in the Hugging Face cache
    (model_index.json, the scheduler and both tokenizers, and config plus every weights shard of
    the transformer, the VAE and both text encoders), else one line naming what is missing and the
    fetch command. File checks only: the FLUX loader calls it before loading anything, so that an
    interrupted download is named instead of failing minutes into loading (or downloading)."""
    missing = hub_missing(repo_id, FLUX_FILES)
    if all(hub_file(repo_id, f"tokenizer_2/{f}") is None for f in ("spiece.model", "tokenizer.json")):
        missing.append("tokenizer_2/spiece.model")
    return _folder_line(repo_id, missing + weights_missing(repo_id, FLUX_WEIGHTS), FLUX_FETCH_NAME.get(repo_id))


HUNYUAN_FETCH_NAME = {"hunyuanvideo-community/HunyuanVideo": "hunyuan-video"}
HUNYUAN_WEIGHTS = FLUX_WEIGHTS  # the same components (LLaMA as text_encoder, CLIP as text_encoder_2)
HUNYUAN_FILES = (
    "model_index.json",
    "scheduler/scheduler_config.json",
    "tokenizer/tokenizer_config.json",
    "tokenizer/tokenizer.json",
    "tokenizer_2/vocab.json",
    "tokenizer_2/merges.txt",
)


def hunyuan_weights_missing(repo_id: str) -> str | None:
    """HunyuanVideo's diffusers folder, checked as FLUX's is (``flux_weights_missing``): the
    scheduler, the LLaMA and CLIP tokenizers, and config plus every weights shard of the transformer,
    the VAE and both text encoders."""
    missing = hub_missing(repo_id, HUNYUAN_FILES) + weights_missing(repo_id, HUNYUAN_WEIGHTS)
    return _folder_line(repo_id, missing, HUNYUAN_FETCH_NAME.get(repo_id))


def weights_missing(repo_id: str, weights: dict[str, str]) -> list[str]:
    """The files of a diffusers folder's components (component -> stem of its weights) not in the
    cache: each component's config.json and its weights, one file or every shard its index names."""
    missing: list[str] = []
    for component, stem in weights.items():
        missing += hub_missing(repo_id, [f"{component}/config.json"])
        index = hub_file(repo_id, f"{component}/{stem}.safetensors.index.json")
        if index is None:
            missing += hub_missing(repo_id, [f"{component}/{stem}.safetensors"])
            continue
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, AttributeError) as err:
            missing.append(f"{component}/{index.name} (unreadable: {reason(err)})")
            continue
        missing += hub_missing(repo_id, [f"{component}/{s}" for s in shards])
    return missing


def _folder_line(repo_id: str, missing: list[str], fetch_name: str | None) -> str | None:
    """None for nothing missing, else the one line naming the first missing file and the fetch command."""
    if not missing:
        return None
    fix = f"{FETCH} {fetch_name}" if fetch_name else f"hf download {repo_id}"
    more = f" and {len(missing) - 1} more" if len(missing) > 1 else ""
    return (
        f"{repo_id} is not complete in the Hugging Face cache {hub_cache()}: {missing[0]} missing{more}; "
        f"fetch it with `{fix}`"
    )
