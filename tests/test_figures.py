"""scripts/make_figures.py: each comparison figure shows the rows its plan (and the JSON beside it)
names, the same sample indices in every column, full compute first, titled with run id, NFC and
speedup; rows without samples are skipped. Each quality-vs-speed plot shows one labelled point per
row of its table, one line per method family in speed order, and refuses (or, asked to, marks) a
table of too few samples. rfc.utils.images.save_grid: torchvision's grid, small images enlarged."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from rfc.reports.figures import (
    MIN_SAMPLES,
    SMALL,
    draw,
    draw_quality_speed,
    families,
    family_lines,
    plan_figure,
    plan_quality_speed,
    read_samples,
)
from rfc.reports.tables import GROUP_KEYS, latest, load, with_latency
from rfc.run.loggers import append_csv
from rfc.run.row import RunRecord
from rfc.utils.files import atomic_savez
from rfc.utils.images import save_grid
from scripts.make_figures import main


def _samples(folder: Path, value: int, n: int = 5, size: int = 16, channels: int = 3,
             labels: np.ndarray | None = None) -> None:
    """A sample set whose image i is filled with value + i: which run and which index a figure
    cell shows can be read off its pixels."""
    folder.mkdir(parents=True)
    images = np.stack([np.full((size, size, channels), value + i, np.uint8) for i in range(n)])
    atomic_savez(folder / "samples.npz", arr_0=images, arr_1=np.arange(n) if labels is None else labels)


def _csv(tmp: Path) -> Path:
    """A text-to-image table whose full-compute row was written after a cached one, a row without
    samples, a row whose samples are of other prompts; and a class-conditional grayscale table."""
    path = tmp / "runs.csv"
    t2i = dict(experiment="rfc_table2", model="flux-tiny", image_size=16, sampler="flow_euler", num_steps=50,
               num_samples=5, seed=0, batch_size=5, prompts="drawbench200:sha256:0123")
    specs = [("fora", "FORA N=3", 17.0, 4.0, 100), ("none", "Full compute", 50.0, 10.0, 0),
             ("taylorseer", "TaylorSeer N=4 m=2", 14.0, None, 200), ("toca", "ToCa N=5", 12.0, 5.0, None),
             ("rfc", "RFC m=2 NFC 14", 14.0, 5.0, 150)]
    for i, (method, variant, nfc, latency, value) in enumerate(specs):
        out = tmp / "out" / variant.replace(" ", "_")
        if value is not None:
            _samples(out, value, labels=np.arange(5)[::-1] if method == "rfc" else None)
        append_csv(path, RunRecord(time=f"2026-01-01T00:0{i}:00", method=method, variant=variant, nfc=nfc,
                                   latency_s=latency, output_dir=str(out), **t2i))
    dit = dict(experiment="rfc_table1", model="dit-tiny", image_size=8, sampler="ddim", num_steps=50, cfg_scale=1.5,
               num_samples=3, seed=0, batch_size=3)
    for i, (method, value) in enumerate((("none", 10), ("fora", 60))):
        out = tmp / "out" / f"dit_{method}"
        _samples(out, value, n=3, size=8, channels=1, labels=np.array([7, 3, 1]))
        append_csv(path, RunRecord(time=f"2026-01-02T00:0{i}:00", method=method, variant=method, nfc=50.0 - 30 * i,
                                   latency_s=10.0 - 5 * i, output_dir=str(out), **dit))
    return path


def _groups(path: Path) -> dict:
    df = load(path, None, None)
    table = with_latency(latest(df), df)
    return {g["experiment"].iloc[0]: g for _, g in table.groupby(GROUP_KEYS, sort=False)}


def test_the_plan_names_the_runs_and_indices_the_figure_shows(tmp_path):
    groups = _groups(_csv(tmp_path))
    plan = plan_figure(groups["rfc_table2"], k=3)
    assert [c.label for c in plan.columns] == ["Full compute", "FORA N=3", "TaylorSeer N=4 m=2"]
    assert plan.indices == [0, 1, 2] and plan.row_labels == ["prompt 0", "prompt 1", "prompt 2"]
    plan_skips = {"ToCa N=5", "RFC m=2 NFC 14"}
    assert dict(plan.skipped).keys() == plan_skips
    assert "no samples.npz" in dict(plan.skipped)["ToCa N=5"] and "differ" in dict(plan.skipped)["RFC m=2 NFC 14"]
    rows = groups["rfc_table2"].set_index("variant")
    assert [c.run_id for c in plan.columns] == [rows.loc[c.label, "run_id"] for c in plan.columns]
    titles = [c.title.splitlines()[-1] for c in plan.columns]
    assert titles == ["NFC 50, speedup 1x", "NFC 17, speedup 2.5x", "NFC 14, speedup -"]
    assert [c.title.splitlines()[-2] for c in plan.columns] == [f"run {c.run_id}" for c in plan.columns]
    values = {"Full compute": 0, "FORA N=3": 100, "TaylorSeer N=4 m=2": 200}
    grid = draw(plan, tmp_path / "fig.png")
    # the JSON beside the figure names the CSV rows and the sample folders the columns were read from
    manifest = json.loads((tmp_path / "fig.json").read_text())
    assert [(c["label"], c["run_id"], c["samples"]) for c in manifest["columns"]] == \
        [(v, rows.loc[v, "run_id"], str(Path(rows.loc[v, "output_dir"]) / "samples.npz")) for v in values]
    assert manifest["sample_indices"] == [0, 1, 2] and {s["label"] for s in manifest["skipped"]} == set(plan_skips)
    # cell [i][j] is sample i of column j's run: value of that run + i
    assert [[int(img.min()) for img in row] for row in grid] == \
        [[values[c.label] + i for c in plan.columns] for i in plan.indices]
    assert all(int(img.max()) == int(img.min()) for row in grid for img in row)
    assert (tmp_path / "fig.png").stat().st_size > 1000

    dit = plan_figure(groups["rfc_table1"], k=10)  # more than the 3 samples there are
    assert [c.label for c in dit.columns] == ["none", "fora"] and dit.indices == [0, 1, 2]
    assert dit.row_labels == ["sample 0, class 7", "sample 1, class 3", "sample 2, class 1"]
    grid = draw(dit, tmp_path / "dit.png")
    assert [[int(img.min()) for img in row] for row in grid] == [[10, 60], [11, 61], [12, 62]]


def test_read_samples_reads_the_first_k(tmp_path):
    _samples(tmp_path / "s", 40, n=5)
    images, labels = read_samples(tmp_path / "s" / "samples.npz", 2)
    assert images.shape == (2, 16, 16, 3) and images.dtype == np.uint8 and labels.tolist() == [0, 1]
    assert [int(im.min()) for im in images] == [40, 41]


def test_command_line_writes_one_figure_per_table(tmp_path, capsys):
    path = _csv(tmp_path)
    assert main(["--runs", str(path), "--out", str(tmp_path / "figs"), "--samples", "2"]) == 0
    out = capsys.readouterr().out
    written = [Path(line.split()[1]) for line in out.splitlines() if line.startswith("wrote ")]
    assert len(written) == 2 and all(p.stat().st_size > 1000 and p.suffix == ".png" for p in written)
    assert all(p.name.endswith("_samples.png") and p.with_suffix(".json").is_file() for p in written)
    assert "skipped 'ToCa N=5'" in out and "(3 methods x 2 samples)" in out
    # both tables are far too small for their metrics (or have none): no quality-vs-speed plot
    assert not list((tmp_path / "figs").glob("*_quality_speed.png"))
    assert main(["--runs", str(path), "--out", str(tmp_path / "one"), "--experiment", "rfc_table1"]) == 0
    one = sorted(p.name for p in (tmp_path / "one").iterdir())  # the figure and the JSON naming its rows
    assert len(one) == 2 and all(n.startswith("rfc_table1_") for n in one) and one[0].endswith("_samples.json")
    assert main(["--runs", str(tmp_path / "none.csv")]) == 2


def test_kept_samples_redraw_a_figure_whose_run_folders_are_gone(tmp_path, capsys):
    """--keep-samples keeps the first samples of every column beside the results; with the run
    folders gone (a fresh clone: rows point at another machine's folders) the same figure is
    drawn from them, pixel for pixel."""
    import shutil

    path, kept = _csv(tmp_path), tmp_path / "kept"
    args = ["--runs", str(path), "--samples", "2", "--experiment", "rfc_table1", "--kept", str(kept)]
    assert main([*args, "--out", str(tmp_path / "a"), "--keep-samples"]) == 0
    assert len(list(kept.glob("*.npz"))) == 2
    shutil.rmtree(tmp_path / "out")
    capsys.readouterr()
    assert main([*args, "--out", str(tmp_path / "b")]) == 0
    assert "(2 methods x 2 samples)" in capsys.readouterr().out
    a, b = (next((tmp_path / d).glob("*_samples.png")) for d in "ab")
    assert np.array_equal(np.asarray(Image.open(a)), np.asarray(Image.open(b)))
    assert main([*args, "--out", str(tmp_path / "c"), "--kept", str(tmp_path / "nowhere")]) == 0
    assert "none of its 2 rows has samples" in capsys.readouterr().out


def test_a_fresh_clone_redraws_the_committed_comparison_figures(tmp_path):
    """The repository's own results: in a clone (whose rows point at the run folders of the machine
    that drew them, none of which it has), make_figures draws every committed comparison figure
    again, from the samples kept in results/samples, with the same runs in the same columns."""
    import subprocess
    import sys

    root = Path(__file__).resolve().parents[1]
    committed = sorted((root / "results" / "figures").glob("*_samples.json"))
    if not committed or not (root / ".git").exists():
        pytest.skip("no committed comparison figures, or not a git checkout")
    clone = tmp_path / "clone"
    subprocess.run(["git", "clone", "-q", "--depth", "1", f"file://{root}", str(clone)], check=True, timeout=120)
    proc = subprocess.run([sys.executable, str(clone / "scripts" / "make_figures.py"), "--out", str(tmp_path / "f")],
                          capture_output=True, text=True, timeout=300, cwd=clone)
    assert proc.returncode == 0, proc.stderr[-2000:]
    for manifest in committed:
        if not (clone / "results" / "figures" / manifest.name).exists():
            continue  # drawn after the commit this clone has
        want = json.loads((clone / "results" / "figures" / manifest.name).read_text())
        got_path = tmp_path / "f" / manifest.name
        assert got_path.is_file(), f"{manifest.name} not redrawn: {proc.stdout[-1500:]}"
        got = json.loads(got_path.read_text())
        assert [c["run_id"] for c in got["columns"]] == [c["run_id"] for c in want["columns"]]


# ---- quality against speed -----------------------------------------------------------------------

TS = '{"interval": %d, "order": %d, "warmup": 2}'
RFC = '{"interval": 4, "order": 2, "rfe": true, "rcs": true, "magnitude": "relational", "tau": %s}'
# method, variant, method_params, nfc, tflops, latency, fid, fid2fc; written out of speed order
SPEED_ROWS = [
    ("none", "Full compute", "{}", 50.0, 4.0, 20.0, 11.0, 0.0),
    ("fora", "FORA N=5", '{"interval": 5}', 11.0, 0.9, 4.0, 15.0, 2.0),
    ("fora", "FORA N=3", '{"interval": 3}', 18.0, 1.4, 5.0, 13.0, 1.0),
    ("taylorseer", "TaylorSeer N=6 m=2", TS % (6, 2), 10.0, 0.8, 4.5, 12.0, 0.6),
    ("taylorseer", "TaylorSeer N=4 m=2", TS % (4, 2), 14.0, 1.1, 5.0, 11.2, 0.2),
    ("taylorseer", "TaylorSeer N=4 m=1", TS % (4, 1), 14.0, 1.1, 4.9, 11.5, 0.3),
    ("rfc", "RFC m=2 NFC 14", RFC % 0.03, 14.0, 1.1, 8.0, 10.9, 0.05),
    ("rfc", "RFC m=2 NFC 8", RFC % 0.2, 8.0, 0.7, 6.0, 11.3, 0.4),
    ("fbcache", "", '{"threshold": 0.08, "warmup": 0}', 20.0, 1.6, 6.6, 12.5, 0.5),
]


def _speed_csv(tmp: Path, n: int, untimed: str | None = None) -> Path:
    """A class-conditional table of ``n`` samples (no samples on disk: the plot needs the CSV only);
    ``untimed``: a variant recorded without a latency."""
    path = tmp / "runs.csv"
    common = dict(experiment="rfc_table1", model="dit-tiny", image_size=8, sampler="ddim", num_steps=50,
                  cfg_scale=1.5, num_samples=n, seed=0, batch_size=250, extractor="digits-classifier",
                  reference="sklearn-digits-1797")
    for i, (method, variant, params, nfc, tflops, latency, fid, fid2fc) in enumerate(SPEED_ROWS):
        append_csv(path, RunRecord(time=f"2026-01-01T00:{i:02d}:00", method=method, variant=variant or None,
                                   method_params=params, nfc=nfc, tflops=tflops,
                                   latency_s=None if variant == untimed else latency, fid=fid,
                                   fid2fc=None if method == "none" else fid2fc, **common))
    return path


def test_quality_speed_plot_names_its_rows_families_and_speed_order(tmp_path):
    path = _speed_csv(tmp_path, n=1000)
    (group,) = _groups(path).values()
    plan = plan_quality_speed(group)
    assert plan.x_kind == "speedup" and plan.metrics == ["fid", "fid2fc"] and not plan.small and not plan.why_not
    rows = group.set_index("label")
    fora5 = next(p for p in plan.points if p.label == "FORA N=5")
    assert fora5.run_id == rows.loc["FORA N=5", "run_id"] and fora5.x == 20.0 / 4.0
    assert {p.label: p.family for p in plan.points} == {
        "Full compute": "Full compute", "FORA N=5": "FORA", "FORA N=3": "FORA",
        "TaylorSeer N=6 m=2": "TaylorSeer m=2", "TaylorSeer N=4 m=2": "TaylorSeer m=2",
        "TaylorSeer N=4 m=1": "TaylorSeer m=1", "RFC m=2 NFC 14": "RFC m=2", "RFC m=2 NFC 8": "RFC m=2",
        "FBCache thr=0.08": "FBCache"}  # a row without a variant name: its family and speed knob
    lines = {name: [p.label for p in pts] for name, pts in family_lines(plan, "fid").items()}
    assert lines == {"FORA": ["FORA N=3", "FORA N=5"], "TaylorSeer m=2": ["TaylorSeer N=4 m=2", "TaylorSeer N=6 m=2"],
                     "TaylorSeer m=1": ["TaylorSeer N=4 m=1"], "RFC m=2": ["RFC m=2 NFC 14", "RFC m=2 NFC 8"],
                     "FBCache": ["FBCache thr=0.08"]}  # each in speed order (x ascending); full compute apart
    full = next(p for p in plan.points if p.is_full)
    assert full.x == 1.0 and full.values == {"fid": 11.0}  # FID2FC: full compute is its reference, no value

    title = draw_quality_speed(plan, tmp_path / "q.png")
    assert SMALL not in title and "1000 samples" in title
    assert Image.open(tmp_path / "q.png").size[0] > 1000
    manifest = json.loads((tmp_path / "q.json").read_text())
    assert [(p["label"], p["run_id"], p["x"], p.get("fid")) for p in manifest["points"]] == \
        [(p.label, rows.loc[_row_label(rows, p.label), "run_id"], p.x, p.values.get("fid")) for p in plan.points]
    assert manifest["x"] == "speedup" and manifest["min_samples"] == {"fid": 1000, "fid2fc": 1000}
    assert manifest["not_meaningful"] == {}


def _row_label(rows, label: str) -> str:
    """The table label of a plot label (rows without a variant are labelled by method and JSON)."""
    return label if label in rows.index else next(r for r in rows.index if r.startswith("fbcache"))


def test_rows_without_latency_put_every_point_on_the_flops_ratio(tmp_path):
    (group,) = _groups(_speed_csv(tmp_path, n=1000, untimed="FORA N=3")).values()
    plan = plan_quality_speed(group)
    assert plan.x_kind == "flops" and "not every row timed" in plan.x_label
    assert {p.label: round(p.x, 6) for p in plan.points}["FORA N=3"] == round(4.0 / 1.4, 6)


def test_too_few_samples_are_refused_or_marked(tmp_path, capsys):
    """FID from 16 samples (the old ablation plot's ~350) is refused; a stale plot of that table is
    removed; --allow-small draws it with NOT MEANINGFUL in the title and the JSON."""
    assert MIN_SAMPLES["fid"] == 1000 and MIN_SAMPLES["psnr"] == 100
    path = _speed_csv(tmp_path, n=16)
    (group,) = _groups(path).values()
    plan = plan_quality_speed(group)
    assert plan.small == {"fid": 1000, "fid2fc": 1000}
    assert plan.warning == "FID from 16 samples (< 1,000); FID2FC from 16 samples (< 1,000)"
    stale = tmp_path / "figs" / f"{plan.name}_quality_speed.png"
    stale.parent.mkdir()
    stale.write_bytes(b"an earlier plot")
    stale.with_suffix(".json").write_text("{}")
    assert main(["--runs", str(path), "--out", str(tmp_path / "figs")]) == 0
    out = capsys.readouterr().out
    assert f"no quality-vs-speed plot for {plan.name}: FID from 16 samples (< 1,000)" in out
    assert not stale.exists() and not stale.with_suffix(".json").exists() and f"removed {stale}" in out

    assert main(["--runs", str(path), "--out", str(tmp_path / "figs"), "--allow-small"]) == 0
    assert "marked NOT MEANINGFUL: FID from 16 samples" in capsys.readouterr().out and stale.stat().st_size > 1000
    manifest = json.loads(stale.with_suffix(".json").read_text())
    assert manifest["not_meaningful"] == {"fid": "16 < 1000", "fid2fc": "16 < 1000"} and manifest["num_samples"] == 16
    assert draw_quality_speed(plan, tmp_path / "small.png").endswith(f"{SMALL}: {plan.warning}")


@pytest.mark.parametrize("n, small", [(50, True), (200, False)])
def test_text_to_image_plot_uses_psnr_and_its_floor(tmp_path, n, small):
    path = tmp_path / "runs.csv"
    common = dict(experiment="rfc_table2", model="flux-tiny", image_size=64, sampler="flow_euler", num_steps=50,
                  cfg_scale=3.5, num_samples=n, seed=0, batch_size=4, prompts="drawbench:sha256:0123")
    for i, (method, variant, nfc, latency, psnr) in enumerate((("none", "Full compute", 50.0, 10.0, math.inf),
                                                               ("fora", "FORA N=3", 17.0, 4.0, 28.0),
                                                               ("fora", "FORA N=7", 8.0, 2.0, 22.0))):
        append_csv(path, RunRecord(time=f"2026-01-01T00:0{i}:00", method=method, variant=variant, nfc=nfc,
                                   latency_s=latency, psnr=psnr, **common))
    (group,) = _groups(path).values()
    plan = plan_quality_speed(group)
    assert plan.metrics == ["psnr"] and bool(plan.small) is small
    assert [(p.label, p.x, p.values) for p in plan.points] == [
        ("Full compute", 1.0, {}), ("FORA N=3", 2.5, {"psnr": 28.0}), ("FORA N=7", 5.0, {"psnr": 22.0})]
    assert families([{"label": "x", "method": "toca", "method_params": "{}", "fused": "", "is_full": False}]) == \
        {"x": "ToCa"}


def test_save_grid_is_torchvisions_grid_with_small_images_enlarged(tmp_path):
    images = np.stack([np.full((8, 8, 1), 10 * i, np.uint8) for i in range(10)])
    save_grid(images, tmp_path / "g.png", n=9)  # 9 of 10: a row of 8, a row of 1
    grid = np.asarray(Image.open(tmp_path / "g.png"))
    scale = 4  # 8 px enlarged to at least 32
    assert grid.shape == ((2 * (8 + 2) + 2) * scale, (8 * (8 + 2) + 2) * scale, 3)
    for i in range(9):
        r, c = divmod(i, 8)
        y, x = (2 + r * 10) * scale, (2 + c * 10) * scale
        assert (grid[y:y + 8 * scale, x:x + 8 * scale] == 10 * i).all()  # image i, crisp (nearest)
    assert (grid[:2 * scale] == 255).all() and (grid[-2 * scale:, 2 * scale:] == 255).all()  # white padding
    rgb = np.random.default_rng(0).integers(0, 256, (3, 64, 64, 3), dtype=np.uint8)
    save_grid(rgb, tmp_path / "rgb.png")
    out = np.asarray(Image.open(tmp_path / "rgb.png"))
    assert out.shape == (68, 3 * 66 + 2, 3) and np.array_equal(out[2:66, 68:132], rgb[1])  # not enlarged
