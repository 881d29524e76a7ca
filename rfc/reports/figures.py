"""The figures a researcher looks at first, from the rows of results/runs.csv (scripts/make_figures.py).

Two figures per table of rfc.reports.tables (same grouping, same rows: the first seed, the latest rerun of
each method, latencies joined as the table joins them), so a figure never shows a row its table
does not, nor two settings side by side:

- the side-by-side comparison (``<table>_samples.png``): rows are K sample indices, the same under
  every method (sample i was drawn from the same noise and, for text-to-image rows, the same
  prompt), columns are the methods, full compute first; each column is titled with its label,
  "NFC x, speedup y" and the run id it shows;
- the quality-vs-speed plot (``<table>_quality_speed.png``): one labelled point per variant, one
  line per method family (FORA, ToCa, TaylorSeer m=..., RFC m=..., FBCache, TeaCache; variants of
  a family joined in speed order), full compute marked; x = speedup over full compute (measured
  latency where every row has one, else the FLOPs or NFC ratio, named on the axis), y = the table's
  quality metrics (FID and FID2FC for class-conditional tables, PSNR and ImageReward / CLIP for
  text-to-image ones, whichever the rows have).

Each figure gets a JSON beside it naming the rows it was made from (run ids, output folders,
values), so what a PNG shows can be traced back to the CSV.

Sample-count floors (MIN_SAMPLES). A quality number from too few samples measures the sample count
more than the method: FID estimates a mean and a covariance of features, and its bias grows like
(feature dimension) / N (Chong and Forsyth, "Effectively Unbiased FID", CVPR 2020); the tiny
model's full-compute set scores FID 352 from 16 samples and 11 from 1,000, while its methods differ
by a few points. So FID, sFID, FID2FC, sFID2FC and IS need at least 1,000 samples (a floor, not a
target: Inception FID at 1,000 samples is still biased by several points, which is why tables only
compare rows of one sample count). Per-image means (PSNR, SSIM, LPIPS against full compute,
ImageReward, CLIP score) are unbiased but noisy, with a standard error of sd / sqrt(N): they need
100 samples (DrawBench's 200 prompts pass). Below its floor a metric is refused; with
``allow_small`` it is drawn, but its panel and the title say "NOT MEANINGFUL" with the count.
"""

from __future__ import annotations

import json
import math
import textwrap
import zipfile
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from eval import registry
from rfc.reports.tables import (
    JOINED,
    fmt,
    is_t2i,
    paired_columns,
    table_columns,
    table_kind,
    table_name,
    table_rows,
)
from rfc.utils.files import atomic_path, atomic_savez, atomic_write_text

ROOT = Path(__file__).resolve().parents[2]

MAX_PANELS = 2


def min_samples() -> dict[str, int]:
    """Each registered metric's sample floor (its column -> the count under which it is refused)."""
    return {m.column: m.min_samples for m in registry.metrics()}


def figure_metrics(kind: str) -> tuple[str, ...]:
    """The columns a quality-vs-speed plot of ``kind`` may put on its y axes, in order: the first
    is the table's headline metric (class-conditional: FID, FID2FC, sFID, IS; text-to-image: PSNR,
    ImageReward, CLIP, LPIPS)."""
    return tuple(m.column for m in registry.figure_metrics(kind))


def metric_name(column: str) -> str:
    """A metric's axis label (its column for one the registry does not know)."""
    metric = registry.by_column(column)
    return metric.axis if metric is not None else column


def better(column: str) -> int:
    """+1 when higher is better, -1 when lower is (or unknown), as the registry says."""
    metric = registry.by_column(column)
    return metric.better if metric is not None and metric.better else -1


def header(column: str) -> str:
    """A metric's table header."""
    metric = registry.by_column(column)
    return metric.label if metric is not None else column


def __getattr__(name: str) -> object:
    """``MIN_SAMPLES`` (column -> sample floor), as the registry has it now."""
    if name == "MIN_SAMPLES":
        return min_samples()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


FAMILY = {"fora": "FORA", "toca": "ToCa", "taylorseer": "TaylorSeer", "rfc": "RFC", "fbcache": "FBCache",
          "teacache": "TeaCache"}
