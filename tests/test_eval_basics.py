"""Analytic FLOPs, Frechet distance, and the CSV row writer."""

from __future__ import annotations

import csv
import multiprocessing as mp

import numpy as np
import pytest

from eval.fid import feature_statistics, frechet_distance
from rfc.models.flops import block_flops, full_step_flops
from rfc.run.loggers import append_csv
from rfc.run.row import RunRecord


def test_flops_match_the_papers_numbers():
    assert block_flops(2, 256, 1152, 16) / 1e9 == pytest.approx(16.954, abs=5e-4)
    step = full_step_flops(2, 256, 1152, 16, 28)
    assert step / 1e12 == pytest.approx(0.4747, abs=5e-5)
    assert 50 * step / 1e12 == pytest.approx(23.735, abs=5e-4)


def test_frechet_distance_self_zero_and_closed_form():
    rng = np.random.default_rng(0)
    feats = rng.normal(size=(500, 6))
    mu, sigma = feature_statistics(feats)
    assert abs(frechet_distance(mu, sigma, mu, sigma)) < 1e-6
    # Diagonal Gaussians: d = |mu1-mu2|^2 + sum (sqrt(a) - sqrt(b))^2
    a, b = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 9.0])
    m1, m2 = np.zeros(3), np.array([1.0, 2.0, 0.0])
    expected = 5.0 + ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert frechet_distance(m1, np.diag(a), m2, np.diag(b)) == pytest.approx(expected, abs=1e-9)


def _append(path, i):
    append_csv(path, RunRecord(model=f"m{i}", nfc=float(i)))


def test_csv_appends_from_parallel_processes_keep_every_row(tmp_path):
    path = tmp_path / "runs.csv"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_append, args=(path, i)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=60)
    rows = list(csv.DictReader(path.open()))
    assert sorted(r["model"] for r in rows) == ["m0", "m1", "m2", "m3"]
    assert list(rows[0]) == RunRecord.columns()
    assert rows[0]["fid"] == ""  # unknown stays empty


def test_csv_with_other_columns_is_widened_not_lost(tmp_path):
    path = tmp_path / "runs.csv"
    path.write_text("run_id,old_column\nabc,42\n")
    append_csv(path, RunRecord(run_id="new", model="x"))
    rows = list(csv.DictReader(path.open()))
    assert rows[0]["run_id"] == "abc" and rows[0]["old_column"] == "42"
    assert rows[1]["run_id"] == "new" and rows[1]["model"] == "x" and rows[1]["old_column"] == ""
