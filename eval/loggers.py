"""Writing result rows: the CSV table and W&B runs (the ``logger`` config group).

CSV appends happen under a file lock so parallel sweep jobs never interleave or lose rows; a file
written with other columns is widened, never truncated."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from filelock import FileLock
from omegaconf import DictConfig

from rfc.record import RunRecord


def cell(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return repr(value)
    return str(value)


def append_csv(path: str | Path, record: RunRecord) -> Path:
    """Append ``record`` as one row of ``path``, creating the file with a header if needed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    row = {k: cell(v) for k, v in record.as_dict().items()}
    with FileLock(str(path) + ".lock", timeout=120):
        if path.exists() and path.stat().st_size > 0:
            with path.open(newline="") as f:
                reader = csv.DictReader(f)
                header = list(reader.fieldnames or [])
                if header == list(row):
                    rows = None
                else:  # columns changed between versions: rewrite with the union, keeping every cell
                    rows = list(reader)
            if rows is None:
                with path.open("a", newline="") as f:
                    csv.DictWriter(f, fieldnames=header).writerow(row)
                return path
            columns = list(row) + [c for c in header if c not in row]
            buf = io.StringIO()
            writer = csv.DictWriter(buf, fieldnames=columns, restval="")
            writer.writeheader()
            writer.writerows(rows)
            writer.writerow(row)
            tmp = path.with_suffix(path.suffix + ".tmp")
            tmp.write_text(buf.getvalue())
            os.replace(tmp, path)  # atomic: a crash leaves the old file whole
        else:
            with path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(row))
                writer.writeheader()
                writer.writerow(row)
    return path


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
