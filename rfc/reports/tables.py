"""The paper's tables from results/runs.csv, shared by scripts/make_tables.py (Markdown and LaTeX)
and scripts/make_figures.py (sample comparisons, quality-vs-speed plots).

Why one module: a figure must show exactly the rows its table shows (the same grouping into
settings, the same latest rerun, the same joined latencies and speedups), so both commands read the
CSV through these functions instead of each keeping a copy. It lives in the package, not under
scripts/, so that the scripts import it like any installed module (``pip install -e .``) and run
from any working directory.

One table per setting: the experiment and every key of rfc.run.setting.QUALITY_KEYS but the seed
(model, weights, sampler, steps, guidance, sample count, device, precision mode, compile, batch
size, extractor, reference) and, for text-to-image rows, the prompt set, so rows of two settings
are never mixed in one table. Latency is a row's own when the run had its device to itself;
otherwise it is joined from the latest row of the same method and timing setting (marked with a
dagger). Speedup = latency of full compute / the row's, both of the same timing setting.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd

from eval import registry
from eval.registry import CLASS, KINDS, T2I, T2V
from rfc.run.loggers import read_raw, split_csv
from rfc.run.setting import (
    METHOD_KEYS,
    QUALITY_KEYS,
    TIMING_KEYS,
    describe_sampling,
    describe_timing,
    setting_id,
)

TABLE_KEYS = ["experiment", *(k for k in QUALITY_KEYS if k != "seed")]
Column = tuple[str, str, int]  # (header, CSV column, better: -1 lower, +1 higher, 0 not ranked)
# the cost columns every table starts with; the metric columns after them are eval.registry's
COST_COLUMNS = {
    CLASS: [("NFC", "nfc", 0), ("TFLOPs", "tflops", 0), ("Latency (s)", "latency_s", -1), ("Speedup", "speedup", 1)],
    T2I: [("NFC", "nfc", 0), ("FLOPs (T)", "tflops", 0), ("Latency (s)", "latency_s", -1), ("Speedup", "speedup", 1)],
    T2V: [("NFC", "nfc", 0), ("FLOPs (T)", "tflops", 0), ("Latency (s)", "latency_s", -1), ("Speedup", "speedup", 1)],
}
# a table is one setting and, for text-to-image rows, one prompt set ("" for class-conditional rows)
GROUP_KEYS = [*TABLE_KEYS, *(["prompts"] if "prompts" not in TABLE_KEYS else [])]
TEXT = sorted({*GROUP_KEYS, *TIMING_KEYS, *METHOD_KEYS, "seed", "variant", "sweep", "time", "run_id", "notes",
               "output_dir"})


def table_columns(kind: str) -> list[Column]:
    """The columns of a table of ``kind`` (eval.registry.CLASS, T2I or T2V): the costs, then the
    registry's metrics of that table in their table order (class-conditional: RFC's Table 1,
    FID, sFID, FID2FC, sFID2FC, IS; text-to-image: its Table 2, PSNR, SSIM, LPIPS, ImageReward,
    CLIP; text-to-video: its Table 3, PSNR, SSIM, LPIPS, VBench), read when asked so that a metric
    registered since is a column too."""
    return [*COST_COLUMNS[kind], *((m.label, m.column, m.better) for m in registry.table_metrics(kind))]


def paired_columns(kind: str) -> tuple[str, ...]:
    """The metric columns of a ``kind`` table measured against full compute: '-' on its own row."""
    return tuple(m.column for m in registry.table_metrics(kind) if m.paired)


def numeric_columns() -> list[str]:
    """The columns a table reads as numbers (speedup is computed, not read)."""
    return list(dict.fromkeys(c for kind in KINDS for _, c, _ in table_columns(kind) if c != "speedup"))


def __getattr__(name: str) -> object:
    """The class-conditional (``COLUMNS``, ``PAIRED``) and text-to-image (``T2I_COLUMNS``,
    ``T2I_PAIRED``) layouts and ``NUMERIC``, as the registry has them now."""
    layouts = {"COLUMNS": lambda: table_columns(CLASS), "T2I_COLUMNS": lambda: table_columns(T2I),
               "PAIRED": lambda: paired_columns(CLASS), "T2I_PAIRED": lambda: paired_columns(T2I),
               "NUMERIC": numeric_columns}
    if name in layouts:
        return layouts[name]()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


MISSING = "missing"  # a text-to-image cell the row has no value for
JOINED = "\u2020"  # dagger: latency from a separate timing run of the same timing setting


def fmt(value: float) -> str:
    """4 significant digits; '-' for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if math.isinf(value):
        return "inf"
    return f"{value:.4g}"


