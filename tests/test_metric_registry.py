"""The metric registry (eval.registry): a metric registered from this file alone is computed by
the runner, is a column of the row (record, record.json, runs.csv), appears in the run log's
result line and in make_tables' output, and is gone again once unregistered."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from eval import registry
from eval.registry import CLASS, T2I, Metric, MetricInputs
from rfc.reports.tables import fmt, table_columns
from rfc.run.row import RunRecord
from rfc.run.runlog import result_line
from rfc.run.runner import run
from scripts.make_tables import main as make_tables


def mean_pixel(inputs: MetricInputs) -> float:
    """A toy metric: the mean pixel value of the samples."""
    return float(inputs.images.mean())


MEAN_PIXEL = Metric(
    name="mean_pixel",
    column="mean_pixel",
    compute=mean_pixel,
    needs=("images",),
    rows=(CLASS,),
    better=1,
    label="Mean pixel",
    axis="Mean pixel value",
    tables=(CLASS,),
)


@pytest.fixture
def toy_metric():
    """MEAN_PIXEL registered for the test, unregistered after it however it ends."""
    assert "mean_pixel" not in RunRecord.columns()
    with registry.registered(MEAN_PIXEL):
        yield MEAN_PIXEL
    assert "mean_pixel" not in RunRecord.columns()
    assert "mean_pixel" not in [m.name for m in registry.metrics()]


def test_a_metric_registered_in_a_test_is_a_column_of_the_row_and_the_tables(toy_metric, make_cfg, tmp_path):
    columns = RunRecord.columns()
    assert columns.index("mean_pixel") == columns.index("class_acc") + 1  # after the built-in metrics
    assert ("Mean pixel", "mean_pixel", 1) == table_columns(CLASS)[-1]
    assert "mean_pixel" not in [c for _, c, _ in table_columns(T2I)]

    cfg = make_cfg("eval.num_samples=4", "eval.batch_size=4", "sampler.num_steps=5", "eval.warmup_batches=0")
    rec = run(cfg, tmp_path / "out", progress=False)
    images = np.load(tmp_path / "out" / "samples.npz")["arr_0"]
    assert rec.mean_pixel == pytest.approx(float(images.mean()))
    assert rec.fid is not None  # the built-in metrics are still scored
    assert "Mean pixel" in result_line(rec)
    assert json.loads((tmp_path / "out" / "record.json").read_text())["mean_pixel"] == rec.mean_pixel

    rows = list(csv.DictReader((tmp_path / "runs.csv").open()))
    assert list(rows[0]) == columns
    assert float(rows[0]["mean_pixel"]) == rec.mean_pixel

    assert make_tables(["--csv", str(tmp_path / "runs.csv"), "--out", str(tmp_path / "tables")]) == 0
    md = next((tmp_path / "tables").glob("*.md")).read_text()
    header = next(line for line in md.splitlines() if line.startswith("| Method"))
    assert header.endswith("| IS | Mean pixel |"), header
    row = next(line for line in md.splitlines() if line.startswith("| none"))
    assert row.rstrip(" |").endswith(fmt(rec.mean_pixel)), row
    assert "Mean pixel" in next((tmp_path / "tables").glob("*.tex")).read_text()


def test_registration_is_checked_and_undone():
    before = RunRecord.columns()
    with pytest.raises(ValueError, match="clashes"):
        registry.register(Metric("fid_again", "fid", mean_pixel, ("images",), (CLASS,), -1, "FID", "FID"))
    with pytest.raises(ValueError, match="unknown inputs"):
        Metric("toy", "toy", mean_pixel, ("latents",), (CLASS,), 1, "Toy", "Toy")
    with pytest.raises(ValueError, match="kinds of row"):
        Metric("toy", "toy", mean_pixel, ("images",), ("video",), 1, "Toy", "Toy")
    with registry.registered(MEAN_PIXEL):
        assert RunRecord(mean_pixel=2.0).mean_pixel == 2.0
    assert RunRecord.columns() == before
    with pytest.raises(TypeError, match="mean_pixel"):
        RunRecord(mean_pixel=2.0)


def test_a_paired_metric_without_full_compute_images_is_left_empty_with_a_note():
    paired = Metric("toy_pair", "toy_pair", mean_pixel, ("images", "pair"), (CLASS,), 1, "Toy", "Toy")
    inputs = MetricInputs(CLASS, np.zeros((2, 4, 4, 3), np.uint8))
    values, notes = registry.compute([paired, MEAN_PIXEL], inputs)
    assert values == {"toy_pair": None, "mean_pixel": 0.0}
    assert notes == ["toy_pair not scored: no full-compute images of the same noise to compare with"]
