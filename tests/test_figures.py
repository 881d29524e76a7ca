"""scripts/make_figures.py: each figure shows the rows its plan names, the same sample indices in
every column, full compute first, titled with NFC and speedup; rows without samples are skipped."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from eval.loggers import append_csv
from rfc.files import atomic_savez
from rfc.record import RunRecord

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from make_figures import draw, main, plan_figure, read_samples  # noqa: E402
from make_tables import GROUP_KEYS, latest, load, with_latency  # noqa: E402


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
    assert dict(plan.skipped).keys() == {"ToCa N=5", "RFC m=2 NFC 14"}
    assert "no samples.npz" in dict(plan.skipped)["ToCa N=5"] and "differ" in dict(plan.skipped)["RFC m=2 NFC 14"]
    rows = groups["rfc_table2"].set_index("variant")
    assert [c.run_id for c in plan.columns] == [rows.loc[c.label, "run_id"] for c in plan.columns]
    titles = [c.title.splitlines()[-1] for c in plan.columns]
    assert titles == ["NFC 50, speedup 1x", "NFC 17, speedup 2.5x", "NFC 14, speedup -"]
    grid = draw(plan, tmp_path / "fig.png")
    # cell [i][j] is sample i of column j's run: value of that run + i
    values = {"Full compute": 0, "FORA N=3": 100, "TaylorSeer N=4 m=2": 200}
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
    assert "skipped 'ToCa N=5'" in out and "(3 methods x 2 samples)" in out
    assert main(["--runs", str(path), "--out", str(tmp_path / "one"), "--experiment", "rfc_table1"]) == 0
    assert [p.name.startswith("rfc_table1_") for p in (tmp_path / "one").iterdir()] == [True]
    assert main(["--runs", str(tmp_path / "none.csv")]) == 2
