"""Whether a latency was measured with the device to itself.

A latency is a claim about a method on a device; another sampling job on the same GPU (or CPU)
during the timed batches makes it a claim about two jobs sharing one. Two sources decide it:

- What the launcher promises (:func:`concurrency`): Hydra's basic launcher runs jobs one after
  another; joblib with more than one worker and submitit run them at once; a torchrun group is
  several processes on purpose. Those runs never record latency.
- What actually ran (:class:`DeviceUse`): every job of this harness registers on its device for
  its whole life (sampling, decoding and scoring all use the device) in a small per-host,
  per-user registry. A timed batch counts only if, from its start to its end, no other job was
  registered and none came or went. This catches what no launcher knows about: two terminals,
  two sweeps, a calibration running beside a run.

The registry lives in ``$RFC_DEVICE_REGISTRY`` or ``<tmp>/rfc-harness-<uid>/devices``: host-local,
so jobs on other nodes of a cluster (other devices) never count. Each job holds an ``flock`` on its
own registration file; the kernel drops it when the job dies however it dies, so a killed job is
recognised as gone (its file is removed by the next reader) and never blocks anyone's latency.
A generation counter, bumped by every arrival and departure, reveals a job that came and went
inside one batch.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import json
import os
import re
import socket
import sys
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

SERIAL_LAUNCHERS = ("basic",)


def concurrency(launcher: str, n_jobs: int | None = None, processes: int = 1) -> str | None:
    """Why this job's latency cannot be trusted whatever the registry says, or None: the launcher
    in effect (Hydra's ``hydra/launcher`` choice, with joblib's ``n_jobs``) runs several jobs at
    once, or the job itself is several processes."""
    if processes > 1:
        return f"{processes} processes drew the samples"
    if launcher in SERIAL_LAUNCHERS or (launcher == "joblib" and n_jobs == 1):
        return None
    if launcher == "joblib":
        workers = "all CPU cores' worth of" if n_jobs in (None, -1) else f"up to {n_jobs}"
        return f"launcher=joblib runs {workers} jobs at once"
    return f"launcher={launcher} runs jobs side by side"


def registry_root() -> Path:
    env = os.environ.get("RFC_DEVICE_REGISTRY")
    if env:
        return Path(env)
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    return Path(tempfile.gettempdir()) / f"rfc-harness-{uid}" / "devices"


def device_key(device: torch.device) -> str:
    """The physical device: "cpu", or the GPU's UUID (the same GPU under any CUDA_VISIBLE_DEVICES
    numbering), falling back to its PCI bus id, then its index."""
    if device.type != "cuda":
        return device.type
    import torch

    index = device.index if device.index is not None else torch.cuda.current_device()
    props = torch.cuda.get_device_properties(index)
    ident = getattr(props, "uuid", None) or getattr(props, "pci_bus_id", None) or f"index{index}"
    return "cuda-" + re.sub(r"[^A-Za-z0-9_.-]", "_", str(ident))


@dataclass
class Snapshot:
    generation: int
    others: list[str]  # descriptions of the other live jobs on the device


class DeviceUse:
    """Registration of this job on one device, for the job's lifetime (a context manager)."""

    def __init__(self, device: torch.device | str, root: str | Path | None = None) -> None:
        """``device``: a torch device, or a device key as :func:`device_key` makes it ("cpu")."""
        self.dir = Path(root or registry_root()) / (device if isinstance(device, str) else device_key(device))
        self.me: Path | None = None
        self._fd: int | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> DeviceUse:
        self.dir.mkdir(parents=True, exist_ok=True)
        name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging = self.dir / f".{name}.tmp"
        fd = os.open(staging, os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)  # held until this job ends: the sign that it is alive
        since = datetime.datetime.now().isoformat(timespec="seconds")
        os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(), "since": since,
                                 "command": " ".join(sys.argv)[:300]}).encode())
        self.me = self.dir / f"{name}.job"
        os.replace(staging, self.me)  # visible only once locked: a reader never mistakes it for a dead job's
        self._fd = fd
        self._bump()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._fd is None:
            return
        with contextlib.suppress(OSError):
            self.me.unlink()
        os.close(self._fd)
        self._fd = None
        with contextlib.suppress(OSError):
            self._bump()

    # -- reading ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _counter(self, exclusive: bool) -> Iterator[Path]:
        fd = os.open(self.dir / ".lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            yield self.dir / "generation"
        finally:
            os.close(fd)

    def _bump(self) -> None:
        with self._counter(exclusive=True) as path:
            path.write_text(str(_read_int(path) + 1))

    def snapshot(self) -> Snapshot:
        """The generation and the other live jobs now. Registration files of dead jobs (their
        flock is free) are removed on the way."""
        with self._counter(exclusive=False) as path:
            generation = _read_int(path)
        others = []
        for path in sorted(self.dir.glob("*.job")):
            if path == self.me:
                continue
            info = _alive(path)
            if info is not None:
                others.append(info)
        return Snapshot(generation, others)

    @staticmethod
    def shared(before: Snapshot, after: Snapshot) -> str | None:
        """Who shared the device between two snapshots (None: nobody did)."""
        others = before.others or after.others
        if others:
            return others[0] + (f" and {len(others) - 1} more" if len(others) > 1 else "")
        if after.generation != before.generation:
            return "a job that started and ended meanwhile"
        return None


def _read_int(path: Path) -> int:
    try:
        return int(path.read_text().strip() or 0)
    except (OSError, ValueError):
        return 0


def _alive(path: Path) -> str | None:
    """A description of the job registered in ``path`` if it is alive, else None (and the file of
    a dead job is removed)."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None  # it left while we looked
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            body = os.read(fd, 4096).decode(errors="replace")
            try:
                info = json.loads(body)
                return f"pid {info['pid']} on {info['host']} since {info['since']} ({info['command']})"
            except (ValueError, KeyError):
                return f"the job registered in {path.name}"
        with contextlib.suppress(OSError):
            path.unlink()  # its holder is gone
        return None
    finally:
        os.close(fd)
