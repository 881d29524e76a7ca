"""Files the harness writes, written so that a crash, a kill or a full disk never leaves half of one.

Every result file (record, statistics, schedules, manifest, shards, samples, grid, tables) goes
through :func:`atomic_path`: the bytes land in a uniquely named temporary file beside the target,
are flushed to disk, and only then renamed over it. A reader therefore sees the old file or the
new one, never a torn one, two processes never share a temporary name, and a failed write
removes its temporary file, so no 0-byte or ``.tmp`` files are left behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np


def file_digest(path: str | Path, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks (weights are gigabytes). Only a regular file: a
    device such as /dev/zero or a pipe would be read forever or block."""
    if not Path(path).is_file():
        raise ValueError(f"{path} is not a regular file: nothing to hash")
    digest = hashlib.new(algorithm)
    with Path(path).open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def memo_digest(path: str | Path, memo: str | Path | None = None) -> str:
    """sha256 of a file, remembered in the JSON file ``memo`` under the file's identity (absolute
    path, size, mtime, inode), so a 2.7 GB checkpoint or a 1.4 GB reference batch is hashed once,
    not on every run. A file that changed gets a new identity and is hashed again; a memo that
    cannot be read or written is ignored (the digest is then computed every time)."""
    import json

    path = Path(path).resolve()
    st = path.stat()
    key = f"{path}|{st.st_size}|{st.st_mtime_ns}|{st.st_ino}"
    known: dict[str, str] = {}
    if memo is not None:
        with contextlib.suppress(OSError, ValueError):
            loaded = json.loads(Path(memo).read_text())
            known = loaded if isinstance(loaded, dict) else {}
        if isinstance(known.get(key), str) and len(known[key]) == 64:
            return known[key]
    digest = file_digest(path)
    if memo is not None:
        with contextlib.suppress(OSError):
            Path(memo).parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(memo, json.dumps({**known, key: digest}, indent=0, sort_keys=True) + "\n")
    return digest


def temp_name(path: Path) -> Path:
    """A temporary sibling of ``path`` no other process or thread will pick (pid + random)."""
    return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on success it is fsynced and
    renamed over ``path``, on any error (ENOSPC included) it is deleted and the error re-raised."""
    path = Path(path)
    tmp = temp_name(path)
    try:
        yield tmp
        with tmp.open("rb+") as f:
            os.fsync(f.fileno())  # on disk before the rename makes it visible
        os.replace(tmp, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp.unlink()
        if isinstance(err, OSError) and err.filename in (None, str(tmp)):
            err.filename = str(path)  # name the file being written, not its vanished temporary
        raise


def _write_all(path: Path, data: bytes) -> None:
    """The one place result bytes reach the disk (tests inject a full disk here)."""
    with path.open("wb") as f:
        f.write(data)


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    with atomic_path(path) as tmp:
        _write_all(tmp, data)
    return Path(path)


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode())


def atomic_savez(path: str | Path, **arrays: np.ndarray) -> str:
    """np.savez written atomically; returns the sha256 of the bytes written (built in memory first,
    so the checksum is of exactly what reached the disk)."""
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    data = buf.getvalue()
    atomic_write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def check_writable_file(path: str | Path, what: str) -> None:
    """Fail now, naming ``path``, if a file could not be created or appended there later: the
    folder must exist or be creatable and accept a file, and the file itself must not be a folder.
    Creates missing parent folders (as writing would); leaves nothing else behind."""
    from rfc.utils.errors import ConfigError

    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{what} {p} is a folder, not a file; point it at a file path")
    blocker = next((a for a in p.parents if a.exists() and not a.is_dir()), None)
    if blocker is not None:
        raise ConfigError(f"{what} {p} cannot be created: {blocker} is a file, not a folder")
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        probe = temp_name(p)
        probe.write_bytes(b"")
        probe.unlink()
        if p.exists():
            with p.open("ab"):
                pass
    except OSError as err:
        raise ConfigError(f"{what} {p} is not writable ({err.strerror or err}); fix its permissions or choose "
                          "another path") from err


class FolderLock:
    """Exclusive use of a run folder by one process (one torchrun group: its rank 0 holds it).

    An advisory ``fcntl.flock`` on ``<folder>/.lock``: the kernel drops it when the holder exits,
    however it exits (a SIGKILL included), so a killed run never blocks its own resume. The file
    names the holder (pid, host, start time, command), which a refused second process reports."""

    NAME = ".lock"

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / self.NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        import datetime
        import fcntl
        import socket
        import sys

        from rfc.utils.errors import FolderLockedError

        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 4096).decode(errors="replace").strip() or "another process"
            os.close(fd)
            err = FolderLockedError(f"{self.path.parent} is in use by {holder}; wait for that run to finish "
                                    "or give this one another folder")
            err.holder = holder
            raise err from None
        os.ftruncate(fd, 0)
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()} since {stamp} "
                     f"({' '.join(sys.argv)[:500]})\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.ftruncate(self._fd, 0)  # the holder's line describes a live holder only
            os.close(self._fd)  # closing drops the flock
            self._fd = None


# The store's folder (``paths.store``) as every layer reads it: file digests and resolved references
# live there beside the full-compute sets (rfc.run.store).
REFERENCES = "references"  # one resolved reference per (content, extractor)
DIGESTS = "digests.json"  # file digests, remembered by file identity


def digest_memo(paths: dict) -> Path | None:
    """Where file digests are remembered (None without a store: then they are not)."""
    return Path(paths["store"]) / DIGESTS if paths.get("store") else None
