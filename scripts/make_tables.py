"""The paper's tables and Pareto plots from results/runs.csv.

    python scripts/make_tables.py                              # every experiment / setting, latest reruns
    python scripts/make_tables.py --experiment rfc_table1 --model dit-xl
    python scripts/make_tables.py --aggregate                  # mean +- std over seeds

One table per setting (experiment, model, image size, sampler, steps, guidance, sample count):
Method | NFC | TFLOPs | Latency | Speedup | FID | sFID | FID2FC | sFID2FC | IS, the best value of a
column bold and the second underlined (full compute is the reference and is not ranked), speedup
= the full-compute row's latency / the row's (same setting and seed). Reruns of one configuration
are told apart by run_id and time: the latest is used, or with --aggregate the mean and standard
deviation over seeds (latest rerun per seed). Numbers are the CSV's, shown to 4 significant digits.
Writes results/tables/<name>.md, .tex and <name>_pareto.png (FID and sFID against TFLOPs and
against latency, one curve per method).
"""

from __future__ import annotations

import argparse
import io
import math
import re
import sys
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from eval.loggers import read_raw, split_csv  # noqa: E402
from rfc.files import atomic_path, atomic_write_text  # noqa: E402

SETTING = ["experiment", "model", "image_size", "sampler", "num_steps", "cfg_scale", "num_samples"]
# (header, CSV column, better: -1 lower, +1 higher, 0 not ranked)
COLUMNS = [("NFC", "nfc", 0), ("TFLOPs", "tflops", 0), ("Latency (s)", "latency_s", -1), ("Speedup", "speedup", 1),
           ("FID", "fid", -1), ("sFID", "sfid", -1), ("FID2FC", "fid2fc", -1), ("sFID2FC", "sfid2fc", -1),
           ("IS", "inception_score", 1)]


PAIRED = ("fid2fc", "sfid2fc")


