"""Samples on disk as they are produced, so that a killed or preempted run loses at most the batch
it was drawing, and a sharded (torchrun) run merges to the same set as a single process.

Layout inside a run folder::

    manifest.json                        what the samples depend on + completed index ranges
    shards/00000000-00000250.npz         one batch: images, labels, accounting, timing

A shard is one sampling batch [start, stop) of the global index space. Batches are cut from
index 0 in steps of eval.batch_size whatever the number of processes, so batch b holds the same
samples (and, with per-sample noise streams, the same numbers) in every layout; rank r draws
batches r, r + K, r + 2K, ... Each shard is written under a temporary name and renamed, so a
shard either exists whole or not at all. The shard files are the record of what is done; the
manifest's ``completed`` list mirrors them for people and tools reading the folder.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from filelock import FileLock
from omegaconf import DictConfig, OmegaConf

from rfc.cache import MethodStats

MANIFEST = "manifest.json"
SHARD_DIR = "shards"
_SHARD_NAME = re.compile(r"^(\d{8})-(\d{8})\.npz$")

# Config keys the sample set depends on. Everything else (scoring, loggers, paths, launcher,
# device) may change between a run and its resumption.
SAMPLE_KEYS = ("model", "method", "sampler", "seed", "cfg_scale", "precision", "compile", "eval.num_samples",
               "eval.batch_size")
SCORING_KEYS = ("model.extractor", "model.reference")  # inside "model", but not what it draws


def sample_config(cfg: DictConfig) -> dict:
    """The part of a run config that determines its samples, resolved to plain values."""
    out = {}
    for key in SAMPLE_KEYS:
        node = OmegaConf.select(cfg, key, default=None)
        out[key] = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else node
    for key in SCORING_KEYS:
        group, name = key.split(".")
        if isinstance(out.get(group), dict):
            out[group].pop(name, None)
    return out


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

    # -- manifest --------------------------------------------------------------------------

    def check(self) -> int:
        """Refuse a folder whose manifest describes other samples; return how many samples are
        already on disk (0 for a fresh folder). Cheap: reads the manifest and lists the shards."""
        if not self.manifest.exists():
            if self.dir.exists() and any(self._shard_files()):
                raise ResumeError(f"{self.dir} holds shards but {self.manifest} is missing; "
                                  "cannot tell which configuration drew them")
            return 0
        saved = json.loads(self.manifest.read_text())
        diffs = config_differences(saved.get("config", {}), self.config)
        if diffs:
            raise ResumeError(f"refusing to resume {self.folder}: its samples were drawn with another "
                              f"configuration ({'; '.join(diffs)}). Use a new output folder, or restore "
                              "these settings to continue it.")
        return sum(stop - start for start, stop in self.completed())

    def create(self) -> None:
        """Write the manifest of a fresh folder (kept as is when it exists and matches)."""
        self.dir.mkdir(parents=True, exist_ok=True)
        if not self.manifest.exists():
            self._write_manifest()

    def _write_manifest(self) -> None:
        body = {"config": self.config, "num_samples": self.num_samples, "batch_size": self.batch_size,
                "completed": [list(r) for r in _merge_ranges(self.completed())]}
        _atomic_write_text(self.manifest, json.dumps(body, indent=1, sort_keys=True) + "\n")

    # -- shards ----------------------------------------------------------------------------

    def _shard_files(self) -> list[Path]:
        if not self.dir.exists():
            return []
        return sorted(p for p in self.dir.iterdir() if _SHARD_NAME.match(p.name))

    def completed(self) -> list[tuple[int, int]]:
        """Index ranges of the shards on disk that belong to this run's batch layout."""
        expected = {s: min(s + self.batch_size, self.num_samples)
                    for s in batch_starts(self.num_samples, self.batch_size)}
        done = []
        for path in self._shard_files():
            start, stop = (int(g) for g in _SHARD_NAME.match(path.name).groups())
            if expected.get(start) == stop:
                done.append((start, stop))
        return done

    def missing(self, starts: list[int]) -> list[int]:
        have = {start for start, _ in self.completed()}
        return [s for s in starts if s not in have]

    def path(self, start: int, stop: int) -> Path:
        return self.dir / f"{start:08d}-{stop:08d}.npz"

    def write(self, batch: Batch) -> Path:
        """Store a batch atomically, then record its range in the manifest."""
        path = self.path(batch.start, batch.stop)
        atomic_savez(path, images=batch.images, labels=batch.labels, latency=np.float64(batch.latency),
                     vae_latency=np.float64(np.nan if batch.vae_latency is None else batch.vae_latency),
                     timed=np.bool_(batch.timed), stats=np.array(json.dumps(asdict(batch.stats))))
        with FileLock(str(self.dir / ".manifest.lock"), timeout=120):  # ranks share the manifest
            self._write_manifest()
        return path

    def load(self, start: int, stop: int) -> Batch:
        with np.load(self.path(start, stop)) as z:
            vae = float(z["vae_latency"])
            return Batch(start, z["images"], z["labels"].astype(np.int64),
                         MethodStats(**json.loads(str(z["stats"]))), float(z["latency"]),
                         None if np.isnan(vae) else vae, bool(z["timed"]))

    def load_all(self) -> list[Batch]:
        """Every batch of the run in index order; raises unless they cover [0, N) exactly once."""
        ranges = sorted(self.completed())
        want = [(s, min(s + self.batch_size, self.num_samples))
                for s in batch_starts(self.num_samples, self.batch_size)]
        if ranges != want:
            lost = sorted(set(want) - set(ranges))
            raise RuntimeError(f"{self.dir}: {len(lost)} batch(es) missing, first {lost[:3]}")
        return [self.load(s, e) for s, e in ranges]


def _merge_ranges(ranges: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[list[int]] = []
    for start, stop in sorted(ranges):
        if merged and merged[-1][1] == start:
            merged[-1][1] = stop
        else:
            merged.append([start, stop])
    return [(a, b) for a, b in merged]


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def atomic_savez(path: Path, **arrays: np.ndarray) -> None:
    """np.savez under a temporary name, then rename: a reader never sees half a file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename makes it visible
    os.replace(tmp, path)
