"""Samples on disk as they are produced, so that a killed or preempted run loses at most the batch
it was drawing, and a sharded (torchrun) run merges to the same set as a single process.

Layout inside a run folder::

    manifest.json                        what the samples depend on (the run's sample setting,
                                         rfc/run/setting.py, and its method) + completed index ranges
    shards/00000000-00000250.npz         one batch: images, labels, accounting, timing

A shard is one sampling batch [start, stop) of the global index space. Batches are cut from
index 0 in steps of eval.batch_size whatever the number of processes, so batch b holds the same
samples (and, with per-sample noise streams, the same numbers) in every layout; rank r draws
batches r, r + K, r + 2K, ... Each shard is written under a temporary name and renamed, so a
shard either exists whole or not at all. It carries its own provenance: its index range, the id of
the configuration that drew it (a hash of the manifest's ``config``: sample setting, seed, method)
and the sha256 of its images and labels; the manifest records every shard's range and file sha256.
A resume verifies every shard before trusting it, listed in the manifest or not: a truncated,
bit-flipped, misnamed shard, or one drawn by another configuration (another seed, say) under the
right name, is set aside and redrawn.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock

from rfc.cache import MethodStats
from rfc.utils.errors import RunError, reason
from rfc.utils.files import atomic_savez, atomic_write_text, file_digest

MANIFEST = "manifest.json"
SHARD_DIR = "shards"
_SHARD_NAME = re.compile(r"^(\d{8})-(\d{8})\.npz$")

def _flatten(value: object, prefix: str) -> dict[str, object]:
    if isinstance(value, dict):
        flat: dict[str, object] = {}
        for k, v in value.items():
            flat.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return flat
    return {prefix: value}


def config_differences(old: dict, new: dict) -> list[str]:
    """Human-readable differences between two sample configs ("method.interval: 4 -> 5")."""
    a, b = _flatten(old, ""), _flatten(new, "")
    missing = object()
    return [f"{k}: {a.get(k, '(unset)')!r} -> {b.get(k, '(unset)')!r}" for k in sorted(set(a) | set(b))
            if a.get(k, missing) != b.get(k, missing)]


class ResumeError(ValueError):
    """The folder holds samples of a different configuration; resuming would mix two runs."""


@dataclass
class Batch:
    """One generated batch, as stored in its shard."""

    start: int
    images: np.ndarray  # uint8 (B, H, W, C)
    labels: np.ndarray  # int64 (B,)
    stats: MethodStats
    latency: float  # seconds in the sampling loop (VAE excluded)
    vae_latency: float | None
    timed: bool  # False for a process's warm-up batches: not part of the latency figures
    shared: str | None = None  # who else used the device while it was timed (this session only, not stored)
    load: float | None = None  # other processes' mean CPU use (cores) while it ran (this session only, not stored)

    @property
    def stop(self) -> int:
        return self.start + len(self.labels)


def batch_starts(num_samples: int, batch_size: int) -> list[int]:
    return list(range(0, num_samples, batch_size))


def rank_starts(num_samples: int, batch_size: int, rank: int, world_size: int) -> list[int]:
    """The batches rank ``rank`` of ``world_size`` draws: every world_size-th, from its rank."""
    return batch_starts(num_samples, batch_size)[rank::world_size]


class ShardStore:
    """The shards and manifest of one run folder."""

    def __init__(self, folder: str | Path, config: dict, num_samples: int, batch_size: int) -> None:
        self.folder = Path(folder)
        self.dir = self.folder / SHARD_DIR
        self.manifest = self.folder / MANIFEST
        self.config, self.num_samples, self.batch_size = config, num_samples, batch_size
        self.config_id = config_id(config)
        self.layout = {s: min(s + batch_size, num_samples) for s in batch_starts(num_samples, batch_size)}

    # -- manifest --------------------------------------------------------------------------

    def _read_manifest(self) -> dict:
        try:
            body = json.loads(self.manifest.read_text())
            if not isinstance(body, dict):
                raise ValueError("not a JSON object")
            return body
        except (OSError, ValueError) as err:
            raise ResumeError(f"{self.manifest} is unreadable ({err}); it describes the samples in {self.folder}, "
                              "so the folder cannot be resumed: move it aside and start a new run") from err

    def check(self) -> None:
        """Refuse a folder whose manifest describes other samples. Cheap: reads the manifest."""
        if not self.manifest.exists():
            if self.dir.exists() and any(self._shard_files()):
                raise ResumeError(f"{self.dir} holds shards but {self.manifest} is missing; "
                                  "cannot tell which configuration drew them")
            return
        diffs = config_differences(self._read_manifest().get("config", {}), self.config)
        if diffs:
            raise ResumeError(f"refusing to resume {self.folder}: its samples were drawn with another "
                              f"configuration ({'; '.join(diffs)}). Use a new output folder, or restore "
                              "these settings to continue it.")

    def create(self) -> None:
        """Write the manifest of a fresh folder (kept as is when it exists and matches)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.manifest.exists():
            self._write_manifest({})

    def _recorded(self) -> dict[str, dict]:
        """The manifest's shard entries (name -> start, stop, sha256); {} for a fresh folder."""
        if not self.manifest.exists():
            return {}
        return dict(self._read_manifest().get("shards") or {})

    def _write_manifest(self, shards: dict[str, dict]) -> None:
        ranges = [(e["start"], e["stop"]) for e in shards.values()]
        body = {"config": self.config, "num_samples": self.num_samples, "batch_size": self.batch_size,
                "completed": [list(r) for r in _merge_ranges(ranges)], "shards": shards}
        atomic_write_text(self.manifest, json.dumps(body, indent=1, sort_keys=True) + "\n")

    # -- verification ----------------------------------------------------------------------

    def verify(self) -> tuple[int, list[str]]:
        """Check every shard on disk before a resume builds on it: a shard the manifest lists must
        match its recorded checksum, one it does not list (written just before a crash, or by an
        older version) must load and hold the index range its name says. A shard that fails is
        moved to ``rejected/`` (kept, not deleted) and will be redrawn. Temporary files of killed
        writers are removed. Call with the run folder locked. Returns the number of samples on
        disk and one message per rejected shard."""
        recorded, kept, problems = self._recorded(), {}, []
        for path in self._shard_files():
            start, stop = (int(g) for g in _SHARD_NAME.match(path.name).groups())
            entry = recorded.get(path.name)
            if self.layout.get(start) != stop:
                problem = f"its range [{start}, {stop}) is not a batch of this run ({self.batch_size} per batch)"
            elif entry is not None:
                digest = file_digest(path)
                problem = (_foreign(path, self.config_id) if digest == entry.get("sha256")
                           else "its checksum differs from the manifest's")
            else:
                problem = _shard_content_problem(path, start, stop, self.config_id)
                digest = None if problem else file_digest(path)
            if problem:
                problems.append(f"shard {path} rejected: {problem}; moved to {self._reject(path)}, it will be "
                                "redrawn")
            else:
                kept[path.name] = {"start": start, "stop": stop, "sha256": digest}
        for stale in [*self.dir.glob(".*.tmp"), *self.folder.glob(".*.tmp")] if self.dir.exists() else []:
            stale.unlink(missing_ok=True)  # a killed writer's unfinished file: never renamed, never valid
        if self.manifest.exists() and kept != recorded:
            self._write_manifest(kept)
        return sum(e["stop"] - e["start"] for e in kept.values()), problems

    def _reject(self, path: Path) -> Path:
        target_dir = self.folder / "rejected"
        target_dir.mkdir(exist_ok=True)
        target, n = target_dir / path.name, 1
        while target.exists():
            target, n = target_dir / f"{path.name}.{n}", n + 1
        os.replace(path, target)
        return target

    # -- shards ----------------------------------------------------------------------------

    def _shard_files(self) -> list[Path]:
        if not self.dir.exists():
            return []
        return sorted(p for p in self.dir.iterdir() if _SHARD_NAME.match(p.name))

    def completed(self) -> list[tuple[int, int]]:
        """Index ranges of the verified shards: listed in the manifest and present on disk."""
        return sorted((e["start"], e["stop"]) for name, e in self._recorded().items()
                      if self.layout.get(e["start"]) == e["stop"] and (self.dir / name).exists())

    def missing(self, starts: list[int]) -> list[int]:
        have = {start for start, _ in self.completed()}
        return [s for s in starts if s not in have]

    def path(self, start: int, stop: int) -> Path:
        return self.dir / f"{start:08d}-{stop:08d}.npz"

    def write(self, batch: Batch) -> Path:
        """Store a batch atomically (its range inside it), then record range and checksum in the
        manifest."""
        path = self.path(batch.start, batch.stop)
        digest = atomic_savez(path, images=batch.images, labels=batch.labels, start=np.int64(batch.start),
                              stop=np.int64(batch.stop), config_id=np.array(self.config_id),
                              content_sha256=np.array(content_digest(batch.images, batch.labels)),
                              latency=np.float64(batch.latency),
                              vae_latency=np.float64(np.nan if batch.vae_latency is None else batch.vae_latency),
                              timed=np.bool_(batch.timed), stats=np.array(json.dumps(asdict(batch.stats))))
        with FileLock(str(self.dir / ".manifest.lock"), timeout=120):  # ranks share the manifest
            shards = self._recorded()
            shards[path.name] = {"start": batch.start, "stop": batch.stop, "sha256": digest}
            self._write_manifest(shards)
        return path

    def load(self, start: int, stop: int) -> Batch:
        path = self.path(start, stop)
        try:
            with np.load(path) as z:
                other = _other_range(z, start, stop)
                if other:
                    raise ValueError(other)
                other = _other_config(z, self.config_id)
                if other:
                    raise ValueError(other)
                vae = float(z["vae_latency"])
                return Batch(start, z["images"], z["labels"].astype(np.int64),
                             MethodStats(**json.loads(str(z["stats"]))), float(z["latency"]),
                             None if np.isnan(vae) else vae, bool(z["timed"]))
        except Exception as err:
            raise RunError(f"shard {path} is unreadable ({reason(err)}); run again with "
                           f"resume={self.folder} to verify the shards and redraw the damaged ones") from err

    def load_all(self) -> list[Batch]:
        """Every batch of the run in index order; raises unless they cover [0, N) exactly once."""
        ranges = self.completed()
        want = sorted(self.layout.items())
        if ranges != want:
            lost = sorted(set(want) - set(ranges))
            raise RunError(f"{self.dir}: {len(lost)} batch(es) missing, first {lost[:3]}; run again with "
                           f"resume={self.folder} to draw them")
        return [self.load(s, e) for s, e in ranges]


