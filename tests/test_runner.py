"""End to end through the real Hydra configs: sample, score, record; clear errors first."""

from __future__ import annotations

import csv
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rfc.models.load import MissingAssetError
from rfc.run.build import plan_run
from rfc.run.row import RunRecord
from rfc.run.runner import run

ROOT = Path(__file__).resolve().parents[1]


def test_tiny_model_draws_recognisable_digits(make_cfg, tmp_path):
    """The shipped model with the default sampler (DDIM-50, CFG 1.5): the classifier agrees with
    the conditioning label on >= 90 % of samples (200 here; the README reports 1,000)."""
    cfg = make_cfg("eval.num_samples=200", "eval.batch_size=100")
    rec = run(cfg, tmp_path / "out", progress=False)
    assert rec.class_acc >= 0.90, rec.class_acc
    assert rec.nfc == 50 and rec.num_steps == 50 and rec.cfg_scale == 1.5
    assert rec.extractor == "digits-classifier" and rec.reference == "sklearn-digits-1797"
    assert 0 <= rec.fid < 50  # a sanity bound in the classifier's 64-d feature space
    # ADM layout: uint8 NHWC images and labels
    data = np.load(tmp_path / "out" / "samples.npz")
    assert data["arr_0"].dtype == np.uint8 and data["arr_0"].shape == (200, 8, 8, 1)
    assert data["arr_1"].shape == (200,) and set(np.unique(data["arr_1"])) <= set(range(10))
    assert Image.open(tmp_path / "out" / "grid.png").size[0] >= 8 * 8
    rows = list(csv.DictReader((tmp_path / "runs.csv").open()))
    assert len(rows) == 1 and list(rows[0]) == RunRecord.columns()
    row = rows[0]
    assert row["run_id"] == rec.run_id and row["method"] == "none" and row["model"] == "dit-tiny"
    assert float(row["class_acc"]) == rec.class_acc and row["sfid"] == "" and row["inception_score"] == ""
    # analytic FLOPs: 6 blocks, 16 tokens, hidden 128, 4 heads, B = 2 (guidance), 50 full steps
    from rfc.models.flops import full_step_flops

    assert float(row["tflops"]) == pytest.approx(50 * full_step_flops(2, 16, 128, 4, 6) / 1e12)


def test_two_runs_same_seed_identical_and_rows_accumulate(make_cfg, tmp_path):
    cfg = make_cfg("eval.num_samples=12", "eval.batch_size=5", "sampler.num_steps=5", "seed=3")
    a = run(cfg, tmp_path / "a", progress=False)
    b = run(cfg, tmp_path / "b", progress=False)
    assert a.run_id != b.run_id
    images = [np.load(tmp_path / d / "samples.npz")["arr_0"] for d in ("a", "b")]
    assert np.array_equal(images[0], images[1])
    assert len(list(csv.DictReader((tmp_path / "runs.csv").open()))) == 2


@pytest.mark.parametrize("override, message", [
    ("eval.num_samples=0", "num_samples"),
    ("eval.batch_size=-1", "batch_size"),
    ("model.guided_channels=2", "guided_channels"),
    ("model.vae=xyz", "model.vae"),
    ("eval.warmup_batches=-1", "eval.warmup_batches"),
    ("eval.paired=sometimes", "eval.paired"),
])
def test_bad_settings_fail_before_any_work(make_cfg, tmp_path, override, message):
    with pytest.raises(ValueError, match=message):
        plan_run(make_cfg(override), tmp_path / "out")
    assert not (tmp_path / "runs.csv").exists()


def test_missing_checkpoint_is_named(make_cfg, tmp_path):
    with pytest.raises(MissingAssetError, match="nope.pt"):
        plan_run(make_cfg(f"model.checkpoint={tmp_path}/nope.pt"), tmp_path / "out")


def _cli(*args: str, tmp_path: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "run.py"), f"paths.outputs={tmp_path}/outputs",
                           f"paths.runs_csv={tmp_path}/runs.csv", f"paths.assets={tmp_path}/assets", *args],
                          capture_output=True, text=True, timeout=timeout, cwd=tmp_path)


def test_cli_dit_xl_without_assets_fails_fast_naming_the_file(tmp_path):
    t0 = time.perf_counter()
    proc = _cli("model=dit-xl", tmp_path=tmp_path, timeout=120)
    assert proc.returncode != 0
    assert "DiT-XL-2-256x256.pt" in proc.stderr and "scripts/fetch_assets.py" in proc.stderr
    assert time.perf_counter() - t0 < 60
    assert not (tmp_path / "runs.csv").exists()


def test_cli_random_dit_s_runs_the_whole_pipeline(tmp_path):
    proc = _cli("model=dit-s", "model.pretrained=false", "model.image_size=64", "sampler.num_steps=2",
                "eval.num_samples=2", "eval.warmup_batches=0", tmp_path=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "samples:" in proc.stdout and "row:" in proc.stdout
    row = list(csv.DictReader((tmp_path / "runs.csv").open()))[0]
    assert row["model"] == "dit-s" and row["vae"] == "sd-vae-ft-ema (random)" and row["nfc"] == "2.0"
    assert row["fid"] == ""  # random weights: no quality metrics
    images = np.load(Path(row["output_dir"]) / "samples.npz")["arr_0"]
    assert images.shape == (2, 64, 64, 3) and images.dtype == np.uint8  # 8x8 latents through the VAE


def test_scored_imagenet_run_without_inception_weights_says_so_before_sampling(make_cfg, tmp_path):
    ckpt = tmp_path / "DiT-S-2-256x256.pt"
    ckpt.write_bytes(b"")  # present; never read, because planning fails first
    vae = tmp_path / "assets" / "sd-vae-ft-ema"
    vae.mkdir(parents=True)
    (vae / "config.json").write_text("{}")
    (vae / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    cfg = make_cfg("model=dit-s", f"model.checkpoint={ckpt}", f"paths.assets={tmp_path / 'assets'}")
    with pytest.raises(MissingAssetError, match="Inception weights.*fetch_assets.py inception"):
        plan_run(cfg, tmp_path / "out")
