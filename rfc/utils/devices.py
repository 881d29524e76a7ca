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

A third source sees processes that are not the harness's (:class:`LoadSample`): on a CPU device,
the CPU time the whole machine spent on processes other than this one during the batch, from
``/proc/stat`` and ``/proc/self/stat`` (the same clock ticks, so the difference is the others');
a batch during which they used more than ``QUIET_CORES`` cores on average is not timed. On a GPU,
NVML's list of processes on the device (when ``pynvml`` is installed): a batch during which
another process ran there is not timed. Every timed batch keeps what was measured, so the row can
say how quiet the device was.
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
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rfc.utils.errors import RunError

if TYPE_CHECKING:
    import torch

SERIAL_LAUNCHERS = ("basic",)
# Other processes' mean CPU use during a batch above which a CPU timing counts as shared, beyond
# the cores the job leaves idle (cores minus torch's threads): a quarter of a core is far above an
# idle machine's background (kernel threads, a shell: under 0.05 here) and far below one busy
# process (1.0).
QUIET_CORES = 0.25
QUIET_CORES_ENV = "RFC_QUIET_CORES"  # overrides QUIET_CORES (a test suite on a shared machine raises it)


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


@dataclass(frozen=True)
class LoadSample:
    """What other processes had used of the device by one moment: CPU clock ticks of the whole
    machine and of this process (Linux; None elsewhere), or the other processes NVML saw on the GPU."""

    wall: float
    machine_ticks: int | None = None  # busy ticks of every CPU (user, nice, system, irq, softirq)
    own_ticks: int | None = None  # this process's ticks (every thread)
    gpu_others: tuple[str, ...] | None = None  # processes NVML lists on the GPU besides this one

    @staticmethod
    def take(device_kind: str, index: int | None = None) -> LoadSample:
        now = time.monotonic()
        if device_kind == "cpu":
            return LoadSample(now, *_proc_ticks())
        return LoadSample(now, gpu_others=_nvml_others(index or 0) if device_kind == "cuda" else None)


def others_load(before: LoadSample | None, after: LoadSample | None) -> tuple[float | None, str | None]:
    """Between two samples: other processes' mean CPU use in cores (None where not measurable)
    and, when that or the GPU's process list says the device was shared, why."""
    if before is None or after is None:
        return None, None
    if after.gpu_others:
        return None, f"other processes on the GPU: {', '.join(after.gpu_others[:3])}"
    if None in (before.machine_ticks, after.machine_ticks, before.own_ticks, after.own_ticks):
        return None, None
    ticks = (after.machine_ticks - before.machine_ticks) - (after.own_ticks - before.own_ticks)
    cores, shared = _over_limit(max(ticks, 0), after.wall - before.wall)
    if shared:
        return cores, (f"other processes used {cores:.2f} of {os.cpu_count()} CPU cores on average, more than "
                       f"{quiet_limit():g}")
    return cores, None


_TICKS_PER_S = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def mean_load(loads: list[tuple[float, float]]) -> tuple[float | None, bool]:
    """Other processes' mean CPU use over several timed batches ((cores, seconds) each) and whether
    it exceeds ``quiet_limit``: the same test as one batch's, with the same two ticks of slack
    (a single tick attributed a moment late to another process reads as half a core in a 20 ms
    batch)."""
    seconds = sum(t for _, t in loads)
    if not loads or seconds <= 0:
        return None, False
    return _over_limit(sum(c * t for c, t in loads) * _TICKS_PER_S, seconds)


def _over_limit(ticks: float, seconds: float) -> tuple[float, bool]:
    """Other processes' mean use in cores from their clock ticks over ``seconds``, and whether it
    exceeds ``quiet_limit`` by more than the counters' quantisation (two ticks of slack: a short
    batch reads a stray tick as a large fraction of a core)."""
    cores = ticks / _TICKS_PER_S / max(seconds, 1e-9)
    return cores, ticks > 2 and cores > quiet_limit()


def quiet_limit() -> float:
    """Other processes' mean CPU use (cores) above which a CPU timing counts as shared, now:
    ``quiet_cores()`` beyond the cores the job leaves idle (the machine's minus torch's threads)."""
    import torch

    return quiet_cores() + max(0, (os.cpu_count() or 1) - torch.get_num_threads())


def quiet_cores() -> float:
    """``QUIET_CORES``, or ``$RFC_QUIET_CORES`` where set (a number of cores >= 0; refused by name
    otherwise). Rows say the load they measured either way."""
    value = os.environ.get(QUIET_CORES_ENV)
    if value is None:
        return QUIET_CORES
    try:
        cores = float(value)
    except ValueError:
        cores = -1.0
    if not cores >= 0:  # also refuses nan
        raise RunError(f"{QUIET_CORES_ENV}={value!r} is not a number of CPU cores >= 0 (unset it for the default "
                       f"{QUIET_CORES})")
    return cores


def _proc_ticks() -> tuple[int | None, int | None]:
    """(busy ticks of the machine, ticks of this process), or (None, None) without /proc."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]
        user, nice, system, _idle, _iowait, irq, softirq = (int(v) for v in fields[:7])
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        return user + nice + system + irq + softirq, int(own[11]) + int(own[12])  # utime, stime
    except (OSError, ValueError, IndexError):
        return None, None


def _nvml_others(index: int) -> tuple[str, ...] | None:
    """Other processes NVML lists on GPU ``index``; None when NVML is missing or cannot see this
    process (a container's PID namespace: its list is then no evidence either way)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(index)
        pids = {p.pid for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)}
    except Exception:  # noqa: BLE001 - NVML's errors are its own classes; any of them means "unknown"
        return None
    if pids and os.getpid() not in pids:
        return None
    return tuple(f"pid {pid}" for pid in sorted(pids - {os.getpid()}))


@dataclass
class Snapshot:
    generation: int
    others: list[str]  # descriptions of the other live jobs on the device
    load: LoadSample | None = None


class DeviceUse:
    """Registration of this job on one device, for the job's lifetime (a context manager)."""

    def __init__(self, device: torch.device | str, root: str | Path | None = None) -> None:
        """``device``: a torch device, or a device key as :func:`device_key` makes it ("cpu")."""
        self.dir = Path(root or registry_root()) / (device if isinstance(device, str) else device_key(device))
        kind = device if isinstance(device, str) else device.type
        self.kind = kind.split(":")[0]
        self.index = getattr(device, "index", None)
        self.me: Path | None = None
        self._fd: int | None = None

    # -- lifecycle ----------------------------------------------------------------------------

    def __enter__(self) -> DeviceUse:
        quiet_cores()  # a bad $RFC_QUIET_CORES is named here, before any sampling, not at the first timed batch
        name = f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        staging = self.dir / f".{name}.tmp"
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(staging, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as err:
            where = ("$RFC_DEVICE_REGISTRY" if os.environ.get("RFC_DEVICE_REGISTRY")
                     else "the default device registry (set RFC_DEVICE_REGISTRY to move it)")
            raise RunError(f"cannot use the device registry {self.dir} ({where}): {err.strerror or err}; point "
                           "RFC_DEVICE_REGISTRY at a writable folder") from err
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
        return Snapshot(generation, others, LoadSample.take(self.kind, self.index))

    @staticmethod
    def shared(before: Snapshot, after: Snapshot) -> str | None:
        """Who shared the device between two snapshots (None: nobody did)."""
        others = before.others or after.others
        if others:
            return "another job of this harness: " + others[0] + (f" and {len(others) - 1} more" if len(others) > 1
                                                                   else "")
        if after.generation != before.generation:
            return "another job of this harness, which started and ended meanwhile"
        return others_load(before.load, after.load)[1]

    @staticmethod
    def load(before: Snapshot, after: Snapshot) -> float | None:
        """Other processes' mean CPU use (cores) between two snapshots, where measured."""
        return others_load(before.load, after.load)[0]


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
