"""Writing result rows: the CSV table and W&B runs (the ``logger`` config group).

CSV appends happen under a file lock so parallel sweep jobs never interleave or lose rows; a file
written with other columns is widened, never truncated; a record torn by a crash is set aside
(in ``<csv>.torn``), never glued to the next row."""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock
from omegaconf import DictConfig

from rfc.files import atomic_write_text
from rfc.record import RunRecord, cell

LOG = logging.getLogger("rfc")


@dataclass
class CSVText:
    """A results CSV split into what is whole and what is not: ``header`` and ``rows`` are complete
    records (raw text, line ends kept); ``torn`` is every record that is not (the last line of a
    write cut short by a crash or a full disk, an unclosed quote, a wrong number of fields)."""

    header: str
    rows: list[str]
    torn: list[str]

    @property
    def columns(self) -> list[str]:
        return next(csv.reader([self.header])) if self.header else []

    @property
    def clean(self) -> str:
        return self.header + "".join(self.rows)


def split_csv(text: str) -> CSVText:
    """Records end at a newline outside quotes (the csv writer doubles quotes inside a field, so
    counting them tells inside from outside); a record is whole when it ends so and has as many
    fields as the header."""
    records, current, quotes = [], "", 0
    for line in text.splitlines(keepends=True):
        current += line
        quotes += line.count('"')
        if quotes % 2 == 0 and line.endswith("\n"):
            records.append(current)
            current, quotes = "", 0
    tail = [current] if current else []
    if not records:
        return CSVText("", [], tail)
    header, width = records[0], len(next(csv.reader([records[0]])))
    rows, torn = [], []
    for record in records[1:]:
        fields = next(csv.reader([record]), [])
        (rows if len(fields) == width else torn).append(record)
    return CSVText(header, rows, torn + tail)


def read_runs(path: str | Path) -> list[dict[str, str]]:
    """The complete rows of a results CSV (torn records skipped); [] when there is no file."""
    path = Path(path)
    if not path.exists():
        return []
    return list(csv.DictReader(io.StringIO(split_csv(read_raw(path)).clean, newline="")))


def read_raw(path: Path) -> str:
    """The file's text with its line ends as written (the csv module writes \\r\\n)."""
    return path.read_bytes().decode("utf-8")


def _set_aside(path: Path, parts: CSVText) -> None:
    """Move the torn records of ``path`` to ``<path>.torn`` (appended, never lost) and rewrite
    ``path`` with its complete rows only; reported once, since the file is whole afterwards."""
    side = path.with_name(path.name + ".torn")
    with side.open("a", encoding="utf-8", newline="") as f:
        f.write("".join(t if t.endswith("\n") else t + "\n" for t in parts.torn))
        f.flush()
        os.fsync(f.fileno())
    atomic_write_text(path, parts.clean)
    LOG.warning("%s: %d incomplete record(s) (a write cut short by a crash or a full disk) set aside in %s; "
                "the %d complete rows are intact", path, len(parts.torn), side, len(parts.rows))


def _row_text(columns: list[str], row: dict[str, str]) -> str:
    buf = io.StringIO()
    csv.DictWriter(buf, fieldnames=columns, restval="").writerow(row)
    return buf.getvalue()


def append_csv(path: str | Path, record: RunRecord) -> Path:
    """Append ``record`` as one row of ``path``, creating the file with a header if needed.

    Under a file lock (parallel sweep jobs never interleave). A torn last record left by an
    earlier crash is set aside first, so the new row never merges with it; the append itself is
    undone (the file truncated back) if it fails half-way, e.g. on a full disk."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    row = {k: cell(v) for k, v in record.as_dict().items()}
    with FileLock(str(path) + ".lock", timeout=120):
        text = read_raw(path) if path.exists() else ""
        parts = split_csv(text)
        if parts.torn:
            _set_aside(path, parts)
        if not parts.header:
            atomic_write_text(path, _row_text(list(row), {c: c for c in row}) + _row_text(list(row), row))
        elif parts.columns == list(row):
            _append_text(path, _row_text(list(row), row))
        else:  # columns changed between versions: rewrite with the union, keeping every cell
            old = list(csv.DictReader(io.StringIO(parts.clean, newline="")))
            columns = list(row) + [c for c in parts.columns if c not in row]
            body = _row_text(columns, {c: c for c in columns})
            body += "".join(_row_text(columns, r) for r in old) + _row_text(columns, row)
            atomic_write_text(path, body)
    return path


def _append_text(path: Path, text: str) -> None:
    size = path.stat().st_size
    with path.open("a", encoding="utf-8", newline="") as f:
        try:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        except BaseException as err:
            with contextlib.suppress(OSError):
                f.truncate(size)  # never leave half a row behind
            if isinstance(err, OSError) and err.filename is None:
                err.filename = str(path)
            raise


class CSVLogger:
    """The results table: one row per run in ``paths.runs_csv``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def log(self, record: RunRecord, out_dir: Path) -> str:
        append_csv(self.path, record)
        return f"row:     {self.path} (run_id {record.run_id})"


class WandbLogger:
    """One W&B run per job: the resolved config, the row as summary metrics, the run folder's PNGs
    (sample grid, plots), grouped by sweep. Offline mode writes a local run folder, no network."""

    def __init__(self, settings: dict, config: dict, sweep: str | None) -> None:
        import wandb

        self.wandb = wandb
        self.mode = os.environ.get("WANDB_MODE") or settings.get("mode", "offline")
        if self.mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.wandb.mode must be offline, online or disabled, got {self.mode!r}")
        if self.mode == "online" and not wandb.login(prompt=False, verify=False):
            raise ValueError("logger.wandb.mode=online but W&B has no credentials: run `wandb login` or set "
                             "WANDB_API_KEY (or use logger.wandb.mode=offline and `wandb sync` later)")
        self.settings, self.config, self.sweep = settings, config, sweep

    def log(self, record: RunRecord, out_dir: Path) -> str:
        wandb = self.wandb
        folder = Path(self.settings.get("dir") or out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        run = wandb.init(project=self.settings.get("project"), entity=self.settings.get("entity"), mode=self.mode,
                         dir=str(folder), name=record.run_id, group=Path(self.sweep).name if self.sweep else None,
                         job_type=record.experiment or "run", config=self.config, reinit="finish_previous")
        run.summary.update({k: v for k, v in record.as_dict().items() if v is not None})
        images = {p.stem: wandb.Image(str(p)) for p in sorted(out_dir.glob("*.png"))}
        if images:
            run.log(images)
        where = getattr(run, "dir", "")
        run.finish()
        return f"wandb:   {self.mode} run {record.run_id} ({where})"


def build_loggers(cfg: DictConfig, sweep: str | None = None) -> list:
    """Loggers named by the ``logger`` config group; checks (W&B credentials) happen here, before
    any sampling."""
    from omegaconf import OmegaConf

    loggers: list = []
    if cfg.logger.get("csv"):
        loggers.append(CSVLogger(cfg.paths.runs_csv))
    if cfg.logger.get("wandb"):
        settings = OmegaConf.to_container(cfg.logger.wandb, resolve=True)
        loggers.append(WandbLogger(settings, OmegaConf.to_container(cfg, resolve=True), sweep))
    return loggers
