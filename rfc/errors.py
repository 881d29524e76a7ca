"""The failures a run can predict, each reported as one line naming the key or file at fault.

The command line (run.py, via rfc.cli) turns these into ``error: ...`` with exit code 2; anything
else is a bug and keeps its traceback (exit code 1)."""

from __future__ import annotations


class RunError(RuntimeError):
    """A predictable failure that is not a bad config value: an unreadable or non-finite input,
    a folder in use, a sample set that came out non-finite."""


class ConfigError(ValueError):
    """A config value that cannot be used; the message names its key (``eval.num_samples``)."""


class NonFiniteError(RunError):
    """NaN or infinity where a number is needed: weights, drawn samples, statistics."""


class FolderLockedError(RunError):
    """Another process holds the run folder."""


def reason(err: BaseException, limit: int = 200) -> str:
    """Why a loader failed, in one line: ``Type: first line of its message``."""
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0][:limit]}" if lines else type(err).__name__