# hyperparameters that trade quality for speed within a family (what varies along its line)
SPEED_KNOBS = ("interval", "tau", "threshold", "fresh_ratio")
SPEED_SYMBOL = {"interval": "N", "tau": "tau", "threshold": "thr", "fresh_ratio": "R"}
SMALL = "NOT MEANINGFUL"
LABEL_SIZE = 6.5  # points: the variant names beside their points


# ---------------------------------------------------------------------------------------------------
# Side-by-side samples


@dataclass
class Column:
    """One method of the comparison figure: which run it shows and what its title says."""

    label: str
    run_id: str
    samples: Path
    nfc: float
    speedup: float

    @property
    def title(self) -> str:
        """The label (wrapped to the column's width), the run id (so a reader can find the row of
        runs.csv each column shows) and "NFC x, speedup y"."""
        speedup = f"{fmt(self.speedup)}x" if not math.isnan(self.speedup) else "-"
        return "\n".join([*textwrap.wrap(self.label, 28), f"run {self.run_id}",
                          f"NFC {fmt(self.nfc)}, speedup {speedup}"])


@dataclass
class FigurePlan:
    """What a comparison figure is made from: its columns (runs) in order, the sample indices of
    its rows, their labels (prompt or class of each index), and the table rows left out, with why."""

    name: str
    title: str
    t2i: bool
    columns: list[Column] = field(default_factory=list)
    indices: list[int] = field(default_factory=list)
    row_labels: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)

    def manifest(self) -> dict:
        """The rows and sample indices the figure shows, for the JSON written beside it."""
        return {"figure": f"{self.name}_samples.png", "table": self.name, "title": self.title,
                "sample_indices": self.indices, "row_labels": self.row_labels,
                "columns": [{"label": c.label, "run_id": c.run_id, "samples": str(c.samples), "nfc": _num(c.nfc),
                             "speedup": _num(c.speedup)} for c in self.columns],
                "skipped": [{"label": label, "why": why} for label, why in self.skipped]}


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


KEPT_SAMPLES = Path("results") / "samples"  # <run_id>.npz: the first samples of committed rows
KEEP = 8  # samples kept per row: what a comparison figure shows, with room to spare


def samples_path(output_dir: str, root: Path = ROOT) -> Path | None:
    """A row's samples.npz (a relative output_dir is taken from the repository root)."""
    if not output_dir:
        return None
    path = Path(output_dir)
    return (path if path.is_absolute() else root / path) / "samples.npz"


def find_samples(row: dict, kept_dir: Path | None = None, root: Path = ROOT) -> tuple[Path | None, str]:
    """Where a row's samples are: its run folder's samples.npz, else the small set kept for it
    under results/samples/<run_id>.npz (what a fresh clone has: committed rows point at run
    folders of the machine that drew them). Returns (path or None, why not)."""
    own = samples_path(row["output_dir"], root)
    if own is not None and own.is_file():
        return own, ""
    kept = (kept_dir or root / KEPT_SAMPLES) / f"{row['run_id']}.npz"
    if row.get("run_id") and kept.is_file():
        return kept, ""
    return None, f"no samples.npz ({own or 'no output_dir recorded'}) and none kept in {kept}"


