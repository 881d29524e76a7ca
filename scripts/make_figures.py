"""The figures of every table from results/runs.csv: side-by-side samples and quality against speed.

    python scripts/make_figures.py                                    # every experiment / setting
    python scripts/make_figures.py --experiment rfc_table2 --samples 4
    python scripts/make_figures.py --runs results/runs.csv --out results/figures
    python scripts/make_figures.py --allow-small                      # draw small sample sets, marked
    python scripts/make_figures.py --keep-samples                     # and keep what a fresh clone redraws from

One pair of figures per table of scripts/make_tables.py, from the same rows (rfc.reports.tables: the first
seed, the latest rerun of each method, the same joined latencies and speedups), so a figure never
puts two settings side by side. See rfc/reports/figures.py for what each shows and why.

<out>/<table>_samples.png: rows are K sample indices, the same under every method (same noise and,
for text-to-image rows, the same prompt), columns the methods, full compute first, each titled with
its label, its run id and "NFC x, speedup y". Images come from each row's output_dir/samples.npz, or,
where that folder is not on this machine (a fresh clone: committed rows point at the run folders
of the machine that drew them), from the small set kept in results/samples/<run_id>.npz
(--keep-samples writes those when the figures are drawn); a row without either is skipped with a
printed line, and so is one whose labels differ from the first column's (other samples).

<out>/<table>_quality_speed.png: one labelled point per variant, one line per method family in
speed order, full compute marked; x = speedup over full compute (latency, else FLOPs or NFC), y =
the table's quality metrics. Refused (with a printed line, and any earlier plot of that table
removed) when the table's sample count is under the metric's floor (FID family: 1,000; per-image
means such as PSNR, ImageReward, CLIP: 100; rfc.reports.figures.MIN_SAMPLES); --allow-small draws it with
"NOT MEANINGFUL" in its title and across each such panel.

Each PNG gets a .json beside it naming the rows (run ids, sample folders, values) it was made from.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from rfc.reports.figures import (
    KEEP,
    KEPT_SAMPLES,
    draw,
    draw_quality_speed,
    keep_samples,
    plan_figure,
    plan_quality_speed,
)
from rfc.reports.tables import read_table, tables

ROOT = Path(__file__).resolve().parents[1]


def _remove(path: Path) -> None:
    """Delete a figure (and its .json) that the current rows no longer support, so a stale PNG
    cannot keep showing what the plot now refuses."""
    for p in (path, path.with_suffix(".json")):
        if p.exists():
            p.unlink()
            print(f"removed {p}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", "--csv", dest="runs", type=Path, default=ROOT / "results" / "runs.csv",
                   help="the results CSV (--csv, as make_tables names it)")
    p.add_argument("--experiment", default=None)
    p.add_argument("--model", default=None)
    p.add_argument("--out", type=Path, default=ROOT / "results" / "figures")
    p.add_argument("--samples", type=int, default=4, help="K: sample indices shown (rows of each comparison)")
    p.add_argument("--keep-samples", action="store_true",
                   help=f"also keep the first {KEEP} samples of every row drawn in {KEPT_SAMPLES}/<run_id>.npz, so a "
                        "fresh clone (whose rows point at this machine's run folders) can redraw the figures")
    p.add_argument("--kept", type=Path, default=ROOT / KEPT_SAMPLES, help="where kept samples are read and written")
    p.add_argument("--allow-small", action="store_true",
                   help="draw quality-vs-speed plots of too few samples too, marked NOT MEANINGFUL")
    args = p.parse_args(argv)
    if args.samples < 1:
        print(f"error: --samples must be at least 1, got {args.samples}", file=sys.stderr)
        return 2
    if not args.runs.exists():
        print(f"error: {args.runs} does not exist: run `python run.py` first", file=sys.stderr)
        return 2
    try:
        table = read_table(args.runs, args.experiment, args.model)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if table.empty:
        print("error: no rows match the filters", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for group in tables(table):
        plan = plan_figure(group, args.samples, args.kept)
        if not plan.columns or not plan.indices:
            first = f" ({plan.skipped[0][1]} ...)" if plan.skipped else ""
            print(f"no comparison figure for {plan.name}: none of its {len(plan.skipped)} rows has samples{first}")
        else:
            for label, why in plan.skipped:
                print(f"skipped {label!r} in {plan.name}: {why}")
            path = args.out / f"{plan.name}_samples.png"
            draw(plan, path)
            if args.keep_samples:
                for column in plan.columns:
                    if column.samples.parent.resolve() != args.kept.resolve():
                        keep_samples(column.samples, column.run_id, args.kept, k=max(KEEP, args.samples))
            print(f"wrote {path} ({len(plan.columns)} methods x {len(plan.indices)} samples)")

        speed = plan_quality_speed(group)
        path = args.out / f"{speed.name}_quality_speed.png"
        if speed.why_not:
            print(f"no quality-vs-speed plot for {speed.name}: {speed.why_not}")
        elif speed.small and not args.allow_small:
            print(f"no quality-vs-speed plot for {speed.name}: {speed.warning} is not meaningful "
                  "(--allow-small draws it, marked)")
            _remove(path)
        else:
            draw_quality_speed(speed, path)
            mark = f", marked NOT MEANINGFUL: {speed.warning}" if speed.small else ""
            print(f"wrote {path} ({len(speed.points)} points, x = {speed.x_kind}, "
                  f"y = {', '.join(speed.metrics)}{mark})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