def label_of(row: pd.Series) -> str:
    """A row's name in its table: the sweep's variant name, else the method and its parameters
    (a run outside an experiment has no other name that tells two settings of a method apart)."""
    if row.get("variant"):
        return row["variant"]
    params = row.get("method_params")
    return f"{row['method']} {params}" if params and params != "{}" else str(row["method"])


def load(csv_path: Path, experiment: str | None, model: str | None) -> pd.DataFrame:
    """The complete rows (torn records skipped), setting columns as their CSV text (so keys compare
    exactly as rfc.run.setting writes them; columns older CSVs lack are empty) and metrics as floats.
    Raises ValueError naming the file for an empty CSV, and naming the run and the column for a
    numeric cell that holds text (a table never shows such a cell as a silent '-')."""
    text = split_csv(read_raw(csv_path)).clean
    if not text.strip():
        raise ValueError(f"{csv_path} is empty (no header, no rows): run `python run.py` first, or point --csv at "
                         "a runs.csv")
    df = pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    numeric = numeric_columns()
    for col in {*TEXT, *numeric} - set(df.columns):
        df[col] = ""
    for col in numeric:  # every row checked, before the filters: one bad cell anywhere is named
        values = pd.to_numeric(df[col], errors="coerce")
        bad = df[(df[col] != "") & values.isna() & (df[col].str.lower() != "nan")]
        if len(bad):
            row = bad.iloc[0]
            raise ValueError(f"{csv_path}: run {row.get('run_id') or '(no run_id)'}: column {col} holds "
                             f"{row[col]!r}, not a number ({len(bad)} such cell(s) in that column); fix or remove "
                             "the row")
        df[col] = values
    df["experiment"] = df["experiment"].where(df["experiment"] != "", "runs")
    if experiment:
        df = df[df["experiment"] == experiment]
    if model:
        df = df[df["model"] == model]
    df = df.copy()
    df["label"] = df.apply(label_of, axis=1)
    df["is_full"] = df["method"] == "none"
    df["timing_key"] = df.apply(lambda r: setting_id(r, TIMING_KEYS), axis=1)
    df["join_key"] = df.apply(lambda r: setting_id(r, [k for k in TIMING_KEYS if k != "cpu_threads"]), axis=1)
    df["method_key"] = df.apply(lambda r: "|".join(r[k] for k in METHOD_KEYS), axis=1)
    return df.sort_values("time", kind="stable")


def latest(df: pd.DataFrame) -> pd.DataFrame:
    """The latest rerun of each (setting, method, seed). A table's row order is the order in which
    its methods first ran in that table (a sweep's order), not in the whole CSV: otherwise a
    method that appeared earlier in another experiment would jump ahead of its own sweep."""
    keys = [*GROUP_KEYS, "label"]
    first = df.reset_index(drop=True).groupby(keys, dropna=False, sort=False).ngroup()
    df = df.assign(_order=first.to_numpy())
    out = df.groupby([*keys, "fused", "seed"], dropna=False, sort=False).tail(1)
    return out.sort_values(["_order", "seed"], kind="stable").drop(columns="_order")


