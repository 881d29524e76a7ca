"""Writing result rows: the CSV table and W&B runs (the ``logger`` config group).

CSV appends happen under a file lock so parallel sweep jobs never interleave or lose rows; a file
written with other columns is widened, never truncated; a record torn by a crash is set aside
(in ``<csv>.torn``), never glued to the next row.

A logger follows the whole job, not only its row (:class:`JobLogger`): the runner opens it once
the job holds its run folder, tells it of every sampling batch, hands it the row, and closes it
however the job ends (:func:`logging_job`). The CSV needs only the row; a W&B run opens with the
job, shows its progress live and finishes with the job's exit code. wandb is imported only when
the ``logger`` group asks for it.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from rfc.run.row import RunRecord, cell
from rfc.run.runlog import LOG_FILE, wandb_mode
from rfc.run.setting import setting_id
from rfc.utils.errors import exit_code, one_line
from rfc.utils.files import atomic_write_text

if TYPE_CHECKING:
    from rfc.run.build import RunPlan
    from rfc.run.runlog import BatchReport

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
    """Append ``text`` whole or not at all: written with the file descriptor itself (a buffered
    file would retry its flush on the truncate and on close, and fail again on a full disk,
    leaving the part that reached the disk), and truncated back to its old size on any failure."""
    fd = os.open(path, os.O_WRONLY | os.O_APPEND)
    try:
        size = os.fstat(fd).st_size
        try:
            view = memoryview(text.encode("utf-8"))
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        except BaseException as err:
            with contextlib.suppress(OSError):
                os.ftruncate(fd, size)  # never leave half a row behind
            if isinstance(err, OSError) and err.filename is None:
                err.filename = str(path)
            raise
    finally:
        os.close(fd)


class JobLogger:
    """A logger of one job: opened when the job holds its folder (``start``), told of each
    sampling batch (``progress``), handed the row (``log``, which returns the line to print), and
    closed when the job ends (``finish``, with the exception that ended it, or None)."""

    def start(self, plan: RunPlan, sweep: str | None) -> None:
        """The job has begun (after planning, before the model is built)."""

    def progress(self, report: BatchReport) -> None:
        """A sampling batch finished."""

    def log(self, record: RunRecord, out_dir: Path) -> str:
        raise NotImplementedError

    def finish(self, error: BaseException | None) -> None:
        """The job has ended: done (None) or failed with ``error``."""


@contextlib.contextmanager
def logging_job(loggers: Sequence[JobLogger], plan: RunPlan, sweep: str | None) -> Iterator[None]:
    """Start ``loggers`` for the job run inside, and finish each however the job ends. A logger
    that fails to finish after the job failed is reported as a warning: the job's own error is
    the one to show."""
    started: list[JobLogger] = []
    try:
        for logger in loggers:
            logger.start(plan, sweep)
            started.append(logger)
        yield
    except BaseException as err:
        for logger in started:
            try:
                logger.finish(err)
            except Exception as problem:  # noqa: BLE001 - the job's error matters more
                LOG.warning("%s could not finish: %s", type(logger).__name__, problem)
        raise
    for logger in started:
        logger.finish(None)


class CSVLogger(JobLogger):
    """The results table: one row per run in ``paths.runs_csv``."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def log(self, record: RunRecord, out_dir: Path) -> str:
        append_csv(self.path, record)
        return f"row:     {self.path} (run_id {record.run_id})"


# Short names of the hyperparameters that tell variants of a method apart, for W&B run names
KEY_PARAMS = {"tau": "tau", "order": "m", "interval": "N", "fresh_ratio": "R", "threshold": "thr"}


def run_name(cfg: DictConfig, method: str, params: dict[str, object]) -> str:
    """A W&B run's display name: ``<model>/<variant>`` for an experiment's variant, else
    ``<model>/<method> <key settings>`` ("dit-tiny/rfc tau=0.1 m=2"): what a person scanning a
    project's runs needs to tell them apart. (RFC's fixed interval counts only without RCS.)"""
    model = str(cfg.model.name)
    if cfg.get("variant_name"):
        return f"{model}/{cfg.variant_name}"
    shown = {k: v for k, v in params.items() if k in KEY_PARAMS and not (k == "interval" and params.get("rcs"))}
    settings = " ".join(f"{KEY_PARAMS[k]}={v:g}" if isinstance(v, float) else f"{KEY_PARAMS[k]}={v}"
                        for k, v in shown.items())
    return f"{model}/{method}" + (f" {settings}" if settings else "")


def run_group(cfg: DictConfig, sweep: str | None) -> str | None:
    """Runs that belong together: a sweep's jobs form one group (named by the experiment, if
    any, and the sweep folder's date and time), a single run of an experiment joins the
    experiment's group, any other run stands alone."""
    experiment = cfg.get("experiment_name")
    if sweep:
        return f"{experiment or 'sweep'} {'/'.join(Path(sweep).parts[-2:])}"
    return str(experiment) if experiment else None


def run_tags(plan: RunPlan) -> list[str]:
    """Filterable facts of the run: model, method, experiment, sampler, precision, device."""
    cfg = plan.cfg
    tags = [str(cfg.model.name), plan.method.name, str(cfg.get("experiment_name") or ""), plan.sampler.name,
            str(cfg.precision), plan.device.type, "resumed" if cfg.get("resume") else ""]
    return list(dict.fromkeys(t for t in tags if t))