SHARD_KEYS = {"images", "labels", "latency", "vae_latency", "timed", "stats", "config_id", "content_sha256"}


def config_id(config: dict) -> str:
    """The id of a sample configuration (the manifest's ``config``), as shards record it."""
    return hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode()).hexdigest()[:16]


def content_digest(images: np.ndarray, labels: np.ndarray) -> str:
    """sha256 of a batch's images and labels (shape, dtype and bytes), as its shard records it."""
    h = hashlib.sha256()
    for a in (np.ascontiguousarray(images), np.ascontiguousarray(labels)):
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.tobytes())
    return h.hexdigest()


def _foreign(path: Path, want: str) -> str | None:
    """Why a shard the manifest lists was drawn by another configuration (None: it was not, or it
    predates the record and the manifest's checksum vouches for it)."""
    try:
        with np.load(path) as z:
            return _other_config(z, want)
    except Exception as err:
        return f"it is unreadable ({reason(err)})"


def _other_config(z: np.lib.npyio.NpzFile, want: str) -> str | None:
    """The configuration id a shard records, when it is not this run's (None: it is, or the shard
    predates the record)."""
    if "config_id" in z.files and str(z["config_id"]) != want:
        return f"it was drawn by another configuration ({str(z['config_id'])}, this run's is {want})"
    return None