def middle_frame(videos: np.ndarray, axis: int) -> np.ndarray:
    """The frame a figure shows of a video: the middle one along ``axis`` (the frames axis)."""
    return np.take(videos, videos.shape[axis] // 2, axis=axis)


def keep_samples(source: Path, run_id: str, kept_dir: Path | None = None, k: int = KEEP) -> Path:
    """Write the first ``k`` samples (images and labels) of a row to results/samples/<run_id>.npz,
    the set a fresh clone redraws its figures from; of a video, the one frame its figures show (the
    middle one, kept as a 1-frame video so that it is still the middle frame)."""
    images, labels = read_samples(source, k)
    if images.ndim == 5:
        images = middle_frame(images, axis=1)[:, None]
    target = (kept_dir or ROOT / KEPT_SAMPLES) / f"{run_id}.npz"
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_savez(target, arr_0=images, arr_1=labels)
    return target


def _caption(group: pd.DataFrame) -> str:
    """A figure's title: the setting its rows share, with the sample count a reader judges it by."""
    first = group.iloc[0]
    t2i = is_t2i(group)
    return (f"{first['experiment']}: {first['model']} {first['image_size']}px, {first['sampler']}-"
            f"{first['num_steps']}, {first['num_samples']} samples, seed {first['seed']}"
            + (f", prompts {first['prompts']}" if t2i else ""))


def _rows(group: pd.DataFrame) -> list[dict]:
    """The table's rows (one seed), full compute first, then the table's order."""
    kind = table_kind(group)
    rows = table_rows(group, False, table_columns(kind), paired_columns(kind))
    return sorted(rows, key=lambda r: not r["is_full"])  # stable


def plan_figure(group: pd.DataFrame, k: int, kept_dir: Path | None = None) -> FigurePlan:
    """The comparison figure of one table's rows (one setting, one seed, with_latency applied): the
    columns with a samples.npz, full compute first then the table's order, and the first k sample
    indices every column has. A row whose labels (classes or prompt indices) differ from the first
    column's drew other samples and is left out."""
    t2i = is_t2i(group)
    plan = FigurePlan(name=table_name(group.iloc[0]), title=_caption(group), t2i=t2i)
    reference: np.ndarray | None = None
    available: list[int] = []
    for r in _rows(group):
        path, why = find_samples(r, kept_dir)
        if path is None:
            plan.skipped.append((r["label"], why))
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
    """Draw the plan's grid (rows: sample indices; columns: methods) to ``path`` and its manifest
    to the same name with .json; returns the images drawn, [row][column], read afresh from the
    columns' samples.npz (a video's cell shows its middle frame)."""
    plt = _pyplot()
    k = max(plan.indices) + 1
    images = [read_samples(c.samples, k)[0] for c in plan.columns]
    grid = [[images[j][i] for j in range(len(plan.columns))] for i in plan.indices]
    rows, cols = len(grid), len(plan.columns)
    cell, size = (1.9, 7) if cols <= 6 else (1.55, 6)  # a 13-method table stays readable when scaled to a page
    fig, axes = plt.subplots(rows, cols, figsize=(cell * cols, cell * rows + 1.0), squeeze=False)
    for i, row in enumerate(grid):
        for j, img in enumerate(row):
            ax = axes[i][j]
            if img.ndim == 4:  # a video (F, H, W, C): its middle frame, the same one under every method
                img = middle_frame(img, axis=0)
            gray = img.shape[-1] == 1
            ax.imshow(img[..., 0] if gray else img, cmap="gray" if gray else None, vmin=0, vmax=255,
                      interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(plan.columns[j].title, fontsize=size)
            if j == 0:
                ax.set_ylabel(plan.row_labels[i], fontsize=size)
    fig.suptitle(plan.title, fontsize=9)
    fig.tight_layout()
    _save(fig, path)
    atomic_write_text(path.with_suffix(".json"), json.dumps(plan.manifest(), indent=1) + "\n")
    return grid


# ---------------------------------------------------------------------------------------------------
# Quality against speed


@dataclass
class Point:
    """One variant (a table row) on the quality-vs-speed plot."""

    label: str
    family: str
    run_id: str
    is_full: bool
    x: float
    values: dict[str, float]


@dataclass
class SpeedPlan:
    """What a quality-vs-speed plot is made from: its points, its axes, and the metrics whose sample
    count is under their floor (``small``: metric -> floor), which the plot refuses or marks."""

    name: str
    title: str
    num_samples: int
    x_kind: str = ""  # "speedup" (measured latency), "flops" (TFLOPs ratio) or "nfc" (NFC ratio)
    x_label: str = ""
    metrics: list[str] = field(default_factory=list)
    points: list[Point] = field(default_factory=list)
    small: dict[str, int] = field(default_factory=dict)
    why_not: str = ""  # why there is nothing to plot (no full-compute row, no quality values)

    @property
    def warning(self) -> str:
        """One line naming every metric below its floor, for the title and the command's output."""
        return "; ".join(f"{header(m)} from {self.num_samples} samples (< {floor:,})"
                         for m, floor in self.small.items())

    def manifest(self) -> dict:
        """The rows and values the plot shows, for the JSON written beside it."""
        return {"figure": f"{self.name}_quality_speed.png", "table": self.name, "title": self.title,
                "num_samples": self.num_samples, "x": self.x_kind, "x_label": self.x_label, "metrics": self.metrics,
                "min_samples": {m: min_samples()[m] for m in self.metrics},
                "not_meaningful": {m: f"{self.num_samples} < {floor}" for m, floor in self.small.items()},
                "points": [{**{k: v for k, v in asdict(p).items() if k != "values"}, "x": _num(p.x),
                            **{m: _num(v) for m, v in p.values.items()}} for p in self.points]}


def families(rows: list[dict]) -> dict[str, str]:
    """Family name of each row label: the method's name, with the Taylor order for TaylorSeer and
    RFC (m = 1 and m = 2 are different methods, each with its speed/quality curve), and any other
    hyperparameter that differs between the table's rows of that method (RFC ablations: rfe, rcs,
    magnitude; both code paths: fused / per-site). Speed knobs (interval, tau, threshold, fresh
    ratio) are what varies along a family's line, so they never split a family."""
    params = {r["label"]: _params(r) for r in rows}
    by_method: dict[str, list[dict]] = {}
    for r in rows:
        by_method.setdefault(r["method"], []).append(r)
    out = {}
    for method, members in by_method.items():
        keys = sorted({k for r in members for k in params[r["label"]]} - {*SPEED_KNOBS, "order"})
        varying = [k for k in keys if len({json.dumps(params[r["label"]].get(k)) for r in members}) > 1]
        paths = len({r["fused"] for r in members}) > 1
        for r in members:
            if r["is_full"]:
                out[r["label"]] = "Full compute"
                continue
            p = params[r["label"]]
            name = FAMILY.get(method, method) + (f" m={p['order']}" if "order" in p and method in
                                                 ("taylorseer", "rfc") else "")
            extra = [f"{k}={p.get(k)}" for k in varying]
            if paths:
                extra.append("fused" if r["fused"] == "True" else "per-site")
            out[r["label"]] = name + (f" ({', '.join(extra)})" if extra else "")
    return out


def _params(row: dict) -> dict:
    """The row's method_params JSON as a dict ({} for a cell that is not one: an old or hand-edited row)."""
    try:
        params = json.loads(row["method_params"] or "{}")
    except ValueError:
        return {}
    return params if isinstance(params, dict) else {}


def short_label(row: dict, family: str) -> str:
    """A point's label: the variant name the sweep gave it, else (a run outside an experiment,
    whose label is the method and its JSON parameters) the family and its speed knobs."""
    if "{" not in row["label"]:
        return row["label"]
    p = _params(row)
    knobs = [f"{SPEED_SYMBOL[k]}={p[k]:.3g}" if isinstance(p[k], float) else f"{SPEED_SYMBOL[k]}={p[k]}"
             for k in SPEED_KNOBS if k in p]
    return " ".join([family, *knobs])


def plan_quality_speed(group: pd.DataFrame) -> SpeedPlan:
    """The quality-vs-speed plot of one table's rows (one setting, one seed, with_latency applied).

    x is the speedup over the table's full-compute row: measured (latency) when every row has one
    (a latency joined from a separate timing run, as the table joins it, marks its label with the
    table's dagger), else TFLOPs of full compute / the row's, else NFC of full compute / the row's; one kind for every
    point, never a mix. The y axes are the first MAX_PANELS of the table's quality metrics that a
    cached row has a value of. Metrics whose sample count is under MIN_SAMPLES go to ``small``."""
    first = group.iloc[0]
    n = int(float(first["num_samples"] or 0))
    plan = SpeedPlan(name=table_name(first), title=_caption(group), num_samples=n)
    rows = _rows(group)
    full = next((r for r in rows if r["is_full"]), None)
    if full is None:
        plan.why_not = "no full-compute row: no speedup to plot against"
        return plan
    cached = [r for r in rows if not r["is_full"]]
    plan.metrics = [m for m in figure_metrics(table_kind(group))
                    if m in rows[0] and any(_finite(r[m][0]) for r in cached)][:MAX_PANELS]
    if not cached or not plan.metrics:
        plan.why_not = "no cached row with a quality value"
        return plan
    floors = min_samples()
    plan.small = {m: floors[m] for m in plan.metrics if n < floors[m]}
    for kind, col in (("speedup", "speedup"), ("flops", "tflops"), ("nfc", "nfc")):
        if all(_finite(r[col][0]) and r[col][0] > 0 for r in rows):
            plan.x_kind = kind
            break
    else:
        plan.why_not = "rows without latency, TFLOPs or NFC"
        return plan
    timing = group["timing_desc"].iloc[-1] if "timing_desc" in group and plan.x_kind == "speedup" else ""
    plan.x_label = {
        "speedup": f"speedup over full compute (latency; {timing})",
        "flops": "speedup over full compute in FLOPs (TFLOPs of full compute / the row's; not every row timed)",
        "nfc": "speedup over full compute in NFC (full computations of full compute / the row's)",
    }[plan.x_kind]
    fam = families(rows)
    if plan.x_kind == "speedup" and any(r["joined"] for r in rows):
        plan.x_label += f"; {JOINED} latency from a separate timing run of the same method and timing setting"
    for r in rows:
        label = short_label(r, fam[r["label"]])
        if plan.x_kind == "speedup":
            x = r["speedup"][0]
            label += JOINED if r["joined"] else ""
        else:
            col = "tflops" if plan.x_kind == "flops" else "nfc"
            x = full[col][0] / r[col][0]
        values = {m: r[m][0] for m in plan.metrics if r[m][0] is not None and _finite(r[m][0])}
        plan.points.append(Point(label, fam[r["label"]], r["run_id"], r["is_full"], x, values))
    return plan


def family_lines(plan: SpeedPlan, metric: str) -> dict[str, list[Point]]:
    """The line of each method family on one panel: its variants that have the metric, in speed
    order (full compute is not on any line: it is marked on its own)."""
    out: dict[str, list[Point]] = {}
    for p in sorted((p for p in plan.points if not p.is_full and metric in p.values), key=lambda p: p.x):
        out.setdefault(p.family, []).append(p)
    return {name: out[name] for name in dict.fromkeys(p.family for p in plan.points) if name in out}


def draw_quality_speed(plan: SpeedPlan, path: Path) -> str:
    """Draw the plan to ``path`` (one panel per metric) and its manifest to the same name with
    .json. Full compute is a black star at speedup 1 with a dotted line at its value, or, for a
    metric measured against it (FID2FC, PSNR ...), a dotted vertical line at speedup 1 (it is that
    metric's reference). A metric under its sample floor gets "NOT MEANINGFUL" across its panel and
    in the title. Returns the title."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(plan.metrics), figsize=(8.4 * len(plan.metrics), 5.4), squeeze=False)
    names = list(dict.fromkeys(p.family for p in plan.points if not p.is_full))
    colors = {name: plt.get_cmap("tab10")(i % 10) for i, name in enumerate(names)}
    full = next(p for p in plan.points if p.is_full)
    for ax, metric in zip(axes[0], plan.metrics, strict=True):
        for name, pts in family_lines(plan, metric).items():
            ax.plot([p.x for p in pts], [p.values[metric] for p in pts], marker="o", ms=5, lw=1.2,
                    color=colors[name], label=name)
        if metric in full.values:
            ax.axhline(full.values[metric], color="black", ls=":", lw=0.9)
            ax.plot([full.x], [full.values[metric]], marker="*", ms=13, color="black", ls="none",
                    label="Full compute")
        else:
            ax.axvline(full.x, color="black", ls=":", lw=0.9, label="Full compute (the reference of this metric)")
        direction = "lower" if better(metric) < 0 else "higher"
        ax.set(xlabel=textwrap.fill(plan.x_label, 70), ylabel=f"{metric_name(metric)} ({direction} is better)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0.0)  # off the points
        if metric in plan.small:
            ax.text(0.5, 0.5, f"{SMALL}\n{plan.num_samples} samples < {plan.small[metric]:,}", transform=ax.transAxes,
                    ha="center", va="center", fontsize=20, color="red", alpha=0.35, rotation=20, weight="bold")
    title = plan.title
    if plan.small:
        title += f"\n{SMALL}: {plan.warning}"
    fig.suptitle(title, fontsize=10, color="red" if plan.small else "black")
    fig.tight_layout()
    for ax, metric in zip(axes[0], plan.metrics, strict=True):  # after the layout: label offsets are on-screen
        pts = [p for p in plan.points if metric in p.values and not p.is_full]
        place_labels(ax, [(p.x, p.values[metric]) for p in pts], [p.label for p in pts],
                     [colors[p.family] for p in pts], LABEL_SIZE)
    _save(fig, path, tight=True)
    atomic_write_text(path.with_suffix(".json"), json.dumps(plan.manifest(), indent=1) + "\n")
    return title


# ---------------------------------------------------------------------------------------------------


def _finite(value: float | None) -> bool:
    """A value that can be drawn: not missing (None, NaN) and not infinite (PSNR of identical images)."""
    return value is not None and not math.isnan(value) and not math.isinf(value)


def _num(value: float | None) -> float | None:
    """A JSON number, or null for a missing or infinite value (JSON has neither NaN nor inf)."""
    return float(value) if _finite(value) else None


def _pyplot():  # noqa: ANN202 - matplotlib.pyplot, imported on use (the Agg backend, no display)
    """matplotlib.pyplot on the Agg backend: figures are written to files, also where no display is."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def place_labels(ax: object, xy: list[tuple[float, float]], labels: list[str], colors: list[object],
                 size: float) -> list[object]:
    """Annotate each point with its label, right of the point, moved up or down (then to the left
    of the point) until its box stays inside the axes and overlaps no marker and no label placed
    before it: variants of nearly
    equal speed and quality (TaylorSeer N=7 and N=9) would otherwise print their names on top of each
    other. Boxes are the texts' rendered extents; labels are placed bottom to top. Returns the
    annotations."""
    fig = ax.figure  # type: ignore[attr-defined]
    renderer = fig.canvas.get_renderer()
    scale = fig.dpi / 72.0  # display pixels per point
    where = ax.transData.transform(np.asarray(xy, dtype=float)) / scale if xy else []  # type: ignore[attr-defined]
    notes = [ax.annotate(label, point, xytext=(4.0, 3.0), textcoords="offset points", fontsize=size,  # type: ignore[attr-defined]
                         color=color) for label, point, color in zip(labels, xy, colors, strict=True)]
    frame = ax.get_window_extent(renderer).extents / scale  # type: ignore[attr-defined]
    marker = 4.0  # points around each marker that no label may cover
    placed: list[tuple[float, float, float, float]] = [(x - marker, y - marker, x + marker, y + marker)
                                                       for x, y in where]
    for i in sorted(range(len(notes)), key=lambda j: (where[j][1], where[j][0])):
        extent = notes[i].get_window_extent(renderer)
        width, height = extent.width / scale + 2.0, extent.height / scale
        steps = [(4.0, 3.0 + k * (height + 1)) for k in (0, -1, 1, -2, 2, -3, 3)]
        options = [*steps, *((-4.0 - width, dy) for _, dy in steps)]
        for dx, dy in options:
            box = (where[i][0] + dx, where[i][1] + dy, where[i][0] + dx + width, where[i][1] + dy + height)
            inside = frame[0] <= box[0] and box[2] <= frame[2] and frame[1] <= box[1] and box[3] <= frame[3]
            if inside and not any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in placed):
                break
        else:
            dx, dy = steps[0]
            box = (where[i][0] + dx, where[i][1] + dy, where[i][0] + dx + width, where[i][1] + dy + height)
        placed.append(box)
        notes[i].xyann = (dx, dy)
    return notes


def _save(fig: object, path: Path, tight: bool = False) -> None:
    """Write the figure under a temporary name and rename it (a reader never sees half a PNG), then
    free it; ``tight`` crops to what was drawn (labels and legends outside the axes included)."""
    plt = _pyplot()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png", bbox_inches="tight" if tight else None)  # type: ignore[attr-defined]
    plt.close(fig)