class WandbLogger(JobLogger):
    """One W&B run per job, open for the job's whole life: the resolved config, name, tags and
    group at the start; samples done and images/s after every batch while sampling; at the end
    the row's metrics as the summary, the sample grid as an image (a video row's preview as a
    video), the row as a table, and the
    run's run.log among its files. It finishes with the job's exit code (rfc.run.cli.exit_code), so
    a failed or interrupted job shows as failed. Offline mode writes a local run folder, no
    network; ``wandb sync`` uploads it later."""

    def __init__(self, settings: dict, config: dict, sweep: str | None) -> None:
        import wandb

        self.wandb = wandb
        self.mode = wandb_mode(settings)
        if self.mode not in ("offline", "online", "disabled"):
            raise ValueError(f"logger.wandb.mode must be offline, online or disabled, got {self.mode!r}")
        if self.mode == "online" and not wandb.login(prompt=False, verify=False):
            raise ValueError("logger.wandb.mode=online but W&B has no credentials: run `wandb login` or set "
                             "WANDB_API_KEY (or use logger.wandb.mode=offline and `wandb sync` later)")
        self.settings, self.config, self.sweep = settings, config, sweep
        self.run = None
        self.log_file: Path | None = None
        self.progress_failed = False

    def start(self, plan: RunPlan, sweep: str | None) -> None:

        wandb = self.wandb
        folder = Path(self.settings.get("dir") or plan.out_dir)
        folder.mkdir(parents=True, exist_ok=True)
        harness = {"out_dir": str(plan.out_dir), "sweep": sweep, "setting_id": setting_id(plan.setting),
                   "method_params": plan.method.params()}
        self.run = wandb.init(
            project=self.settings.get("project"), entity=self.settings.get("entity"), mode=self.mode,
            dir=str(folder), name=run_name(plan.cfg, plan.method.name, plan.method.params()),
            group=run_group(plan.cfg, sweep), job_type="full-compute" if plan.method.computes_everything else "cached",
            tags=run_tags(plan), config={**self.config, "harness": harness}, reinit="finish_previous",
            settings=wandb.Settings(console=str(self.settings.get("console") or "off")))
        for stage in ("sampling", "pairing"):
            self.run.define_metric(f"{stage}/*", step_metric=f"{stage}/samples_done")
        self.log_file = plan.out_dir / LOG_FILE
        LOG.info("wandb: %s run %r opened in %s", self.mode, self.run.name, self._folder())

    def _folder(self) -> str:
        """The run's local folder (what ``wandb sync`` takes), or '' when W&B is disabled."""
        where = getattr(self.run, "dir", "") or ""
        return str(Path(where).parent) if where and self.mode != "disabled" else ""

    def progress(self, report: BatchReport) -> None:
        """Per batch: samples done, this batch's images/s (sampling loop), the session's images/s
        so far (wall), seconds. Charted against samples done (``define_metric`` in start). A
        failure to log progress costs a warning and the rest of the progress, never the run."""
        if self.run is None or report.warmup or self.progress_failed:
            return
        s = report.stage
        values = {f"{s}/samples_done": report.done, f"{s}/fraction": report.done / report.total,
                  f"{s}/images_per_s": report.batch_images_per_s, f"{s}/session_images_per_s": report.images_per_s,
                  f"{s}/batch_s": report.sampling_s, f"{s}/elapsed_s": report.elapsed_s}
        if report.vae_s is not None:
            values[f"{s}/vae_s"] = report.vae_s
        try:
            self.run.log(values)
        except Exception as err:  # noqa: BLE001 - W&B's errors vary; sampling must go on
            self.progress_failed = True
            LOG.warning("W&B could not log sampling progress (%s); the run goes on, its row is logged at the end",
                        err)

    def log(self, record: RunRecord, out_dir: Path) -> str:
        wandb, run = self.wandb, self.run
        row = record.as_dict()
        run.summary.update({k: v for k, v in row.items() if v is not None})
        logged: dict[str, object] = {"row": wandb.Table(columns=list(row), data=[list(row.values())])}
        for png in sorted(out_dir.glob("*.png")):  # the sample grid, and any plots beside it
            logged[png.stem] = wandb.Image(str(png), caption=f"{run.name}: {png.name}")
        for gif in sorted(out_dir.glob("*.gif")):  # a video row's preview (rfc.utils.images.save_video_preview)
            logged[gif.stem] = wandb.Video(str(gif), caption=f"{run.name}: {gif.name}", format="gif")
        run.log(logged)
        return f"wandb:   {self.mode} run {run.name!r} ({self._folder()})"

    def finish(self, error: BaseException | None) -> None:

        if self.run is None:
            return
        run, folder = self.run, self._folder()
        self.run = None
        code = 0 if error is None else exit_code(error)
        if error is not None:
            run.summary["error"] = "interrupted" if isinstance(error, KeyboardInterrupt) else one_line(error)
            run.summary["exit_code"] = code
        LOG.info("wandb: finishing run %r with exit code %d", run.name, code)
        if folder and self.log_file is not None and self.log_file.exists():
            copy = Path(run.dir) / self.log_file.name
            with contextlib.suppress(OSError):  # the log as it stands: the run folder's run.log keeps the rest
                shutil.copyfile(self.log_file, copy)
                run.save(str(copy), base_path=run.dir, policy="now")  # a copy, not a link: wandb sync reads it later
        run.finish(exit_code=code)


def build_loggers(cfg: DictConfig, sweep: str | None = None) -> list[JobLogger]:
    """Loggers named by the ``logger`` config group; checks (W&B credentials) happen here, before
    any sampling."""
    loggers: list[JobLogger] = []
    if cfg.logger.get("csv"):
        loggers.append(CSVLogger(cfg.paths.runs_csv))
    if cfg.logger.get("wandb"):
        settings = OmegaConf.to_container(cfg.logger.wandb, resolve=True)
        loggers.append(WandbLogger(settings, OmegaConf.to_container(cfg, resolve=True), sweep))
    return loggers
