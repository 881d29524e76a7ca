"""Checkpoint loading: bare and training formats, strict key check with named keys."""

from __future__ import annotations

import pytest
import torch

from rfc.models.dit import DiT, DiTConfig
from rfc.models.load import CheckpointError, MissingAssetError, build_dit, load_checkpoint

CFG = DiTConfig(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2, num_classes=10)


def _random_state(seed: int) -> dict[str, torch.Tensor]:
    return build_dit(CFG, init="dense", seed=seed).state_dict()


def test_bare_state_dict_loads(tmp_path):
    state = _random_state(1)
    torch.save(state, tmp_path / "bare.pt")
    model = build_dit(CFG, tmp_path / "bare.pt")
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_training_checkpoint_uses_ema(tmp_path):
    ema, raw = _random_state(1), _random_state(2)
    torch.save({"model": raw, "ema": ema, "opt": {"state": {}, "param_groups": []}, "args": {"lr": 1e-4}},
               tmp_path / "train.pt")
    model = build_dit(CFG, tmp_path / "train.pt")
    assert torch.equal(model.blocks[0].attn.qkv.weight, ema["blocks.0.attn.qkv.weight"])
    assert not torch.equal(model.blocks[0].attn.qkv.weight, raw["blocks.0.attn.qkv.weight"])


def test_missing_pos_embed_is_recomputed(tmp_path):
    state = _random_state(1)
    del state["pos_embed"]
    torch.save(state, tmp_path / "nopos.pt")
    model = build_dit(CFG, tmp_path / "nopos.pt")
    assert torch.equal(model.pos_embed, DiT(CFG).pos_embed)


def test_mismatches_name_the_keys(tmp_path):
    state = _random_state(1)
    del state["blocks.1.mlp.fc2.bias"]
    state["blocks.7.attn.qkv.weight"] = torch.zeros(3)
    state["final_layer.linear.weight"] = torch.zeros(5, 32)
    torch.save(state, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError) as err:
        load_checkpoint(DiT(CFG), tmp_path / "bad.pt")
    msg = str(err.value)
    assert "missing keys (1): blocks.1.mlp.fc2.bias" in msg
    assert "unexpected keys (1): blocks.7.attn.qkv.weight" in msg
    assert "final_layer.linear.weight: checkpoint (5, 32) vs model (8, 32)" in msg


def test_pickled_objects_are_refused(tmp_path):
    torch.save({"model": _random_state(1), "args": object()}, tmp_path / "obj.pt")
    with pytest.raises(CheckpointError, match=r"obj\.pt.*[Ww]eights only"):
        build_dit(CFG, tmp_path / "obj.pt")


def test_missing_checkpoint_names_file_and_fetch_command(tmp_path):
    with pytest.raises(MissingAssetError, match=r"nothere\.pt.*fetch_assets\.py"):
        build_dit(CFG, tmp_path / "nothere.pt")
