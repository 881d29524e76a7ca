"""eval/image_reward.py: ImageReward through the image-reward package's own code under transformers 5.

A small random ImageReward (the package's classes, one text layer, one 32-wide ViT block: see
scripts/image_reward_reference.py) is put into a throwaway Hugging Face cache; its scores are held to
the ones the unmodified package computed under transformers 4.43.4 on the same weights and images
(tests/data/image_reward_reference.json). Needs the ``imagereward`` extra (part of ``test``)."""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import huggingface_hub.constants
import numpy as np
import pytest
import torch

from eval import image_reward, t2i
from rfc.run.runner import run
from rfc.utils.errors import RunError
from scripts.image_reward_reference import (
    PROMPTS,
    REFERENCE,
    images,
    scores,
    small_vit,
    token_ids,
    write_assets,
)

CPU = torch.device("cpu")
SCORE_ATOL = 1e-6  # the same torch ops on the same weights: equal up to float32 summation order

if image_reward.installed_version() is None:
    pytest.skip('image-reward is not installed: pip install -e ".[test]" installs it', allow_module_level=True)


@pytest.fixture(scope="module")
def package():
    return image_reward.import_package()


@pytest.fixture
def small(tmp_path: Path, monkeypatch, package):
    """The small ImageReward in an otherwise empty Hugging Face cache: (checkpoint, med_config, digest)."""
    cache = tmp_path / "hf"
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    with small_vit(package):
        yield write_assets(cache, package)


def test_scores_are_the_unmodified_package_under_transformers_4(small):
    reference = json.loads(REFERENCE.read_text())
    checkpoint, med_config, digest = small
    assert digest == reference["weights_sha256"] and reference["versions"]["transformers"].startswith("4.")
    model = image_reward.load(checkpoint, med_config, CPU)
    assert token_ids(model) == reference["input_ids"]  # transformers 5's BertTokenizer, 4's slow one: same ids
    got = scores(model, images(), PROMPTS)
    assert got == pytest.approx(reference["scores"], rel=0, abs=SCORE_ATOL)
    assert len(set(np.round(got, 3))) == len(got)  # a model that scores, not a constant
    # the harness's own path (cache lookup, fp32, mean over images) gives their mean
    assert t2i.check_metrics(["image_reward"], "error", checkpoint.parent) == {}
    values, notes = t2i.score_t2i(images(), list(PROMPTS), None, ["image_reward"], {}, CPU, checkpoint.parent)
    assert notes == [] and values["image_reward"] == pytest.approx(np.mean(reference["scores"]), abs=SCORE_ATOL)


def test_a_checkpoint_that_leaves_parameters_random_is_refused(small):
    checkpoint, med_config, _ = small
    state = torch.load(checkpoint, weights_only=True)
    del state["mlp.layers.0.weight"]  # the package would load the rest with strict=False and say nothing
    torch.save(state, checkpoint)
    expected = (rf"^{checkpoint}: not an ImageReward checkpoint for this model: 1 of its parameters .* "
                r"\(first: mlp\.layers\.0\.weight\).*fetch_assets\.py image-reward")
    with pytest.raises(RunError, match=expected):
        image_reward.load(checkpoint, med_config, CPU)


def test_the_import_adapters_leave_nothing_behind(monkeypatch):
    """Adapters 1, 2 and 6 exist only while the package imports (here: a module that checks them)."""
    import transformers
    import transformers.modeling_utils as modeling_utils

    monkeypatch.setattr(image_reward, "_clip_imports", lambda: False)  # as where clip is not installed
    filters, verbosity = list(warnings.filters), transformers.logging.get_verbosity()
    with image_reward._import_shims():
        from transformers.modeling_utils import apply_chunking_to_forward, find_pruneable_heads_and_indices

        assert apply_chunking_to_forward is transformers.pytorch_utils.apply_chunking_to_forward
        with pytest.raises(NotImplementedError, match="pruning attention heads"):
            find_pruneable_heads_and_indices({0}, 2, 4, set())
        import clip

        with pytest.raises(AttributeError, match="OpenAI's clip package is not installed.*clip.load"):
            clip.load("ViT-L/14")
        warnings.filterwarnings("ignore")  # what the package's blip.py does
        transformers.logging.set_verbosity_error()  # and its blip_pretrain.py
    assert list(warnings.filters) == filters and transformers.logging.get_verbosity() == verbosity
    assert "clip" not in sys.modules and not hasattr(modeling_utils, "find_pruneable_heads_and_indices")
    assert not hasattr(modeling_utils, "apply_chunking_to_forward")


def test_another_release_is_refused(monkeypatch, tmp_path: Path):
    monkeypatch.setattr(image_reward, "installed_version", lambda: "1.6")
    monkeypatch.setattr(t2i, "hub_missing", lambda repo, files: [])
    problem = t2i.weights_missing("image_reward")
    assert problem is not None and "image-reward 1.6 is installed; this harness scores with 1.5" in problem[0]
    assert problem[1] == 'pip install -e ".[imagereward]"'


def test_a_flux_tiny_row_has_its_image_reward(small, make_cfg, tmp_path: Path):
    """python run.py model=flux-tiny with ImageReward's files in the cache: the row's image_reward is the
    package's mean score of the row's images with their prompts."""
    from rfc.models.prompts import load_prompts

    cfg = make_cfg("model=flux-tiny", "method=fora", "eval.num_samples=2", "eval.batch_size=2",
                   "+eval.t2i_metrics=[image_reward]", "eval.missing_metrics=error", "eval.paired=off")
    rec = run(cfg, tmp_path / "row", progress=False)
    assert rec.image_reward is not None and "image_reward" not in rec.notes
    samples = np.load(tmp_path / "row" / "samples.npz")["arr_0"]
    prompts = load_prompts(rec.prompts.split(":")[0]).for_samples(len(samples))
    model = image_reward.load(small[0], small[1], CPU)
    assert rec.image_reward == pytest.approx(np.mean(scores(model, samples, tuple(prompts))), abs=SCORE_ATOL)

