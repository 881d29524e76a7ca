"""Side-by-side sample figures: the same samples under every method of a table.

    python scripts/make_figures.py                                    # every experiment / setting
    python scripts/make_figures.py --experiment rfc_table2 --samples 4
    python scripts/make_figures.py --runs results/runs.csv --out results/figures

One figure per table of scripts/make_tables.py, grouped by the same keys (the experiment, every
rfc.setting quality key but the seed, and the prompt set) and from the same rows (the first seed,
the latest rerun of each method), so a figure never puts two settings side by side. Rows of the
figure are K sample indices, the same under every method: sample i was drawn from the same noise
(seeded by (seed, i)) and, for text-to-image rows, the same prompt i, so what differs across a
row is the method alone. Columns are the methods in the table's row order, full compute first (the
reference the eye compares with), each titled with its label and "NFC x, speedup y" (speedup "-"
where the table has none: no latency of its own or joined, or no full-compute latency of its
timing setting). Images come from each row's output_dir/samples.npz (arr_0 uint8 NHWC images,
arr_1 labels or prompt indices); a row without one is skipped with a printed line, and so is one
whose arr_1 disagrees with the first column's (not the same samples). Writes
<out>/<table name>_samples.png and prints each path.
"""

from __future__ import annotations

import argparse
import math
import sys
import textwrap
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from rfc.files import atomic_path  # noqa: E402
from scripts.make_tables import (  # noqa: E402
    GROUP_KEYS,
    T2I_COLUMNS,
    T2I_PAIRED,
    fmt,
    is_t2i,
    latest,
    load,
    table_name,
    table_rows,
    with_latency,
)


@dataclass
class Column:
    """One method of the figure: which run it shows and what its title says."""

    label: str
    run_id: str
    samples: Path
    nfc: float
    speedup: float

    @property
    def title(self) -> str:
        """The label (wrapped to the column's width) over "NFC x, speedup y"."""
        speedup = f"{fmt(self.speedup)}x" if not math.isnan(self.speedup) else "-"
        return "\n".join([*textwrap.wrap(self.label, 28), f"NFC {fmt(self.nfc)}, speedup {speedup}"])


@dataclass
class FigurePlan:
    """What a figure is made from: its columns (runs) in order, the sample indices of its rows,
    their labels (prompt or class of each index), and the table rows left out, with why."""

    name: str
    title: str
    t2i: bool
    columns: list[Column] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    row_labels: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