def with_latency(df: pd.DataFrame, every: pd.DataFrame) -> pd.DataFrame:
    """Fill the latency of rows that have none from the latest row of ``every`` with the same
    method and timing setting that has one (``latency_from`` names it; the row then carries that
    row's timing setting). A row drawn in parallel records the thread count its worker had, not
    the one a timing run uses, so when no timing run matches its thread count exactly, one that
    differs only in CPU threads is taken. Then the speedup: against full compute of the same timing
    setting and the same seed (so ``--aggregate``'s mean and std are over per-seed speedups), the
    table's own full-compute row where it was timed in that setting, else the latest full-compute
    row that was."""
    timed = every[every["latency_s"].notna()]
    # drop=False: a joined row takes its source's timing_key, which an index would take out of the columns
    exact = timed.groupby(["method_key", "timing_key"], sort=False).tail(1).set_index(["method_key", "timing_key"],
                                                                                     drop=False)
    loose = timed.groupby(["method_key", "join_key"], sort=False).tail(1).set_index(["method_key", "join_key"],
                                                                                   drop=False)
    out = df.copy()
    out["latency_from"] = ""
    out["timing_desc"] = out.apply(describe_timing, axis=1) if len(out) else ""
    for i, row in out.iterrows():
        if not math.isnan(row["latency_s"]):
            continue
        for table, key in ((exact, "timing_key"), (loose, "join_key")):
            if (row["method_key"], row[key]) in table.index:
                src = table.loc[(row["method_key"], row[key])]
                out.loc[i, ["latency_s", "latency_from", "timing_key", "timing_desc"]] = [
                    src["latency_s"], src["run_id"], src["timing_key"], describe_timing(src)]
                break
    # Each seed against its own full compute: a seed's latencies are divided by the full-compute
    # latency of the same seed (the table's own row of that seed where it was timed, else the
    # latest full-compute run of that seed and timing setting), and only without one by the
    # table's (or the timing setting's) latest full compute. ``out`` holds every table's rows, and
    # two tables (two experiments, or two sessions on different machines) can share a timing setting.
    full = timed[timed["is_full"]]
    full_by_seed = full.groupby(["timing_key", "seed"], sort=False).tail(1).set_index(["timing_key", "seed"])
    full_latest = full.groupby("timing_key", sort=False).tail(1).set_index("timing_key")
    own, own_latest = {}, {}
    for _, row in out[out["is_full"] & out["latency_s"].notna()].iterrows():
        own[(_table_of(row), row["seed"], row["timing_key"])] = row["latency_s"]
        own_latest[(_table_of(row), row["timing_key"])] = row["latency_s"]
    speedups = []
    for _, row in out.iterrows():
        table, key, seed = _table_of(row), row["timing_key"], row["seed"]
        for ref in (own.get((table, seed, key)), full_by_seed["latency_s"].get((key, seed)),
                    own_latest.get((table, key)), full_latest["latency_s"].get(key), np.nan):
            if ref is not None:
                break
        speedups.append(ref / row["latency_s"] if not math.isnan(row["latency_s"]) else np.nan)
    return out.assign(speedup=speedups)


def _table_of(row: pd.Series) -> tuple[str, ...]:
    """The table a row is shown in (its values of GROUP_KEYS)."""
    return tuple(str(row[k]) for k in GROUP_KEYS)


def is_t2i(group: pd.DataFrame) -> bool:
    """A text-to-image (or text-to-video) table: its rows name a prompt set (all of a table's rows
    share it)."""
    return bool(group["prompts"].iloc[0])


def table_kind(group: pd.DataFrame) -> str:
    """The kind of a table's rows (eval.registry.T2V for videos: its rows have frames; T2I; CLASS),
    which picks its columns: RFC's Table 3, 2 or 1."""
    if "frames" in group and str(group["frames"].iloc[0]):
        return T2V
    return T2I if is_t2i(group) else CLASS


def table_rows(group: pd.DataFrame, aggregate: bool, columns: list[Column] | None = None,
               paired: tuple[str, ...] | None = None) -> list[dict]:
    """One dict per method: label, is_full, per column (mean, std or None; (None, None) for a
    paired column on the full-compute row, its reference), whether its latency was joined from a
    timing run, the timing setting of its latency, its notes, run id and output folder (the latest
    rerun's: what scripts/make_figures.py shows), and its method, method_params, code path and
    sample count (what the quality-vs-speed plot groups into families and checks)."""
    columns = table_columns(CLASS) if columns is None else columns
    paired = paired_columns(CLASS) if paired is None else paired
    rows = []
    variants = group.groupby("label", sort=False)["fused"].nunique()
    for (label, fused), g in group.groupby(["label", "fused"], sort=False):
        if variants[label] > 1:  # the same method through both code paths: say which is which
            label = f"{label} ({'fused' if fused == 'True' else 'per-site'})"
        row = {"label": label, "is_full": bool(g["is_full"].iloc[0]), "seeds": len(g),
               "joined": bool((g["latency_from"] != "").any()),
               "timing": g["timing_key"].iloc[-1] if g["latency_s"].notna().any() else None,
               "notes": g["notes"].iloc[-1], "run_id": g["run_id"].iloc[-1], "output_dir": g["output_dir"].iloc[-1],
               "method": g["method"].iloc[-1], "method_params": g["method_params"].iloc[-1], "fused": fused,
               "num_samples": g["num_samples"].iloc[-1]}
        for _, col, _ in columns:
            values = g[col].astype(float)
            if row["is_full"] and col in paired:
                row[col] = (None, None)  # full compute is the reference of these columns
                continue
            if aggregate:
                row[col] = (values.mean(), values.std(ddof=1) if len(values) > 1 else 0.0)
            else:
                row[col] = (values.iloc[-1], None)
        rows.append(row)
    return rows


