"""Progress bars: one decision whether a job draws them, and the bars themselves.

A bar helps a person watching a terminal; anywhere else it is noise. Sent to a file, a pipe or a
launcher's log (submitit, SLURM) its carriage returns turn into thousands of lines; drawn by several
jobs or ranks into one terminal (joblib with several workers, torchrun) the bars overwrite each
other. So :func:`show_bars` draws them only on a terminal, only in the one process that owns it:
every bar of the harness asks it. Bars go to stderr only (tqdm's default is kept explicit), so
they never reach stdout, the CSV or any JSON the harness writes.

A job declares what it runs under with :func:`job_progress` (rfc.run.runner does, with the launcher
Hydra reports); code deep inside a job (feature extractors, metrics) then needs no argument to
know. :func:`task` names what a generic loop is working on ("features of the reference"), so an
extractor's bar says which set it is featurising without a parameter in its interface.
"""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, TextIO

from tqdm import tqdm

# Secondary loops (feature extraction, metrics, calibration trials) show a bar only once they have
# run this long: a loop that ends sooner needs none, and a second of flicker per stage is clutter.
DELAY_S = 2.0


@dataclass(frozen=True)
class _Job:
    wanted: bool = True  # the caller's wish (rfc.run.runner.run(progress=False) in tests and scripts)
    launcher: str = "basic"  # Hydra's hydra/launcher choice
    n_jobs: int | None = None  # joblib's workers


_JOB: ContextVar[_Job | None] = ContextVar("rfc_progress_job", default=None)  # None: _Job()
_TASK: ContextVar[str | None] = ContextVar("rfc_progress_task", default=None)


def _rank() -> int:
    """This process's torchrun rank (0 without torchrun): the environment says it before any
    process group exists."""
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def show_bars(stream: TextIO | None = None) -> bool:
    """Whether progress bars are drawn on ``stream`` (stderr by default): the one place that
    decides. No when the job asked for none, when the stream is not a terminal, on torchrun ranks
    other than 0, under submitit (each job's output goes to its own log file), or under a launcher
    that runs several jobs into one terminal at once (joblib with more than one worker)."""
    from rfc.utils.devices import concurrency

    job = _JOB.get() or _Job()
    if not job.wanted:
        return False
    stream = sys.stderr if stream is None else stream
    try:
        if not stream.isatty():
            return False
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
    if _rank() > 0 or os.environ.get("SUBMITIT_EXECUTOR"):
        return False
    return concurrency(job.launcher, job.n_jobs) is None


@contextlib.contextmanager
def job_progress(wanted: bool = True, launcher: str = "basic", n_jobs: int | None = None) -> Iterator[None]:
    """Declare, for the code running inside, whether bars are wanted and which launcher runs the
    job (see :func:`show_bars`)."""
    token = _JOB.set(_Job(wanted, launcher, n_jobs))
    try:
        yield
    finally:
        _JOB.reset(token)


@contextlib.contextmanager
def task(label: str) -> Iterator[None]:
    """Name what the loops inside work on; :func:`label` reads it."""
    token = _TASK.set(label)
    try:
        yield
    finally:
        _TASK.reset(token)


def label(default: str) -> str:
    """The current task's name (:func:`task`), else ``default``."""
    return _TASK.get() or default


def bar(*, enabled: bool = True, secondary: bool = False, **kwargs: Any) -> tqdm:  # noqa: ANN401 - tqdm's
    """A tqdm bar on stderr, drawn only when ``enabled`` and :func:`show_bars` agree; otherwise a
    disabled bar that passes its iterable through and ignores ``update`` (its ``n`` stays 0).
    ``secondary``: a loop beside the main one (features, metrics, calibration trials), shown only
    once it has run ``DELAY_S``. ``kwargs`` are tqdm's (iterable, total, desc, unit, leave ...)."""
    kwargs.setdefault("file", sys.stderr)
    if secondary:
        kwargs.setdefault("delay", DELAY_S)
    return tqdm(disable=not (enabled and show_bars(kwargs["file"])), dynamic_ncols=True, **kwargs)