def read_samples(path: Path, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The first k images (uint8 NHWC) and labels of a samples.npz, reading only their bytes (a
    FLUX set of 1024 px images is gigabytes; a figure needs a handful)."""
    headers = {(1, 0): np.lib.format.read_array_header_1_0, (2, 0): np.lib.format.read_array_header_2_0}
    out = []
    with zipfile.ZipFile(path) as z:
        for member in ("arr_0.npy", "arr_1.npy"):
            with z.open(member) as f:
                version = np.lib.format.read_magic(f)
                shape, fortran, dtype = headers[version](f) if version in headers else ((), True, None)
                if fortran or dtype is None or dtype.hasobject:  # not the plain layout np.savez writes
                    with np.load(path) as arrays:
                        out.append(arrays[member.removesuffix(".npy")][:k])
                    continue
                n = min(k, shape[0]) if shape else 0
                per_item = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
                data = f.read(n * per_item)
                out.append(np.frombuffer(data, dtype=dtype).reshape((n, *shape[1:])))
    return out[0], out[1]


def _samples_path(output_dir: str) -> Path | None:
    if not output_dir:
        return None
    path = Path(output_dir)
    return (path if path.is_absolute() else ROOT / path) / "samples.npz"


def plan_figure(group: pd.DataFrame, k: int) -> FigurePlan:
    """The figure of one table's rows (one setting, one seed, with_latency applied): the columns
    with a samples.npz, full compute first then the table's order, and the first k sample
    indices every column has."""
    first = group.iloc[0]
    t2i = is_t2i(group)
    rows = table_rows(group, False, T2I_COLUMNS, T2I_PAIRED) if t2i else table_rows(group, False)
    rows = sorted(rows, key=lambda r: not r["is_full"])  # stable: the table's order after full compute
    caption = (f"{first['experiment']}: {first['model']} {first['image_size']}px, {first['sampler']}-"
               f"{first['num_steps']}, seed {first['seed']}" + (f", prompts {first['prompts']}" if t2i else ""))
    plan = FigurePlan(name=table_name(first), title=caption, t2i=t2i)
    reference: np.ndarray | None = None
    available: list[int] = []
    for r in rows:
        path = _samples_path(r["output_dir"])
        if path is None or not path.is_file():
            plan.skipped.append((r["label"], f"no samples.npz ({path or 'no output_dir recorded'})"))
            continue
        images, labels = read_samples(path, k)
        if reference is None:
            reference = labels
        n = min(len(labels), len(reference))
        if not np.array_equal(labels[:n], reference[:n]):
            plan.skipped.append((r["label"], f"labels of {path} differ from {plan.columns[0].label}'s: other samples"))
            continue
        available.append(len(images))
        plan.columns.append(Column(r["label"], r["run_id"], path, r["nfc"][0], r["speedup"][0]))
    if plan.columns and reference is not None:
        plan.indices = list(range(min(k, *available)))
        plan.row_labels = [f"prompt {reference[i]}" if t2i else f"sample {i}, class {reference[i]}"
                           for i in plan.indices]
    return plan


def draw(plan: FigurePlan, path: Path) -> list[list[np.ndarray]]:
    """Draw the plan's grid (rows: sample indices; columns: methods) to ``path``; returns the
    images drawn, [row][column], read afresh from the columns' samples.npz."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = max(plan.indices) + 1
    images = [read_samples(c.samples, k)[0] for c in plan.columns]
    grid = [[images[j][i] for j in range(len(plan.columns))] for i in plan.indices]
    rows, cols = len(grid), len(plan.columns)
    fig, axes = plt.subplots(rows, cols, figsize=(2.2 * cols, 2.2 * rows + 0.9), squeeze=False)
    for i, row in enumerate(grid):
        for j, img in enumerate(row):
            ax = axes[i][j]
            gray = img.shape[-1] == 1
            ax.imshow(img[..., 0] if gray else img, cmap="gray" if gray else None, vmin=0, vmax=255,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(plan.columns[j].title, fontsize=8)
            if j == 0:
                ax.set_ylabel(plan.row_labels[i], fontsize=8)
    fig.suptitle(plan.title, fontsize=9)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
    return grid


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=Path, default=ROOT / "results" / "runs.csv")
    p.add_argument("--experiment", default=None)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "figures")
    p.add_argument("--samples", type=int, default=4, help="K: sample indices shown (rows of each figure)")
    args = p.parse_args(argv)
    if args.samples < 1:
        print(f"error: --samples must be at least 1, got {args.samples}", file=sys.stderr)
        return 2
    if not args.runs.exists():
        print(f"error: {args.runs} does not exist: run `python run.py` first", file=sys.stderr)
        return 2
    df = load(args.runs, args.experiment, None)
    if df.empty:
        print("error: no rows match the filters", file=sys.stderr)
        return 2
    table = with_latency(latest(df), df)
    args.out.mkdir(parents=True, exist_ok=True)
    for _, group in table.groupby(GROUP_KEYS, sort=False):
        if group["seed"].nunique() > 1:
            group = group[group["seed"] == group["seed"].iloc[0]]
        plan = plan_figure(group, args.samples)
        for label, why in plan.skipped:
            print(f"skipped {label!r} in {plan.name}: {why}")
        if not plan.columns or not plan.indices:
            print(f"no figure for {plan.name}: no row has samples")
            continue
        path = args.out / f"{plan.name}_samples.png"
        draw(plan, path)
        print(f"wrote {path} ({len(plan.columns)} methods x {len(plan.indices)} samples)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