def ranks(rows: list[dict], columns: list[Column] | None = None) -> dict[tuple[int, str], int]:
    """(row index, column) -> 1 for best, 2 for second, among the non-full rows."""
    out = {}
    columns = table_columns(CLASS) if columns is None else columns
    for _, col, better in columns:
        if better == 0:
            continue
        cand = [(i, r[col][0]) for i, r in enumerate(rows)
                if not r["is_full"] and r[col][0] is not None and not math.isnan(r[col][0])]
        cand.sort(key=lambda t: -better * t[1])
        for rank, (i, _) in enumerate(cand[:2], start=1):
            out[(i, col)] = rank
    return out


def cell_text(value: tuple[float | None, float | None], col: str, rank: int | None, latex: bool,
              missing: str = "-") -> str:
    """A cell: "-" for a reference cell (mean None), ``missing`` for a value the row lacks (NaN).
    Markdown marks the best (rank 1) bold and the second underlined in the text itself; LaTeX
    leaves that to the Styler (render_latex), so ``rank`` is ignored there."""
    mean, std = value
    text = fmt(mean)
    if text == "-" and mean is not None:
        text = missing
    if text in ("-", missing):
        return text
    text += "x" if col == "speedup" else ""
    if std is not None:
        text += (r" $\pm$ " if latex else " ± ") + fmt(std)
    if latex:
        return text
    if rank == 1:
        return f"**{text}**"
    if rank == 2:
        return f"<u>{text}</u>"
    return text


def _cells(rows: list[dict], columns: list[Column], latex: bool, marks: dict[str, str] | None,
           missing: str, rk: dict[tuple[int, str], int]) -> list[list[str]]:
    """The table's cells as text, a list per row: label, then one per column (latency with its
    dagger when joined and its timing letter when the table mixes timing settings)."""
    dagger = r"$^\dagger$" if latex else JOINED
    out = []
    for i, r in enumerate(rows):
        cells = [r["label"]]
        for _, col, _ in columns:
            text = cell_text(r[col], col, rk.get((i, col)), latex, missing)
            if col == "latency_s" and text not in ("-", missing):
                text += (dagger if r["joined"] else "") + ((marks or {}).get(r["timing"], ""))
            cells.append(text)
        out.append(cells)
    return out


