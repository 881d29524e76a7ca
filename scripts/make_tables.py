"""The paper's tables from results/runs.csv, as Markdown and LaTeX.

    python scripts/make_tables.py                              # every experiment / setting, latest reruns
    python scripts/make_tables.py --experiment rfc_table1 --model dit-xl
    python scripts/make_tables.py --aggregate                  # mean +- std over seeds

One table per setting: the experiment and every key of rfc.run.setting.QUALITY_KEYS but the seed
(model, weights, sampler, steps, guidance, sample count, device, precision mode, compile, batch
size, extractor, reference), so rows of two settings are never mixed in one table. Columns: Method
| NFC | TFLOPs | Latency | Speedup | FID | sFID | FID2FC | sFID2FC | IS, the best value of a ranked
column bold and the second underlined (full compute is the reference and is not ranked).

Latency is a row's own when the run had its device to itself; otherwise it is joined from the
latest row of the same method (method, method_params, fused path) and the same timing setting
(rfc.run.setting.TIMING_KEYS, e.g. a serial ``eval=latency`` run after a parallel quality sweep; on a
CPU, where parallel workers run with fewer threads, one that differs only in its thread count when
none matches), marked with a dagger. Speedup = latency of full compute / the row's, both of the same timing
setting, never across devices, precisions, compile modes, batch sizes or CPU thread counts; the
caption names the setting. Reruns are told apart by run_id and time: the latest is used, or with
--aggregate the mean and standard deviation over seeds (latest rerun per seed). Numbers are the
CSV's, shown to 4 significant digits. Writes results/tables/<name>.md and <name>.tex (pandas'
Styler.to_latex: a booktabs table float, the caption's lines also as comments above it).
Quality-vs-speed plots are scripts/make_figures.py's (one labelled point per variant, one line per
method family, sample sets too small for their metric refused); a <name>_pareto.png that earlier
versions wrote beside a table is removed when the table is written again, since it joined different
methods' variants into one unlabelled line.

Text-to-image rows (a non-empty ``prompts`` column: the prompt set, sample i drawn from prompt i)
are tabled apart, one table per setting and prompt set, in the layout of RFC's Table 2: Method |
NFC | FLOPs (T) | Latency (s) | Speedup | PSNR | SSIM | LPIPS | ImageReward | CLIP. PSNR, SSIM and
LPIPS compare each image with full compute's from the same noise and prompt ("-" on the
full-compute row, their reference); a value the row does not have reads "missing", never "-" or 0,
so an unmeasured metric is not mistaken for a reference or a result, and the caption names the
prompt set and quotes the rows' notes on why. Same grouping, latency joining and speedup rules.

The metric columns are eval.registry's (a metric registered for a kind of table is a column of
it, after the built-in ones). The grouping, joining and rendering live in rfc/reports/tables.py
(the installed package), which scripts/make_figures.py reads the CSV through as well, so a figure
shows exactly its table's rows.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from eval.registry import T2I, T2V
from rfc.reports.tables import (
    MISSING,
    caption_of,
    paired_columns,
    read_table,
    render_latex,
    render_markdown,
    t2i_caption,
    table_columns,
    table_kind,
    table_name,
    table_rows,
    tables,
)
from rfc.utils.files import atomic_write_text

ROOT = Path(__file__).resolve().parents[1]


def remove_stale_pareto(out: Path, name: str) -> None:
    """Delete the <name>_pareto.png an earlier version wrote beside this table: it drew every
    variant of a method as one unlabelled line and plotted FID from any sample count, so leaving it
    next to a regenerated table would keep showing what the new plots refuse to."""
    stale = out / f"{name}_pareto.png"
    if stale.exists():
        stale.unlink()
        print(f"removed {stale} (quality-vs-speed plots: python scripts/make_figures.py)")


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
    try:
        table = read_table(args.csv, args.experiment, args.model)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if table.empty:
        print("error: no rows match the filters", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for group in tables(table, args.aggregate):
        name = table_name(group.iloc[0])
        kind = table_kind(group)
        columns = table_columns(kind)  # the costs, then the registered metrics of this kind of table
        rows = table_rows(group, args.aggregate, columns, paired_columns(kind))
        if kind in (T2I, T2V):
            caption, marks = t2i_caption(group, rows, args.aggregate)
            missing, what = MISSING, ", text-to-video" if kind == T2V else ", text-to-image"
        else:
            caption, marks = caption_of(group, rows, args.aggregate)
            missing, what = "-", ""
        atomic_write_text(args.out / f"{name}.md", render_markdown(rows, caption, marks, columns, missing))
        atomic_write_text(args.out / f"{name}.tex", render_latex(rows, caption, marks, columns, missing))
        print(f"wrote {args.out / name}.md, .tex ({len(rows)} methods{what})")
        remove_stale_pareto(args.out, name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