def _shard_content_problem(path: Path, start: int, stop: int, want: str) -> str | None:
    """Why a shard the manifest does not list cannot be used (None: it can): it must load whole,
    carry this run's configuration id, hold the samples its name says, and its images and labels
    must match the checksum it carries."""
    try:
        with np.load(path) as z:
            if not SHARD_KEYS <= set(z.files):
                return f"it lacks {', '.join(sorted(SHARD_KEYS - set(z.files)))} (no provenance: cannot tell which " \
                       "run drew it)"
            other = _other_range(z, start, stop) or _other_config(z, want)
            if other:
                return other
            images, labels = z["images"], z["labels"]
            recorded = str(z["content_sha256"])
            json.loads(str(z["stats"]))
    except Exception as err:
        return f"it is unreadable ({reason(err)})"
    if len(images) != stop - start or len(labels) != stop - start or images.dtype != np.uint8:
        return f"it holds {len(images)} {images.dtype} images and {len(labels)} labels, not {stop - start}"
    if content_digest(images, labels) != recorded:
        return "its images or labels differ from the checksum it carries"
    return None


def _other_range(z: np.lib.npyio.NpzFile, start: int, stop: int) -> str | None:
    """The shard's own record of its samples, when it contradicts its name (None: it agrees, or
    the shard predates the record)."""
    if "start" in z.files and (int(z["start"]), int(z["stop"])) != (start, stop):
        return f"it holds samples [{int(z['start'])}, {int(z['stop'])}), not [{start}, {stop})"
    return None


def _merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[list[int]] = []
    for start, stop in sorted(ranges):
        if merged and merged[-1][1] == start:
            merged[-1][1] = stop
        else:
            merged.append([start, stop])
    return [(a, b) for a, b in merged]