def render_markdown(rows: list[dict], caption: list[str], marks: dict[str, str] | None = None,
                    columns: list[Column] | None = None, missing: str = "-") -> str:
    """The table as Markdown: the caption's first line bold above it, the others as lines."""
    columns = table_columns(CLASS) if columns is None else columns
    rk = ranks(rows, columns)
    headers = ["Method", *[h for h, _, _ in columns]]
    lines = [f"**{caption[0]}**", "", *(f"{line}  " for line in caption[1:]), "",
             "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(cells) + " |" for cells in _cells(rows, columns, False, marks, missing, rk)]
    return "\n".join(lines) + "\n"


def render_latex(rows: list[dict], caption: list[str], marks: dict[str, str] | None = None,
                 columns: list[Column] | None = None, missing: str = "-") -> str:
    """The table as a LaTeX float through pandas' ``Styler.to_latex`` (booktabs rules, best bold
    and second underlined as Styler ``--rwrap`` commands, labels and headers escaped by the
    Styler), the first caption line as its \\caption and every caption line above it as a comment,
    so the provenance stays with the file when the float is pasted into a paper."""
    columns = table_columns(CLASS) if columns is None else columns
    rk = ranks(rows, columns)
    headers = ["Method", *[h for h, _, _ in columns]]
    frame = pd.DataFrame(_cells(rows, columns, True, marks, missing, rk), columns=headers)
    style = pd.DataFrame("", index=frame.index, columns=headers)
    for (i, col), rank in rk.items():
        header = next(h for h, c, _ in columns if c == col)
        style.loc[i, header] = "textbf: --rwrap;" if rank == 1 else "underline: --rwrap;"
    styler = (frame.style.hide(axis="index")
              .apply(lambda _: style, axis=None)
              .format(escape="latex", subset=["Method"])
              .format_index(escape="latex", axis="columns"))
    body = styler.to_latex(hrules=True, column_format="l" + "r" * len(columns), position_float="centering",
                           caption=_escape(caption[0]).replace("±", r"$\pm$"))
    return "\n".join([*(f"% {line}" for line in caption), body.rstrip("\n")]) + "\n"


def render(rows: list[dict], caption: list[str], latex: bool, marks: dict[str, str] | None = None,
           columns: list[Column] | None = None, missing: str = "-") -> str:
    """The table in one format (``latex`` or Markdown). ``marks``: a letter per timing setting
    when the table's latencies come from more than one; ``missing``: what a cell without a value
    reads."""
    return (render_latex if latex else render_markdown)(rows, caption, marks, columns, missing)


def caption_of(group: pd.DataFrame, rows: list[dict], aggregate: bool) -> tuple[list[str], dict[str, str]]:
    """What the table compares, line by line: the setting every row shares, how its quality was
    measured, and what its latencies and speedups were measured on."""
    first = group.iloc[0]
    seeds = "mean ± std over seeds" if aggregate else f"seed {first['seed']}"
    lines = [f"{first['experiment']}: {first['model']} {first['image_size']}px, {first['sampler'].upper()}-"
             f"{first['num_steps']}, CFG {float(first['cfg_scale']):g}, {first['num_samples']} samples, {seeds}",
             f"Samples drawn on {describe_sampling(first)}; weights {first['checkpoint'] or 'unrecorded'}"
             + ("." if aggregate or not first["setting_id"] else f"; setting {first['setting_id']} (its full-compute "
                f"set: <paths.store>/full_compute/{first['setting_id']}).")]
    if first["extractor"]:
        paired = " / ".join(m.label for m in registry.table_metrics(CLASS) if m.paired)
        lines.append(f"Quality in the {first['extractor']} feature space against {first['reference']}"
                     + (f"; {paired} against full compute of this setting (same noise)." if paired else "."))
    timing_lines, marks = _timing_caption(group, rows)
    return lines + timing_lines, marks


def _timing_caption(group: pd.DataFrame, rows: list[dict]) -> tuple[list[str], dict[str, str]]:
    """The caption's lines on latency: what it was measured on, and which latencies were joined."""
    lines = []
    timings = list(dict.fromkeys(r["timing"] for r in rows if r["timing"] is not None))
    marks = {t: chr(ord("a") + i) for i, t in enumerate(timings)} if len(timings) > 1 else {}
    if timings:
        desc = {k: group.loc[group["timing_key"] == k, "timing_desc"].iloc[-1] for k in timings}
        where = "; ".join(f"{marks[t]}: {desc[t]}" if marks else desc[t] for t in timings)
        lines.append(f"Latency: seconds per batch ({where}). Speedup = full-compute latency / the row's, both of "
                     "the same timing setting (device, CPU threads, precision, compile, batch size).")
    if any(r["joined"] for r in rows):
        lines.append(f"{JOINED} latency from a separate timing run (e.g. eval=latency) of the same method and timing "
                     "setting: the quality run recorded none of its own.")
    return lines, marks


def t2i_caption(group: pd.DataFrame, rows: list[dict], aggregate: bool) -> tuple[list[str], dict[str, str]]:
    """A text-to-image (or text-to-video) table's caption: the setting and the prompt set, what the
    metrics compare, the latency lines, and why cells read "missing" where the rows' notes say."""
    first = group.iloc[0]
    kind = table_kind(group)
    frames = f" x {first['frames']} frames" if kind == T2V else ""
    seeds = "mean ± std over seeds" if aggregate else f"seed {first['seed']}"
    guidance = f", guidance {float(first['cfg_scale']):g}" if first["cfg_scale"] else ""
    lines = [f"{first['experiment']}: {first['model']} {first['image_size']}px{frames}, {first['sampler'].upper()}-"
             f"{first['num_steps']}{guidance}, {first['num_samples']} samples, sample i from prompt i of "
             f"{first['prompts']}, {seeds}",
             f"Samples drawn on {describe_sampling(first)}; weights {first['checkpoint'] or 'unrecorded'}"
             + ("." if aggregate or not first["setting_id"] else f"; setting {first['setting_id']} (its full-compute "
                f"set: <paths.store>/full_compute/{first['setting_id']})."),
             _t2i_metrics_line(kind)]
    timing_lines, marks = _timing_caption(group, rows)
    lines += timing_lines
    reasons: dict[str, list[str]] = {}
    for r in rows:
        gaps = {col for _, col, _ in table_columns(kind) if r[col][0] is not None and math.isnan(r[col][0])}
        if gaps == {"speedup"}:  # the row was timed, its table's full compute was not
            reasons.setdefault("speedup: no full-compute latency of the same timing setting", []).append(r["label"])
        elif gaps:
            said = [c.strip() for c in str(r["notes"] or "").split(";")
                    if any(w in c for w in ("missing", "not measured", "not scored"))
                    and "their reference" not in c]  # the caption already says full compute is the reference
            for clause in said or ["no reason in the row's notes"]:
                reasons.setdefault(clause, []).append(r["label"])
    for clause, labels in reasons.items():
        lines.append(f"{MISSING.capitalize()} ({', '.join(labels)}): {clause}.")
    return lines, marks


def _t2i_metrics_line(kind: str = T2I) -> str:
    """What a text-to-image (text-to-video) table's metric columns compare: the paired ones with full
    compute (per frame for videos), the others each image (video) with its prompt (their axis names)."""
    shown = registry.table_metrics(kind)
    sample, per_frame = ("video", " per frame") if kind == T2V else ("image", "")
    paired = " / ".join(m.label for m in shown if m.paired)
    own = [m.axis for m in shown if not m.paired]
    own_text = ", ".join(own[:-1]) + f" and {own[-1]}" if len(own) > 1 else "".join(own)
    parts = ([f"{paired}{per_frame} against full compute of this setting (same noise and prompt; '-' on the "
              "full-compute row, their reference)"] if paired else []) + (
        [f"{own_text} of each {sample} with its prompt"] if own else [])
    return "; ".join(parts) + "."


def table_name(first: pd.Series) -> str:
    compiled = "-compile" if first["compile"] == "True" else ""
    if first["prompts"]:  # text-to-image: the prompt set is part of the setting (and guidance may be unset)
        cfg = f"{float(first['cfg_scale']):g}" if first["cfg_scale"] else "-"
        return (f"{first['experiment']}_{first['model']}_{first['image_size']}px_{first['sampler']}"
                f"{first['num_steps']}_cfg{cfg}_n{first['num_samples']}_{first['precision_mode'] or 'unknown'}"
                f"{compiled}_b{first['batch_size']}_{setting_id(first, GROUP_KEYS)[:6]}")
    return (f"{first['experiment']}_{first['model']}_{first['image_size']}px_{first['sampler']}{first['num_steps']}"
            f"_cfg{float(first['cfg_scale']):g}_n{first['num_samples']}_{first['precision_mode'] or 'unknown'}"
            f"{compiled}_b{first['batch_size']}_{setting_id(first, TABLE_KEYS)[:6]}")


def _escape(text: str) -> str:
    """LaTeX-safe text for the caption (the Styler escapes the cells itself)."""
    return re.sub(r"([_&%#{}$])", r"\\\1", text)


def read_table(csv_path: Path, experiment: str | None = None, model: str | None = None) -> pd.DataFrame:
    """Every row a table shows: the latest rerun of each (setting, method, seed), with latencies
    joined and speedups computed. Empty when no row matches."""
    df = load(csv_path, experiment, model)
    return with_latency(latest(df), df) if len(df) else df


def tables(table: pd.DataFrame, aggregate: bool = False) -> Iterator[pd.DataFrame]:
    """The rows of each table (one setting, and one prompt set for text-to-image rows), in CSV
    order; without ``aggregate`` only the first seed's rows, since a table of one seed shows one
    run per method."""
    for _, group in table.groupby(GROUP_KEYS, sort=False):
        if not aggregate and group["seed"].nunique() > 1:
            group = group[group["seed"] == group["seed"].iloc[0]]
        yield group
