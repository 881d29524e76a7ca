"""The full-compute store: one full-compute sample set per sample setting, shared by every run.

Paired metrics (FID2FC, sFID2FC, PSNR, SSIM) compare a cached run with full compute from the same
noise. The full-compute set depends only on the sample setting (``rfc.run.setting.SAMPLE_KEYS``), not
on the method, so it is drawn once per setting and kept in ``<paths.store>/full_compute/<id>/``
(``id`` = ``setting_id`` of the setting, also the ``setting_id`` column of every row of it)::

    setting.json      the setting, who drew the set, a publication token, the set's sha256
    samples.npz       ADM layout: arr_0 images, arr_1 labels (present = complete)
    stats-<extractor>-<weights digest>-<token>.npz   the set's feature statistics, per extractor
    manifest.json, shards/   only while a draw is under way (resumable like a run folder)
    .lock             held by the job drawing the set

Beside ``full_compute/``, the store holds ``references/`` (resolved reference statistics,
eval/extractors.py) and ``digests.json`` (file digests, rfc.utils.files.memo_digest); the names of all
three are defined here.

Who draws: a method=none run publishes its own samples here when no set exists (holding the
lock while it samples, so cached jobs of the same setting wait for it instead of drawing again);
otherwise the first cached job that needs the set draws it under the lock, from its shards if an
earlier draw was killed, while every other job of the setting waits and then reuses it. Deleting
the folder (or one entry) is safe when no job is running: the next run that needs a set draws it.

Every use of a set checks it against the sha256 recorded when it was published (remembered per
file identity in ``digests.json``, so a set is hashed once, not on every run): a set that was
replaced, or edited in place through the run folder it is hard-linked from, is refused, naming the
entry to delete. An entry published before sets carried their sha256 gets it recorded at its
first use.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import shutil
import uuid
from pathlib import Path

import numpy as np

from rfc.run.setting import SAMPLE_KEYS, key, setting_id
from rfc.run.shards import MANIFEST, SHARD_DIR
from rfc.utils.errors import FolderLockedError, NonFiniteError, RunError
from rfc.utils.files import DIGESTS, FolderLock, atomic_write_text, memo_digest

FULL_COMPUTE = "full_compute"
META = "setting.json"
SAMPLES = "samples.npz"


def store_root(paths: dict) -> Path:
    return Path(paths["store"]) / FULL_COMPUTE


def link_or_copy(source: Path, target: Path) -> None:
    """Put ``source``'s bytes at ``target`` atomically: a hard link when both are on one file
    system (no copy of a 10 GB file; a later atomic rewrite of ``source`` leaves ``target``
    alone), else a copy."""
    staging = target.with_name(f".{target.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        os.link(source, staging)
    except OSError:
        shutil.copyfile(source, staging)
    os.replace(staging, target)


class FullComputeEntry:
    """The full-compute set of one sample setting."""

    def __init__(self, root: str | Path, setting: dict[str, object]) -> None:
        self.setting = {k: setting.get(k) for k in SAMPLE_KEYS}
        self.id = setting_id(self.setting)
        self.folder = Path(root) / self.id
        self.samples = self.folder / SAMPLES
        self.meta_path = self.folder / META
        self.digests = Path(root).parent / DIGESTS  # the store's memo of file digests
        self._lock = FolderLock(self.folder)
        self.held = False

    # -- state --------------------------------------------------------------------------------

    def meta(self) -> dict | None:
        """The entry's setting.json, or None when it has none (never published)."""
        try:
            body = json.loads(self.meta_path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as err:
            raise RunError(f"full-compute store entry {self.meta_path} is unreadable ({err}); delete "
                           f"{self.folder} and run again to redraw it") from err
        return body if isinstance(body, dict) else {}

    def complete(self) -> bool:
        """Whether the set is here, whole, and of this setting. An entry whose recorded setting
        differs from the one its name stands for was not made by this store: refused."""
        meta = self.meta()
        if meta is None or not self.samples.exists():
            return False
        recorded = meta.get("setting") or {}
        if key(recorded, SAMPLE_KEYS) != key(self.setting, SAMPLE_KEYS):
            raise RunError(f"full-compute store entry {self.folder} holds another setting than its name says "
                           f"(id {setting_id(recorded)}, not {self.id}); delete it and run again to redraw it")
        return True

    @property
    def token(self) -> str | None:
        """Changes whenever the set is (re)published: statistics carry the token they were made
        from, so statistics of an older set are never used with a newer one."""
        meta = self.meta()
        return None if meta is None else meta.get("token")

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """(images, labels) of the complete set, checked against the setting's sample count."""
        from eval.stats import NpzError, check_images, read_npz

        try:
            arrays = read_npz(self.samples, "full-compute set")
        except NpzError as err:
            raise RunError(f"{err}; delete {self.folder} and run again to redraw it") from err
        self.verify()
        images, labels = arrays.get("arr_0"), arrays.get("arr_1")
        if images is None or labels is None:
            raise RunError(f"full-compute set {self.samples} lacks arr_0 or arr_1; delete {self.folder} and run "
                           "again to redraw it")
        check_images(images.shape, images.dtype, self.samples, videos=True)
        if len(images) != int(self.setting["num_samples"]) or len(labels) != len(images):
            raise RunError(f"full-compute set {self.samples} holds {len(images)} images, not the setting's "
                           f"{self.setting['num_samples']}; delete {self.folder} and run again to redraw it")
        return images, labels.astype(np.int64)

    def verify(self) -> None:
        """Refuse a set whose bytes are not those published (replaced by another set, or edited);
        an entry published without a checksum gets the current one recorded."""
        actual = memo_digest(self.samples, self.digests)
        meta = self.meta() or {}
        recorded = meta.get("samples_sha256")
        if recorded is None:
            atomic_write_text(self.meta_path, json.dumps({**meta, "samples_sha256": actual}, indent=1) + "\n")
        elif recorded != actual:
            raise RunError(f"full-compute set {self.samples} is not the set published for setting {self.id} "
                           f"(sha256 {actual[:16]}, published {recorded[:16]}): it was replaced or edited; delete "
                           f"{self.folder} and run again to redraw it")

    # -- writing ------------------------------------------------------------------------------

    def try_lock(self) -> str | None:
        """Take the entry's lock without waiting: None on success, else who holds it."""
        self.folder.mkdir(parents=True, exist_ok=True)
        try:
            self._lock.acquire()
        except FolderLockedError as err:
            return getattr(err, "holder", None) or str(err)
        self.held = True
        return None

    def release(self) -> None:
        self._lock.release()
        self.held = False

    def publish(self, samples: Path, source: str) -> None:
        """Make ``samples`` (an ADM-layout .npz of this setting) the entry's set: hard-linked when
        it is on the same file system (no copy of a 10 GB file), else copied. Call with the lock
        held. Earlier statistics and any draw in progress are dropped: they belong to no set now."""
        if not self.held:
            raise RuntimeError("publish() needs the entry's lock")
        for stale in self.folder.glob("stats-*.npz"):
            stale.unlink()
        link_or_copy(samples, self.samples)
        stamp = datetime.datetime.now().isoformat(timespec="seconds")
        atomic_write_text(self.meta_path, json.dumps({"id": self.id, "setting": self.setting, "source": source,
                                                     "time": stamp, "token": uuid.uuid4().hex,
                                                     "samples_sha256": memo_digest(self.samples, self.digests)},
                                                    indent=1) + "\n")
        shutil.rmtree(self.folder / SHARD_DIR, ignore_errors=True)
        with contextlib.suppress(FileNotFoundError):
            (self.folder / MANIFEST).unlink()

    # -- statistics ---------------------------------------------------------------------------

    def stats_path(self, extractor_id: str) -> Path:
        """The set's statistics for an extractor. The name carries the publication token, so
        statistics of an earlier set under this id are never found for a newer one."""
        return self.folder / f"stats-{extractor_id}-{(self.token or 'unpublished')[:12]}.npz"

    def load_stats(self, extractor_id: str) -> dict[str, np.ndarray] | None:
        """The set's statistics (mu, sigma and the spatial pair where present) for this
        extractor, or None when there are none yet or they are damaged (the caller computes
        them and writes them with eval.stats.save_stats to :meth:`stats_path`)."""
        from eval.stats import NpzError, check_statistics, read_npz

        path = self.stats_path(extractor_id)
        if not path.exists():
            return None
        try:
            arrays = read_npz(path, "full-compute statistics")
            check_statistics(arrays, path)
        except (NpzError, NonFiniteError):
            return None
        return {k: v for k, v in arrays.items() if k.startswith(("mu", "sigma"))}


def list_entries(root: str | Path) -> list[dict]:
    """Every entry under ``root`` (``<paths.store>/full_compute``): id, folder, setting, whether
    complete, whether a job holds it now, and its size on disk."""
    out = []
    root = Path(root)
    for folder in sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []:
        meta_path = folder / META
        try:
            meta = json.loads(meta_path.read_text()) if meta_path.exists() else {}
        except (OSError, ValueError):
            meta = {}
        lock = FolderLock(folder)
        try:
            lock.acquire()
            busy = None
            lock.release()
        except FolderLockedError as err:
            busy = str(err)
        size = sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
        out.append({"id": folder.name, "folder": folder, "setting": meta.get("setting") or {},
                    "complete": (folder / SAMPLES).exists() and bool(meta), "busy": busy, "bytes": size,
                    "source": meta.get("source")})
    return out