def fmt(value: float) -> str:
    """4 significant digits; '-' for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.4g}"


def label_of(row: pd.Series) -> str:
    if isinstance(row.get("variant"), str) and row["variant"]:
        return row["variant"]
    params = row.get("method_params")
    return f"{row['method']} {params}" if isinstance(params, str) and params not in ("", "{}") else str(row["method"])


def load(csv_path: Path, experiment: str | None, model: str | None) -> pd.DataFrame:
    df = pd.read_csv(io.StringIO(split_csv(read_raw(csv_path)).clean))  # torn records skipped
    for col in ("experiment", "variant", "sweep"):
        if col not in df:
            df[col] = np.nan
    df["experiment"] = df["experiment"].astype(object).where(df["experiment"].notna(), "runs")
    if experiment:
        df = df[df["experiment"] == experiment]
    if model:
        df = df[df["model"] == model]
    df = df.copy()
    df["label"] = df.apply(label_of, axis=1)
    df["is_full"] = df["method"] == "none"
    return df.sort_values("time", kind="stable")


def latest(df: pd.DataFrame) -> pd.DataFrame:
    """The latest rerun of each (setting, label, seed); table order = first appearance."""
    order = {lab: i for i, lab in enumerate(dict.fromkeys(df["label"]))}
    out = df.groupby([*SETTING, "label", "seed"], dropna=False, sort=False).tail(1)
    return out.assign(_order=out["label"].map(order)).sort_values(["_order", "seed"]).drop(columns="_order")


def with_speedup(df: pd.DataFrame) -> pd.DataFrame:
    full = df[df["is_full"]].set_index([*SETTING, "seed"])["latency_s"]
    keys = list(zip(*[df[c] for c in [*SETTING, "seed"]], strict=True))
    base = [full.get(k, np.nan) if not isinstance(full.get(k, np.nan), pd.Series) else full.get(k).iloc[-1]
            for k in keys]
    return df.assign(speedup=np.asarray(base, dtype=float) / df["latency_s"].astype(float))


def table_rows(group: pd.DataFrame, aggregate: bool) -> list[dict]:
    """One dict per method: label, is_full, and per column (mean, std or None)."""
    rows = []
    for label, g in group.groupby("label", sort=False):
        row = {"label": label, "is_full": bool(g["is_full"].iloc[0]), "seeds": len(g)}
        for _, col, _ in COLUMNS:
            values = g[col].astype(float)
            if row["is_full"] and col in PAIRED:
                row[col] = (float("nan"), None)  # full compute is the reference of these columns
                continue
            if aggregate:
                row[col] = (values.mean(), values.std(ddof=1) if len(values) > 1 else 0.0)
            else:
                row[col] = (values.iloc[-1], None)
        rows.append(row)
    return rows


def ranks(rows: list[dict]) -> dict[tuple[int, str], int]:
    """(row index, column) -> 1 for best, 2 for second, among the non-full rows."""
    out = {}
    for _, col, better in COLUMNS:
        if better == 0:
            continue
        cand = [(i, r[col][0]) for i, r in enumerate(rows)
                if not r["is_full"] and r[col][0] is not None and not math.isnan(r[col][0])]
        cand.sort(key=lambda t: -better * t[1])
        for rank, (i, _) in enumerate(cand[:2], start=1):
            out[(i, col)] = rank
    return out


def cell_text(value: tuple[float, float | None], col: str, rank: int | None, latex: bool) -> str:
    mean, std = value
    text = fmt(mean) + ("x" if col == "speedup" and fmt(mean) != "-" else "")
    if std is not None and fmt(mean) != "-":
        text += (r" $\pm$ " if latex else " ± ") + fmt(std)
    if rank == 1:
        return rf"\textbf{{{text}}}" if latex else f"**{text}**"
    if rank == 2:
        return rf"\underline{{{text}}}" if latex else f"<u>{text}</u>"
    return text


def render(rows: list[dict], title: str, latex: bool) -> str:
    rk = ranks(rows)
    headers = ["Method", *[h for h, _, _ in COLUMNS]]
    lines = []
    if latex:
        lines += [f"% {title}", r"\begin{tabular}{l" + "r" * len(COLUMNS) + "}", r"\toprule",
                  " & ".join(headers) + r" \\", r"\midrule"]
    else:
        lines += [f"**{title}**", "", "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for i, r in enumerate(rows):
        cells = [_escape(r["label"]) if latex else r["label"]]
        cells += [cell_text(r[col], col, rk.get((i, col)), latex) for _, col, _ in COLUMNS]
        lines.append(" & ".join(cells) + r" \\" if latex else "| " + " | ".join(cells) + " |")
    if latex:
        lines += [r"\bottomrule", r"\end{tabular}"]
    return "\n".join(lines) + "\n"


def _escape(text: str) -> str:
    return re.sub(r"([_&%#{}$])", r"\\\1", text)


def pareto_plot(group: pd.DataFrame, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    metrics = [m for m in ("fid", "sfid") if group[m].notna().any()]
    if not metrics:
        return
    fig, axes = plt.subplots(len(metrics), 2, figsize=(10, 3.6 * len(metrics)), squeeze=False)
    for r, metric in enumerate(metrics):
        for c, cost in enumerate(("tflops", "latency_s")):
            ax = axes[r][c]
            for method, g in group.groupby("method", sort=False):
                g = g.sort_values(cost)
                ax.plot(g[cost], g[metric], marker="o", label=method)
            ax.set(xlabel="TFLOPs / image" if cost == "tflops" else "latency (s / batch)", ylabel=metric.upper())
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--csv", type=Path, default=ROOT / "results" / "runs.csv")
    p.add_argument("--out", type=Path, default=ROOT / "results" / "tables")
    p.add_argument("--experiment", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--aggregate", action="store_true", help="mean +- std over seeds instead of one seed")
    args = p.parse_args(argv)
    if not args.csv.exists():
        print(f"error: {args.csv} does not exist: run `python run.py` first", file=sys.stderr)
        return 2
    df = load(args.csv, args.experiment, args.model)
    if df.empty:
        print("error: no rows match the filters", file=sys.stderr)
        return 2
    df = with_speedup(latest(df))
    args.out.mkdir(parents=True, exist_ok=True)
    for key, group in df.groupby(SETTING, dropna=False, sort=False):
        exp, model, size, sampler, steps, cfg_scale, n = key
        name = f"{exp}_{model}_{size}px_{sampler}{int(steps)}_cfg{cfg_scale:g}_n{int(n)}"
        if not args.aggregate and group["seed"].nunique() > 1:
            group = group[group["seed"] == group["seed"].iloc[0]]
        title = (f"{exp}: {model} {size}px, {sampler.upper()}-{int(steps)}, CFG {cfg_scale:g}, {int(n)} samples"
                 + (", mean ± std over seeds" if args.aggregate else f", seed {int(group['seed'].iloc[0])}"))
        rows = table_rows(group, args.aggregate)
        atomic_write_text(args.out / f"{name}.md", render(rows, title, latex=False))
        atomic_write_text(args.out / f"{name}.tex", render(rows, title, latex=True))
        pareto_plot(group, args.out / f"{name}_pareto.png", title)
        print(f"wrote {args.out / name}.md, .tex, _pareto.png ({len(rows)} methods)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
