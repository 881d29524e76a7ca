"""Writing result rows. CSV appends happen under a file lock so parallel sweep jobs never
interleave or lose rows; a file written with other columns is widened, never truncated."""

from __future__ import annotations

import csv
import io
import os
from pathlib import Path

from filelock import FileLock

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
